"""Numba kernels for NumPy arrays on the CPU: the same functions as kernels/reference.py, fast.

Where the time goes on a CPU, and what this module does about it:

* Convolution is matrix multiplication (GEMM) plus data movement. What makes a
  plain NumPy version slow is building the im2col matrix, transposing,
  temporaries. Here Numba loops write the im2col matrix of a few samples at a
  time straight into a buffer that stays in cache, one product per chunk
  multiplies it (with BLAS's transpose flags instead of transposed copies), and
  col2im is a gather: each output row is written by one loop, no atomics. Large
  images (Stable Diffusion's VAE decoder) go a band of output rows at a time.
  3x3 convolutions with stride 1 and 32 or more channels go by Winograd's
  F(2x2, 3x3) instead (kernels/winograd.py): 16 products of transformed 4x4
  tiles, 2.25x fewer multiplications than the im2col product. 1x1 kernels need no
  im2col: a chunk of samples is one (channels, pixels) matrix, one product.
  The products of convolutions and linear layers go through kernels/blas.py,
  which on one thread feeds OpenBLAS blocks small enough for its unpacked
  small-matrix kernels (1.3-1.5x faster than np.matmul on these shapes); there
  the whole loop over chunks runs compiled, calling OpenBLAS from Numba.
* Attention never materialises the (B, Sq, Sk) probabilities: BLAS computes
  the scores of a chunk of batch items, a fused Numba pass turns them into
  exponentials in place, BLAS applies them; backward recomputes each chunk's
  probabilities from the saved log-sum-exp.
* Norms, softmax, activations and AdamW are single fused passes over rows,
  with exp computed by a polynomial LLVM can vectorise (_exp).

Two thread pools on two cores fight: Numba's parallel loops and OpenBLAS's
threads each spin while waiting for work, so alternating between them many
times per call costs far more than it gains. The convolution of small images
therefore runs its (cheap) data movement in plain serial Numba and lets BLAS use
the cores; everything without BLAS inside is written as Numba parallel loops
(`prange`), which run on all threads only for arrays of 2M elements or more (_run).
Long attention sequences go the other way: each thread takes whole bands of
queries with single-threaded BLAS (_in_threads). For the same reason
tinysd/__init__.py (imported before this module: kernels imports tinysd.backend)
asks OpenMP, Numba's default threading layer, and OpenBLAS to let idle threads
sleep instead of spinning.

Kernels compile on first use (float32 and float64) and are cached on disk
(`cache=True`); optional arguments are passed as flags plus dummy arrays so
that each kernel has one compiled version per dtype.
"""

import math
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, set_num_threads, types, vectorize
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import blas, reference, winograd
from .reference import conv_output_size

# fastmath flags that let LLVM vectorise sums (reassociate) but keep inf/nan semantics (masks use -inf)
_FAST = {"reassoc", "contract", "nsz", "arcp"}


# ---- when to use more than one thread ---------------------------------------------
_PARALLEL_MIN_SIZE = 1 << 21  # elements; below this a parallel kernel runs on one thread


def _run(kernel, *args):
    """kernel(*args), a parallel Numba kernel, on all of Numba's threads only if its first
    array has at least _PARALLEL_MIN_SIZE elements; on one thread otherwise.

    Starting a parallel loop wakes sleeping threads (about 0.1 ms here), and right after a
    matrix product OpenBLAS's threads still spin on the cores for a while, so the woken
    thread may wait for a whole scheduler time slice. Below ~2M elements one thread is
    done first: a group norm of a (32, 8, 32, 32) batch, forward + backward, took 0.12 ms
    on one thread and 0.18 ms on two; a whole UNet training step of examples/mnist_digits.py
    went from 0.34 s to 0.28 s on this 2-core machine.
    """
    threads = get_num_threads()
    if threads == 1 or args[0].size >= _PARALLEL_MIN_SIZE:
        return kernel(*args)
    set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        set_num_threads(threads)


# ---- linear layers: one product each, in OpenBLAS's small-matrix blocks (kernels/blas.py) ----
def linear(x, w, b):
    """See reference.linear."""
    y = np.empty((x.shape[0], w.shape[0]), np.result_type(x, w))
    blas.matmul(x, np.ascontiguousarray(w.T), y, bias=b)
    return y


def linear_grad_input(dy, w):
    """See reference.linear_grad_input."""
    dx = np.empty((dy.shape[0], w.shape[1]), np.result_type(dy, w))
    blas.matmul(dy, w, dx)
    return dx


def linear_grad_weight(dy, x):
    """See reference.linear_grad_weight."""
    dw = np.empty((dy.shape[1], x.shape[1]), np.result_type(dy, x))
    blas.matmul(dy, x, dw, trans_a=True)
    return dw


# ---- convolution: channels-last im2col, one GEMM per chunk of samples ------------
# A chunk of samples of x is copied to channels-last order (N, H, W, C) with
# the zero padding built in. An im2col row (one output pixel) is then KH runs
# of KW*C contiguous values, which copy at memory speed. Column order of the
# im2col matrix: (g, i, j, c), so group g's columns are one contiguous block.
#
# Numba note: the copy loops index views with the loop variable itself
# (dst[t] = src[t]) rather than with computed offsets (dst[a + t] = src[b + t]);
# LLVM then knows the index is non-negative and vectorises the loop (4x faster).
_CACHE_BYTES = 4 << 20  # work buffers per chunk of samples: about this size (L2/L3 resident)
_BAND_BYTES = 16 << 20  # im2col matrix of one band of a large image (measured: 16 MiB beat 1 and 4 MiB)


@njit(cache=True)
def _to_channels_last(src, n0, top, left, dst):
    """dst[n, y + top, x + left, c] = src[n0 + n, c, y, x]; the border of dst (the padding) is zeroed."""
    nc, hd, wd, c_count = dst.shape
    _, _, h, w = src.shape
    for n in range(nc):
        for row in range(hd):
            out = dst[n, row]
            out[:] = 0
            y = row - top
            if y < 0 or y >= h:
                continue
            inside = out[left : left + w]
            for c in range(c_count):
                plane_row, column = src[n0 + n, c, y], inside[:, c]
                for x in range(w):
                    column[x] = plane_row[x]


@njit(cache=True)
def _to_channels_first(src, top, left, n0, dst):
    """dst[n0 + n, c, y, x] = src[n, y + top, x + left, c]  (the inverse move, cropping the padding)."""
    nc, c_count = src.shape[0], src.shape[3]
    _, _, h, w = dst.shape
    for n in range(nc):
        for c in range(c_count):
            for y in range(h):
                column, out = src[n, y + top, left : left + w, c], dst[n0 + n, c, y]
                for x in range(w):
                    out[x] = column[x]


@njit(cache=True)
def _swap_samples_channels(src, n0, dst):
    """dst[c, n, p] = src[n0 + n, c, p] for a chunk of samples.

    Moves (N, C, P) images to the (C, N*P) matrix layout of the GEMMs: contiguous runs of
    P values, nearly as cheap as a copy (a move to channels last is 2-4x slower).
    """
    c_count, nc, _ = dst.shape
    for c in range(c_count):
        for n in range(nc):
            a, b = src[n0 + n, c], dst[c, n]
            for p in range(a.size):
                b[p] = a[p]


@njit(cache=True)
def _swap_back(src, bias, n0, dst):
    """dst[n0 + n, c, p] = src[c, n, p] + bias[c] (no bias when it is empty): the inverse move."""
    c_count, nc, _ = src.shape
    for c in range(c_count):
        shift = bias[c] if bias.size else src.dtype.type(0)
        for n in range(nc):
            a, b = src[c, n], dst[n0 + n, c]
            for p in range(a.size):
                b[p] = a[p] + shift


@njit(cache=True)
def _tap_runs(kw, dw, groups, c_count):
    """How the im2col columns (j, c) of one (group g, kernel row i) split into runs that are contiguous
    in a channels-last row of xpad: (number of runs, run length). With dw == 1 and one group the KW
    taps are one run of KW * C values; otherwise each tap j is a run of C / G values."""
    if dw == 1 and groups == 1:
        return 1, kw * c_count
    return kw, c_count // groups


@njit(cache=True)
def _im2col(xpad, kh, kw, sh, sw, dh, dw, groups, ho, wo, cols):
    """cols[(n, a, b), (g, i, j, c)] = xpad[n, a*sh + i*dh, b*sw + j*dw, g*Cg + c]   (xpad channels-last, padded)."""
    nc, hp, wp, c_count = xpad.shape
    flat = xpad.reshape(-1)
    runs, length = _tap_runs(kw, dw, groups, c_count)
    cg = c_count // groups
    for n in range(nc):
        for a in range(ho):
            for b in range(wo):
                row = cols[(n * ho + a) * wo + b]
                col = 0
                for g in range(groups):
                    for i in range(kh):
                        pixel = (n * hp + a * sh + i * dh) * wp + b * sw  # tap (i, 0) in xpad
                        for run in range(runs):
                            start = (pixel + run * dw) * c_count + g * cg
                            src, dst = flat[start : start + length], row[col : col + length]
                            for t in range(length):
                                dst[t] = src[t]
                            col += length


@njit(cache=True)
def _col2im(cols, kh, kw, sh, sw, dh, dw, groups, ho, wo, dxpad):
    """The adjoint of _im2col: dxpad[n, y, x, c] = sum of the cols entries that were read from there.

    Written as a gather over the rows (n, y) of dxpad (each row collects the window
    offsets i that land on it), so it would parallelise over rows without atomics.
    """
    nc, hp, wp, c_count = dxpad.shape
    runs, length = _tap_runs(kw, dw, groups, c_count)
    cg = c_count // groups
    for n in range(nc):
        for y in range(hp):
            out = dxpad[n, y].reshape(-1)
            out[:] = 0
            for i in range(kh):
                a, rem = divmod(y - i * dh, sh)
                if rem != 0 or a < 0 or a >= ho:
                    continue
                for b in range(wo):
                    row = cols[(n * ho + a) * wo + b]
                    for g in range(groups):
                        col = (g * kh + i) * kw * cg  # column of (g, i, j = 0, c = 0)
                        for run in range(runs):
                            start = (b * sw + run * dw) * c_count + g * cg
                            src, dst = row[col : col + length], out[start : start + length]
                            for t in range(length):
                                dst[t] += src[t]
                            col += length


_WORK_BUFFERS = {}  # (role, dtype) -> the largest flat work buffer asked for so far


def _work_buffer(role, size, dtype):
    """A flat work array of `size` elements, reused from call to call (one per role and dtype).

    A fresh multi-MiB np.empty is new memory from the kernel, and touching it page by
    page cost about as much as the GEMM of a small convolution; the convolution kernels
    return fresh outputs and never hold a work buffer across calls, so sharing is safe.
    """
    key = (role, np.dtype(dtype))
    buf = _WORK_BUFFERS.get(key)
    if buf is None or buf.size < size:
        buf = _WORK_BUFFERS[key] = np.empty(size, dtype)
    return buf[:size]


class _ConvPlan:
    """Shapes, the chunk of samples and the work buffers shared by the three convolution kernels."""

    def __init__(self, op, x_shape, w_shape, stride, padding, dilation, groups, dtype, out_hw=None):
        reference._check_conv(op, x_shape, w_shape, groups)
        self.n, self.c, self.h, self.w = x_shape
        self.o, _, self.kh, self.kw = w_shape
        (self.sh, self.sw), (self.ph, self.pw), (self.dh, self.dw) = stride, padding, dilation
        self.groups = groups
        self.ho = conv_output_size(self.h, self.kh, self.sh, self.ph, self.dh)
        self.wo = conv_output_size(self.w, self.kw, self.sw, self.pw, self.dw)
        if out_hw is not None:  # conv_transpose2d's output_padding may leave input rows that no output reads
            self.ho, self.wo = out_hw
        if self.ho < 1 or self.wo < 1:
            raise ValueError(f"{op}: kernel {tuple(w_shape[2:])} (dilation {tuple(dilation)}) does not fit "
                             f"input {tuple(x_shape)} with padding {tuple(padding)}")
        self.hp, self.wp = self.h + 2 * self.ph, self.w + 2 * self.pw
        self.p, self.k = self.ho * self.wo, self.c * self.kh * self.kw
        per_sample = (self.p * (self.k + self.o) + self.hp * self.wp * self.c) * np.dtype(dtype).itemsize
        # buffers of about _CACHE_BYTES, but at most twice the input's size: a small
        # convolution should not carry 4 MiB of buffers (peak memory is a benchmark target).
        # On one thread a quarter of it: smaller chunks stay in L2 (measured, whole training
        # steps on one thread: classifier, VAE and UNet 3-4% faster; on two threads 8% slower).
        cache = _CACHE_BYTES if get_num_threads() > 1 else _CACHE_BYTES // 4
        budget = min(cache, 2 * self.n * self.c * self.h * self.w * np.dtype(dtype).itemsize)
        self.step = max(1, min(self.n, budget // per_sample))  # samples per chunk
        self.dtype = dtype

    def window(self):
        """What the chunk loops need to know of the convolution, as one tuple (for Numba)."""
        return (self.ph, self.pw, self.kh, self.kw, self.sh, self.sw, self.dh, self.dw, self.groups, self.ho,
                self.wo)

    def buffers(self):
        """Flat work buffers for one chunk: padded channels-last input, im2col matrix, outputs."""
        per_sample = {"xpad": self.hp * self.wp * self.c, "cols": self.p * self.k, "out": self.p * self.o}
        return tuple(_work_buffer(role, self.step * size, self.dtype) for role, size in per_sample.items())

    def groups_slices(self):
        """Per group: its block of im2col columns and its block of output channels."""
        kg, og = self.k // self.groups, self.o // self.groups
        return [(slice(g * kg, (g + 1) * kg), slice(g * og, (g + 1) * og)) for g in range(self.groups)]


@njit(cache=True)
def _chunk_view(buf, shape):
    """The first prod(shape) elements of the flat work buffer `buf`, as an array of that shape."""
    size = 1
    for extent in shape:
        size *= extent
    return buf[:size].reshape(shape)


@njit(cache=True)
def _im2col_chunk(x, n0, nc, window, xpad_buf, cols_buf):
    """The im2col matrix (nc * HO * WO, C * KH * KW) of samples n0 .. n0 + nc of x, in cols_buf."""
    ph, pw, kh, kw, sh, sw, dh, dw, groups, ho, wo = window
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    xpad = _chunk_view(xpad_buf, (nc, h + 2 * ph, w + 2 * pw, c))
    _to_channels_last(x, n0, ph, pw, xpad)
    if kh == kw == sh == sw == 1 and ph == pw == 0:  # a 1x1 kernel: the im2col matrix is xpad itself
        return xpad.reshape((nc * ho * wo, c))
    cols = _chunk_view(cols_buf, (nc * ho * wo, c * kh * kw))
    _im2col(xpad, kh, kw, sh, sw, dh, dw, groups, ho, wo, cols)
    return cols


@njit(cache=True)
def _output_matrix(dy, n0, nc, out_buf):
    """dy[n0 : n0 + nc] (N, O, HO, WO) as the (O, nc * HO * WO) matrix, in out_buf (any image batch will do)."""
    n, o = dy.shape[0], dy.shape[1]
    p = dy.shape[2] * dy.shape[3]
    out = _chunk_view(out_buf, (o, nc, p))
    _swap_samples_channels(dy.reshape((n, o, p)), n0, out)
    return out.reshape((o, nc * p))


def _compiled_when_gemm(loop):
    """loop(gemm, ...), a kernel's loop over chunks of samples, compiled by Numba when gemm (from
    blas.gemm_for) is given: no Python between chunks, OpenBLAS called in small-matrix blocks
    (blas.product). Run as plain Python, with np.matmul, when it is None (float64, more threads,
    another BLAS); the Numba helpers it calls run compiled either way, on one Numba thread: the
    data movement between the products is cheap, and OpenBLAS's threads take the cores (two
    thread pools taking turns stall each other, see the top of this module).

    Measured on one thread against the same loop in Python: 10-20% off the VAE's and the UNet's
    convolutions, more for the smallest (8 to 15 chunks of under 0.1 ms each).
    """
    compiled = njit(cache=True)(loop)

    def run(gemm, *args):
        if gemm is not None:
            return compiled(gemm, *args)
        threads = get_num_threads()
        set_num_threads(1)  # (the Winograd transforms are parallel loops; im2col's are serial anyway)
        try:
            return loop(gemm, *args)
        finally:
            set_num_threads(threads)

    return run


def _weight_matrix(w, dtype):
    """w (O, C/G, KH, KW) -> (O, KH * KW * C/G): columns in the im2col order (i, j, c) of the weight's group."""
    return np.ascontiguousarray(np.asarray(w, dtype).transpose(0, 2, 3, 1)).reshape(w.shape[0], -1)


def _im2col_is_input(plan):
    """A 1x1 kernel, stride 1, no padding, and the output as large as the input (a transposed conv's
    output padding adds input rows no output reaches): the im2col matrix is the input itself."""
    return (plan.kh == plan.kw == 1 and plan.sh == plan.sw == 1 and plan.ph == plan.pw == 0
            and (plan.ho, plan.wo) == (plan.h, plan.w))


def _pointwise_fits(plan):
    """A 1x1 kernel, stride 1, no padding, one group: a product over channels at every pixel."""
    return _im2col_is_input(plan) and plan.groups == 1


def _pointwise_conv(src, wmat, trans, bias, channels, plan):
    """op(wmat) src + bias at every pixel of src (N, C, H, W), op(wmat) = wmat.T if trans: a 1x1
    convolution (wmat (O, C)) or its input gradient (trans, src = dy). An (N, channels, H, W) array."""
    dst = np.empty((src.shape[0], channels) + src.shape[2:], src.dtype)
    p = plan.h * plan.w
    buffers = (_work_buffer("cols", plan.step * src.shape[1] * p, src.dtype),
               _work_buffer("out", plan.step * channels * p, src.dtype))
    _pointwise_chunks(blas.gemm_for(src.dtype), src, np.ascontiguousarray(wmat), trans,
                      _row_param(bias, channels, 0, src.dtype), plan.step, *buffers, dst)
    return dst


@_compiled_when_gemm
def _pointwise_chunks(gemm, src, wmat, trans, bias, step, src_buf, dst_buf, dst):
    """dst = op(wmat) src + bias at every pixel, `step` samples at a time: samples and channels swapped,
    so that a chunk is one (channels, samples * pixels) matrix and one product. (The channels-last
    route of the other convolutions, im2col being a copy here, took 1.5-3x as long.)"""
    n, c_out = dst.shape[0], dst.shape[1]
    p = dst.shape[2] * dst.shape[3]
    for n0 in range(0, n, step):
        nc = min(step, n - n0)
        a = _output_matrix(src, n0, nc, src_buf)
        b = _chunk_view(dst_buf, (c_out, nc, p))
        blas.product(gemm, wmat, trans, a, b.reshape((c_out, nc * p)), 0.0)
        _swap_back(b, bias, n0, dst.reshape((n, c_out, p)))


def conv2d(x, w, stride, padding, dilation, groups, bias=None):
    """See reference.conv2d. Per chunk of samples: im2col, Y_g = cols_g W_g^T (BLAS), + bias while the
    chunk's product is in the cache, into NCHW.

    The product is taken with the long dimension (output pixels) as the rows: OpenBLAS ran
    the (pixels, O) = (pixels, K) (K, O) orientation 1.3-4x faster than (O, K) (K, pixels)
    for the UNet's and the VAE's shapes; its channels-last result is moved to NCHW.
    Large images, where one sample's im2col matrix outgrows the cache, go by bands of
    output rows instead (_conv2d_in_bands), and so do single-channel inputs, whose
    channels-last im2col rows are runs of KW values (3x faster for a 1 -> 32 conv at 32x32);
    3x3 kernels with stride 1 and a single input channel (an image model's first layer), or
    few channels on wide images, go by direct loops (_direct_3x3_conv), and 1x1 kernels by one
    channels-first product per chunk (_pointwise_conv).
    """
    x = np.ascontiguousarray(x)
    plan = _ConvPlan("conv2d", x.shape, w.shape, stride, padding, dilation, groups, x.dtype)
    if _stride_1_3x3(plan) and _direct_3x3_fits(plan.c, plan.o, plan.wo):
        return _direct_3x3_conv(x, np.asarray(w, x.dtype), (plan.ph, plan.pw), bias, (plan.ho, plan.wo))
    if plan.p * plan.k * x.dtype.itemsize > _CACHE_BYTES or plan.c == 1:
        return _conv2d_in_bands(x, w, plan, bias)
    if _winograd_fits(plan):
        return _winograd_conv2d(x, winograd.weight_tiles(np.asarray(w, x.dtype)), bias, (plan.ph, plan.pw),
                                (plan.ho, plan.wo), plan)
    if _pointwise_fits(plan):
        return _pointwise_conv(x, np.asarray(w, x.dtype).reshape(plan.o, plan.c), False, bias, plan.o, plan)
    wmat_t = np.ascontiguousarray(_weight_matrix(w, x.dtype).T)  # (KH * KW * C/G, O)
    y = np.empty((plan.n, plan.o, plan.ho, plan.wo), x.dtype)
    _conv2d_chunks(blas.gemm_for(x.dtype), x, wmat_t, blas.row_bias(bias, x.dtype), plan.window(), plan.step,
                   *plan.buffers(), y)
    return y


@_compiled_when_gemm
def _conv2d_chunks(gemm, x, wmat_t, bias, window, step, xpad_buf, cols_buf, out_buf, y):
    """y = conv2d(x) + bias, `step` samples at a time: im2col, Y_g = cols_g W_g^T (channels last), + bias,
    into NCHW."""
    groups, ho, wo = window[8], window[9], window[10]
    n, o = y.shape[0], y.shape[1]
    kg, og = wmat_t.shape[0], o // groups
    for n0 in range(0, n, step):
        nc = min(step, n - n0)
        cols = _im2col_chunk(x, n0, nc, window, xpad_buf, cols_buf)
        out = _chunk_view(out_buf, (nc, ho, wo, o))
        out_matrix = out.reshape((nc * ho * wo, o))
        for g in range(groups):
            blas.product(gemm, cols[:, g * kg : (g + 1) * kg], False, wmat_t[:, g * og : (g + 1) * og],
                         out_matrix[:, g * og : (g + 1) * og], 0.0)
        blas.add_to_rows(out_matrix, bias)
        _to_channels_first(out, 0, 0, n0, y)


@njit(parallel=True, cache=True)
def _im2col_rows(x, n, a0, a1, kh, kw, sh, sw, ph, pw, dh, dw, wo, cols):
    """cols[(c, i, j), (a - a0) * WO + b] = x[n, c, a*sh + i*dh - ph, b*sw + j*dw - pw] (zero outside x)
    for the output rows a0 <= a < a1: the channels-first im2col matrix of one band of one sample."""
    _, c_count, h, w = x.shape
    for c in prange(c_count):
        for i in range(kh):
            for j in range(kw):
                row = cols[(c * kh + i) * kw + j]
                shift = j * dw - pw  # input column of output column b is b * sw + shift
                b_lo = min(wo, max(0, (sw - 1 - shift) // sw))  # first b reading inside x
                b_hi = max(b_lo, min(wo, (w - 1 - shift) // sw + 1))  # one past the last
                for a in range(a0, a1):
                    out = row[(a - a0) * wo : (a - a0 + 1) * wo]
                    y = a * sh + i * dh - ph
                    if y < 0 or y >= h:
                        out[:] = 0
                        continue
                    out[:b_lo] = 0
                    out[b_hi:] = 0
                    src = x[n, c, y]
                    if sw == 1:
                        dst, run = out[b_lo:b_hi], src[b_lo + shift : b_hi + shift]
                        for t in range(dst.size):
                            dst[t] = run[t]
                    else:
                        for b in range(b_lo, b_hi):
                            out[b] = src[b * sw + shift]


_DIRECT_MAX_CHANNEL_PAIRS = 128  # C * O up to which direct loops beat im2col + GEMM ...
_DIRECT_MIN_WIDTH = 32  # ... on output rows this wide (measured: 16 and 16 x 16 channels were even or slower)


def _stride_1_3x3(plan):
    """A 3x3 kernel, stride 1, no dilation, one group."""
    return plan.kh == plan.kw == 3 and plan.sh == plan.sw == 1 and plan.dh == plan.dw == 1 and plan.groups == 1


def _direct_3x3_fits(c, o, width):
    """Whether a 3x3, stride-1 correlation of c input and o output channels, writing rows of `width`,
    goes by direct loops: one input channel (an image model's first layer), or an even number of output
    channels, few channel pairs, wide rows (the VAE's 8 and 16 channels at 32 x 32: 1.5-1.7x faster)."""
    return c == 1 or (o % 2 == 0 and c * o <= _DIRECT_MAX_CHANNEL_PAIRS and width >= _DIRECT_MIN_WIDTH)


def _direct_3x3_conv(x, w, pads, bias, out_hw):
    """The 3x3, stride-1 correlation of x, padded by pads, with w (O, C, 3, 3), + bias, by direct loops:
    an (N, O) + out_hw array. Computes conv2d and (w rotated, C and O swapped) its input gradient."""
    xp = _zero_padded(x, pads)
    y = np.empty((x.shape[0], w.shape[0]) + tuple(out_hw), x.dtype)
    bias = _row_param(bias, w.shape[0], 0, x.dtype)
    if x.shape[1] == 1:
        _run(_one_channel_3x3, xp[:, 0], w, bias, y)
    else:
        _run(_direct_3x3, xp, w, bias, y)
    return y


def _zero_padded(x, pads):
    """x (N, C, H, W) with pads = (PH, PW) rows and columns of zeros on each side: (N, C, H + 2 PH, W + 2 PW).
    (np.pad took 1.5-3x as long for the VAE's batches.)"""
    (n, c, h, w), (ph, pw) = x.shape, pads
    out = np.zeros((n, c, h + 2 * ph, w + 2 * pw), x.dtype)
    out[:, :, ph : ph + h, pw : pw + w] = x
    return out


@njit(parallel=True, cache=True, fastmath=_FAST)
def _direct_3x3(xp, w, bias, y):
    """y[n, o, a, b] = bias[o] + sum over c, i, j < 3 of w[o, c, i, j] xp[n, c, a + i, b + j] (xp: the
    padded input; an even number of output channels). One task per sample and pair of output channels:
    for each input channel the pair's 18 weights stay in registers, each input value is loaded once for
    both outputs, and the loop along b is vectorised (the wider the rows, the better)."""
    n_count, o_count, ho, wo = y.shape
    c_count, pairs = xp.shape[1], o_count // 2
    for task in prange(n_count * pairs):
        n, o = task // pairs, 2 * (task % pairs)
        for a in range(ho):
            for b in range(wo):
                y[n, o, a, b], y[n, o + 1, a, b] = bias[o], bias[o + 1]
        for c in range(c_count):
            w00, w01, w02 = w[o, c, 0, 0], w[o, c, 0, 1], w[o, c, 0, 2]
            w10, w11, w12 = w[o, c, 1, 0], w[o, c, 1, 1], w[o, c, 1, 2]
            w20, w21, w22 = w[o, c, 2, 0], w[o, c, 2, 1], w[o, c, 2, 2]
            v00, v01, v02 = w[o + 1, c, 0, 0], w[o + 1, c, 0, 1], w[o + 1, c, 0, 2]
            v10, v11, v12 = w[o + 1, c, 1, 0], w[o + 1, c, 1, 1], w[o + 1, c, 1, 2]
            v20, v21, v22 = w[o + 1, c, 2, 0], w[o + 1, c, 2, 1], w[o + 1, c, 2, 2]
            for a in range(ho):
                for b in range(wo):
                    x00, x01, x02 = xp[n, c, a, b], xp[n, c, a, b + 1], xp[n, c, a, b + 2]
                    x10, x11, x12 = xp[n, c, a + 1, b], xp[n, c, a + 1, b + 1], xp[n, c, a + 1, b + 2]
                    x20, x21, x22 = xp[n, c, a + 2, b], xp[n, c, a + 2, b + 1], xp[n, c, a + 2, b + 2]
                    y[n, o, a, b] += (w00 * x00 + w01 * x01 + w02 * x02 + w10 * x10 + w11 * x11 + w12 * x12
                                      + w20 * x20 + w21 * x21 + w22 * x22)
                    y[n, o + 1, a, b] += (v00 * x00 + v01 * x01 + v02 * x02 + v10 * x10 + v11 * x11 + v12 * x12
                                          + v20 * x20 + v21 * x21 + v22 * x22)


@njit(parallel=True, cache=True, fastmath=_FAST)
def _one_channel_3x3(xp, w, bias, y):
    """y[n, o, a, b] = bias[o] + sum over i, j < 3 of w[o, 0, i, j] xp[n, a + i, b + j] (xp: the padded
    input plane). One (sample, output channel) plane per task; the nine taps are written out, so they
    stay in registers and the loop over b is vectorised (a product with K = 9 would be mostly
    im2col and layout moves: 3.5x slower for CLIP's 1 -> 16 channels at 32x32)."""
    n_count, o_count, ho, wo = y.shape
    for task in prange(n_count * o_count):
        n, o = task // o_count, task % o_count
        w00, w01, w02 = w[o, 0, 0, 0], w[o, 0, 0, 1], w[o, 0, 0, 2]
        w10, w11, w12 = w[o, 0, 1, 0], w[o, 0, 1, 1], w[o, 0, 1, 2]
        w20, w21, w22 = w[o, 0, 2, 0], w[o, 0, 2, 1], w[o, 0, 2, 2]
        for a in range(ho):
            for b in range(wo):
                y[n, o, a, b] = (bias[o] + w00 * xp[n, a, b] + w01 * xp[n, a, b + 1] + w02 * xp[n, a, b + 2]
                                 + w10 * xp[n, a + 1, b] + w11 * xp[n, a + 1, b + 1] + w12 * xp[n, a + 1, b + 2]
                                 + w20 * xp[n, a + 2, b] + w21 * xp[n, a + 2, b + 1] + w22 * xp[n, a + 2, b + 2])


@njit(parallel=True, cache=True, fastmath=_FAST)
def _one_channel_3x3_grad_weight(dy, xp, zero, dw):
    """dw[o, 0, i, j] = sum over n, a, b of dy[n, o, a, b] xp[n, a + i, b + j]: one output channel per
    task, the nine sums taken in one pass over dy (in dy's dtype: `zero` is 0 of it)."""
    n_count, o_count, ho, wo = dy.shape
    for o in prange(o_count):
        s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = zero
        for n in range(n_count):
            for a in range(ho):
                for b in range(wo):
                    g = dy[n, o, a, b]
                    s00 += g * xp[n, a, b]
                    s01 += g * xp[n, a, b + 1]
                    s02 += g * xp[n, a, b + 2]
                    s10 += g * xp[n, a + 1, b]
                    s11 += g * xp[n, a + 1, b + 1]
                    s12 += g * xp[n, a + 1, b + 2]
                    s20 += g * xp[n, a + 2, b]
                    s21 += g * xp[n, a + 2, b + 1]
                    s22 += g * xp[n, a + 2, b + 2]
        dw[o, 0, 0, 0], dw[o, 0, 0, 1], dw[o, 0, 0, 2] = s00, s01, s02
        dw[o, 0, 1, 0], dw[o, 0, 1, 1], dw[o, 0, 1, 2] = s10, s11, s12
        dw[o, 0, 2, 0], dw[o, 0, 2, 1], dw[o, 0, 2, 2] = s20, s21, s22


def _conv2d_in_bands(x, w, plan, bias):
    """conv2d of large images, one band of output rows of one sample at a time, all channels first:
    Y_g[:, band] (O/G, rows * WO) = W_g (O/G, C/G * KH * KW) @ cols_g (C/G * KH * KW, rows * WO).

    The im2col matrix of a band (about _BAND_BYTES) is built from NCHW rows by contiguous copies,
    and BLAS writes its product straight into the band's columns of y (a strided view): no
    channels-last round trip, no image-sized work buffer (a 512 x 512 VAE decoder's 128-channel
    convolution would need 1.2 GB of im2col matrix in one piece).
    """
    rows = max(1, min(plan.ho, _BAND_BYTES // (plan.wo * plan.k * x.dtype.itemsize)))
    pointwise = _im2col_is_input(plan)
    cols_all = None if pointwise else _work_buffer("cols", rows * plan.wo * plan.k, x.dtype)
    wmat = np.asarray(w, x.dtype).reshape(plan.o, -1)
    y = np.empty((plan.n, plan.o, plan.ho, plan.wo), x.dtype)
    for n in range(plan.n):
        y_matrix = y[n].reshape(plan.o, -1)
        for a0 in range(0, plan.ho, rows):
            a1 = min(plan.ho, a0 + rows)
            if pointwise:  # a 1x1 kernel, stride 1, no padding: the im2col matrix is x itself
                cols = x[n].reshape(plan.c, -1)[:, a0 * plan.wo : a1 * plan.wo]
            else:
                cols = cols_all[: (a1 - a0) * plan.wo * plan.k].reshape(plan.k, -1)
                _run(_im2col_rows, x, n, a0, a1, plan.kh, plan.kw, plan.sh, plan.sw, plan.ph, plan.pw, plan.dh,
                     plan.dw, plan.wo, cols)  # all threads for large images only
            band = y_matrix[:, a0 * plan.wo : a1 * plan.wo]
            for k_block, o_block in plan.groups_slices():
                np.matmul(wmat[o_block], cols[k_block], out=band[o_block])
            if bias is not None:
                band += bias.reshape(-1, 1)
    return y


def conv2d_grad_input(dy, w, x_shape, stride, padding, dilation, groups):
    """See reference.conv2d_grad_input. Per chunk: dcols_g = dY_g^T W_g (BLAS), col2im, into NCHW."""
    dy = np.ascontiguousarray(dy)
    plan = _ConvPlan("conv2d_grad_input", x_shape, w.shape, stride, padding, dilation, groups, dy.dtype,
                     dy.shape[2:])
    # dx of a 3x3, stride-1 convolution with padding p <= 2: the correlation of dy, padded by 2 - p,
    # with w rotated 180 degrees, C and O swapped
    rotated = np.asarray(w, dy.dtype)[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    if _stride_1_3x3(plan) and max(plan.ph, plan.pw) <= 2 and _direct_3x3_fits(plan.o, plan.c, plan.w):
        return _direct_3x3_conv(dy, np.ascontiguousarray(rotated), (2 - plan.ph, 2 - plan.pw), None, (plan.h, plan.w))
    if _winograd_fits(plan):
        return _winograd_conv2d(dy, winograd.weight_tiles(rotated), None, (2 - plan.ph, 2 - plan.pw),
                                (plan.h, plan.w), plan)
    if _pointwise_fits(plan):
        return _pointwise_conv(dy, np.asarray(w, dy.dtype).reshape(plan.o, plan.c), True, None, plan.c, plan)
    dx = np.empty(x_shape, dy.dtype)
    _conv2d_grad_input_chunks(blas.gemm_for(dy.dtype), dy, _weight_matrix(w, dy.dtype), plan.window(), plan.step,
                              *plan.buffers(), dx)
    return dx


@_compiled_when_gemm
def _conv2d_grad_input_chunks(gemm, dy, wmat, window, step, xpad_buf, cols_buf, out_buf, dx):
    """dx = conv2d_grad_input(dy), `step` samples at a time (wmat: (O, KH * KW * C/G), im2col column order)."""
    ph, pw, kh, kw, sh, sw, dh, dw, groups, ho, wo = window
    n, c, h, w = dx.shape
    kg, og = wmat.shape[1], dy.shape[1] // groups
    for n0 in range(0, n, step):
        nc = min(step, n - n0)
        dy_matrix = _output_matrix(dy, n0, nc, out_buf)
        cols = _chunk_view(cols_buf, (nc * ho * wo, kg * groups))
        for g in range(groups):
            blas.product(gemm, dy_matrix[g * og : (g + 1) * og], True, wmat[g * og : (g + 1) * og],
                         cols[:, g * kg : (g + 1) * kg], 0.0)
        dxpad = _chunk_view(xpad_buf, (nc, h + 2 * ph, w + 2 * pw, c))
        _col2im(cols, kh, kw, sh, sw, dh, dw, groups, ho, wo, dxpad)
        _to_channels_first(dxpad, ph, pw, n0, dx)


def conv2d_grad_weight(dy, x, w_shape, stride, padding, dilation, groups):
    """See reference.conv2d_grad_weight. Per chunk: dW_g += dY_g cols_g (BLAS)."""
    x, dy = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    plan = _ConvPlan("conv2d_grad_weight", x.shape, w_shape, stride, padding, dilation, groups, x.dtype)
    if dy.shape != (plan.n, plan.o, plan.ho, plan.wo):
        raise ValueError(f"conv2d_grad_weight: dy shape {dy.shape} does not match the output shape "
                         f"{(plan.n, plan.o, plan.ho, plan.wo)}")
    if plan.c == 1 and _stride_1_3x3(plan):  # an image model's first layer
        dw = np.empty(w_shape, x.dtype)
        _run(_one_channel_3x3_grad_weight, dy, _zero_padded(x, (plan.ph, plan.pw))[:, 0], x.dtype.type(0), dw)
        return dw
    if _winograd_fits(plan):
        du = np.zeros((16, plan.c, plan.o), x.dtype)
        step, buffers = _winograd_chunking(plan, plan.c, plan.o, (plan.ho, plan.wo))
        _winograd_grad_weight_chunks(blas.gemm_for(x.dtype), x, dy, plan.ph, plan.pw, step, *buffers, du)
        return winograd.weight_from_tiles(du)
    dwmat = np.zeros((plan.o, plan.k // groups), x.dtype)
    _conv2d_grad_weight_chunks(blas.gemm_for(x.dtype), x, dy, plan.window(), plan.step, *plan.buffers(), dwmat)
    # (O, KH, KW, C/G) -> (O, C/G, KH, KW)
    return np.ascontiguousarray(dwmat.reshape(plan.o, plan.kh, plan.kw, -1).transpose(0, 3, 1, 2))


@_compiled_when_gemm
def _conv2d_grad_weight_chunks(gemm, x, dy, window, step, xpad_buf, cols_buf, out_buf, dwmat):
    """dwmat += dY_g cols_g over all samples, `step` at a time (dwmat: (O, KH * KW * C/G), im2col column order)."""
    groups = window[8]
    n = x.shape[0]
    kg, og = dwmat.shape[1], dwmat.shape[0] // groups
    for n0 in range(0, n, step):
        nc = min(step, n - n0)
        cols = _im2col_chunk(x, n0, nc, window, xpad_buf, cols_buf)
        dy_matrix = _output_matrix(dy, n0, nc, out_buf)
        for g in range(groups):
            blas.product(gemm, dy_matrix[g * og : (g + 1) * og], False, cols[:, g * kg : (g + 1) * kg],
                         dwmat[g * og : (g + 1) * og], 1.0)


def conv_transpose2d(x, w, stride, padding, output_padding, dilation, groups):
    """See reference.conv_transpose2d: conv2d_grad_input of the conv whose output is x."""
    y_shape = reference.conv_transpose2d_shape(x.shape, w.shape, stride, padding, output_padding, dilation, groups)
    return conv2d_grad_input(x, w, y_shape, stride, padding, dilation, groups)


# ---- 3x3 convolutions with stride 1: Winograd's F(2x2, 3x3) (kernels/winograd.py) -----
# Below either limit im2col's one product was as fast or faster (one thread, measured): with 8 or 16
# channels 1.1-2.3x faster; for 16 samples of 32 channels at 8x8 (a product of 256 x 32 x 32) 1.05-1.3x.
_WINOGRAD_MIN_CHANNELS = 32  # input and output channels
_WINOGRAD_MIN_PRODUCT = 1 << 19  # multiply-adds of each of the 16 products (tiles x C x O)


def _winograd_fits(plan):
    """Whether the convolution is a 3x3 one Winograd's F(2x2, 3x3) takes: stride 1, no dilation, one
    group, padding at most 2 (so dx is a correlation with padding 2 - p), enough channels and tiles."""
    th, tw = winograd.tile_grid(plan.ho, plan.wo)
    return (_stride_1_3x3(plan) and max(plan.ph, plan.pw) <= 2 and min(plan.c, plan.o) >= _WINOGRAD_MIN_CHANNELS
            and plan.n * th * tw * plan.c * plan.o >= _WINOGRAD_MIN_PRODUCT)


def _winograd_chunking(plan, c, o, hw):
    """(samples per chunk, the chunk's flat work buffers) for an input of c channels and an output of o
    channels of size hw: padded channels-last input, input tiles, product tiles, channels-last output,
    together about as large as im2col's buffers would be (plan.step)."""
    th, tw = winograd.tile_grid(*hw)
    sizes = (2 * th + 2) * (2 * tw + 2) * c, 16 * th * tw * c, 16 * th * tw * o, 4 * th * tw * o
    im2col = plan.p * (plan.k + plan.o) + plan.hp * plan.wp * plan.c
    step = max(1, min(plan.n, plan.step * im2col // sum(sizes)))
    roles = ("xpad", "cols", "out", "tiles")
    return step, tuple(_work_buffer(role, step * size, plan.dtype) for role, size in zip(roles, sizes))


def _winograd_conv2d(x, u, bias, pads, out_hw, plan):
    """The 3x3, stride-1 correlation of x, padded by pads (top, left), with the weight tiles u (16, C, O),
    + bias: an (N, O) + out_hw array."""
    c, o = u.shape[1:]
    y = np.empty((x.shape[0], o) + tuple(out_hw), x.dtype)
    step, buffers = _winograd_chunking(plan, c, o, out_hw)
    _winograd_chunks(blas.gemm_for(x.dtype), x, u, _row_param(bias, o, 0, x.dtype), pads[0], pads[1], step, *buffers,
                     y)
    return y


@njit(cache=True)
def _input_tiles_chunk(x, n0, nc, top, left, th, tw, xpad_buf, v_buf):
    """The input tiles V (16, nc * TH * TW, C) of samples n0 .. n0 + nc of x padded by top, left, in v_buf
    (through a padded channels-last copy in xpad_buf)."""
    c = x.shape[1]
    xpad = _chunk_view(xpad_buf, (nc, 2 * th + 2, 2 * tw + 2, c))
    _to_channels_last(x, n0, top, left, xpad)
    v = _chunk_view(v_buf, (16, nc * th * tw, c))
    winograd.input_tiles(xpad, th, tw, v)
    return v


@_compiled_when_gemm
def _winograd_chunks(gemm, x, u, bias, top, left, step, xpad_buf, v_buf, m_buf, out_buf, y):
    """y = conv2d(x) + bias by F(2x2, 3x3), `step` samples at a time: channels-last padded input,
    input tiles V, M[k] = V[k] U[k] (BLAS), output tiles (+ bias), into NCHW (cropped)."""
    n, o, ho, wo = y.shape
    th, tw = winograd.tile_grid(ho, wo)
    for n0 in range(0, n, step):
        nc = min(step, n - n0)
        v = _input_tiles_chunk(x, n0, nc, top, left, th, tw, xpad_buf, v_buf)
        m = _chunk_view(m_buf, (16, nc * th * tw, o))
        for k in range(16):
            blas.product(gemm, v[k], False, u[k], m[k], 0.0)
        out = _chunk_view(out_buf, (nc, 2 * th, 2 * tw, o))
        winograd.output_tiles(m, th, tw, bias, out)
        _to_channels_first(out, 0, 0, n0, y)


@_compiled_when_gemm
def _winograd_grad_weight_chunks(gemm, x, dy, top, left, step, xpad_buf, v_buf, z_buf, dy_buf, du):
    """du[k] += V[k]^T Z[k] over all samples, `step` at a time: the gradient of the weight tiles
    (input tiles V of x padded by top, left; Z the tiles of the output gradient dy)."""
    n, o, ho, wo = dy.shape
    th, tw = winograd.tile_grid(ho, wo)
    for n0 in range(0, n, step):
        nc = min(step, n - n0)
        v = _input_tiles_chunk(x, n0, nc, top, left, th, tw, xpad_buf, v_buf)
        z = _chunk_view(z_buf, (16, nc * th * tw, o))
        dy_last = _chunk_view(dy_buf, (nc, 2 * th, 2 * tw, o))
        _to_channels_last(dy, n0, 0, 0, dy_last)
        winograd.gradient_tiles(dy_last, th, tw, z)
        for k in range(16):
            blas.product(gemm, v[k], True, z[k], du[k], 1.0)


# ---- pooling and upsampling (one parallel task per (n, c) plane) ----------------
@njit(parallel=True, cache=True)
def _max_pool_windows(x, kh, kw, sh, sw, y, argmax):
    """Max pooling without padding, one window after another, its elements in row-major order:
    strictly greater wins, so the first maximum keeps its place, and the first NaN wins over numbers.

    The comparison is written without branches (`|`, `&` and conditional expressions, which LLVM
    turns into selects): on real feature maps a branch on "greater than the best so far" goes
    either way at random, and the mispredictions cost more than the work (the classifier's
    2x2 pools 1.9x faster than the branching version, and than PyTorch's).
    """
    n, c, h, w = x.shape
    _, _, ho, wo = y.shape
    for task in prange(n * c):
        plane, out, where = x[task // c, task % c], y[task // c, task % c], argmax[task // c, task % c]
        for a in range(ho):
            for b in range(wo):
                top, left = a * sh, b * sw
                best, index = plane[top, left], top * w + left
                for i in range(kh):
                    row = plane[top + i]
                    for j in range(kw):
                        v = row[left + j]
                        take = (v > best) | ((v != v) & (best == best))
                        best = v if take else best
                        index = (top + i) * w + left + j if take else index
                out[a, b], where[a, b] = best, index


@njit(parallel=True, cache=True)
def _pool_forward(x, kh, kw, sh, sw, ph, pw, is_max, y, argmax):
    """Max (first maximum, flat index into the plane) or mean (divided by KH*KW) of every window."""
    n, c, h, w = x.shape
    _, _, ho, wo = y.shape
    for task in prange(n * c):
        plane = x[task // c, task % c]
        for a in range(ho):
            for b in range(wo):
                top, left = a * sh - ph, b * sw - pw
                best, best_index, total = -np.inf, -1, 0.0
                for r in range(max(top, 0), min(top + kh, h)):
                    for col in range(max(left, 0), min(left + kw, w)):
                        value = plane[r, col]
                        total += value
                        if best_index < 0 or value > best or (value != value and best == best):  # first NaN wins, as in reference
                            best, best_index = value, r * w + col
                if is_max:
                    y[task // c, task % c, a, b] = best
                    argmax[task // c, task % c, a, b] = best_index
                else:
                    y[task // c, task % c, a, b] = total / (kh * kw)


@njit(parallel=True, cache=True)
def _max_pool_backward(dy, argmax, dx):
    """dx[argmax] += dy, plane by plane (argmax: flat indices into the H*W plane). Each task owns one plane of dx."""
    n, c, h, w = dx.shape
    for task in prange(n * c):
        plane = dx[task // c, task % c].reshape(-1)
        plane[:] = 0
        grad, index = dy[task // c, task % c].reshape(-1), argmax[task // c, task % c].reshape(-1)
        for t in range(grad.size):
            plane[index[t]] += grad[t]


@njit(parallel=True, cache=True)
def _pool_backward(dy, kh, kw, sh, sw, ph, pw, dx):
    """Mean: every window element += dy / (KH*KW). Each task owns one plane of dx."""
    n, c, h, w = dx.shape
    _, _, ho, wo = dy.shape
    for task in prange(n * c):
        plane = dx[task // c, task % c]
        plane[:] = 0
        grad = dy[task // c, task % c]
        for a in range(ho):
            for b in range(wo):
                share = grad[a, b] / (kh * kw)
                top, left = a * sh - ph, b * sw - pw
                for r in range(max(top, 0), min(top + kh, h)):
                    for col in range(max(left, 0), min(left + kw, w)):
                        plane[r, col] += share


def _pool_output(x_shape, kernel, stride, padding):
    n, c, h, w = x_shape
    return (n, c, conv_output_size(h, kernel[0], stride[0], padding[0], 1),
            conv_output_size(w, kernel[1], stride[1], padding[1], 1))


_NO_ARGMAX = np.zeros((1, 1, 1, 1), np.int32)


def max_pool2d(x, kernel, stride, padding):
    """See reference.max_pool2d (argmax: flat index into the H*W plane, int32: half of int64's memory)."""
    x = np.ascontiguousarray(x)
    shape = _pool_output(x.shape, kernel, stride, padding)
    y, argmax = np.empty(shape, x.dtype), np.empty(shape, np.int32)
    if padding == (0, 0):
        _run(_max_pool_windows, x, *kernel, *stride, y, argmax)
    else:
        _run(_pool_forward, x, *kernel, *stride, *padding, True, y, argmax)
    return y, argmax


def max_pool2d_backward(dy, argmax, x_shape, kernel, stride, padding):
    dx = np.empty(x_shape, dy.dtype)
    _run(_max_pool_backward, np.ascontiguousarray(dy), np.ascontiguousarray(argmax, np.int32), dx)
    return dx


def avg_pool2d(x, kernel, stride, padding):
    """See reference.avg_pool2d (count_include_pad=True)."""
    x = np.ascontiguousarray(x)
    y = np.empty(_pool_output(x.shape, kernel, stride, padding), x.dtype)
    _run(_pool_forward, x, *kernel, *stride, *padding, False, y, _NO_ARGMAX)
    return y


def avg_pool2d_backward(dy, x_shape, kernel, stride, padding):
    dx = np.empty(x_shape, dy.dtype)
    _run(_pool_backward, np.ascontiguousarray(dy), *kernel, *stride, *padding, dx)
    return dx


@njit(parallel=True, cache=True)
def _upsample_planes(x, sh, sw, y):
    """y[n, c, i*sh + a, j*sw + b] = x[n, c, i, j]: each input row widened once, then copied sh times."""
    n, c, h, w = x.shape
    for task in prange(n * c):
        src, dst = x[task // c, task % c], y[task // c, task % c]
        for i in range(h):
            wide = dst[i * sh]
            for j in range(w):
                wide[j * sw : (j + 1) * sw] = src[i, j]
            for a in range(1, sh):
                dst[i * sh + a] = wide


@njit(parallel=True, cache=True)
def _upsample_planes_backward(dy, sh, sw, dx):
    """dx[n, c, i, j] = the sum of dy's sh x sw block at (i*sh, j*sw)."""
    n, c, h, w = dx.shape
    for task in prange(n * c):
        src, dst = dy[task // c, task % c], dx[task // c, task % c]
        for i in range(h):
            out = dst[i]
            out[:] = 0
            for a in range(sh):
                row = src[i * sh + a]
                for j in range(w):
                    for b in range(sw):
                        out[j] += row[j * sw + b]


def upsample_nearest2d(x, scale):
    """See reference.upsample_nearest2d (NumPy's broadcast copy of the same took 2-3x as long)."""
    n, c, h, w = x.shape
    sh, sw = scale
    y = np.empty((n, c, h * sh, w * sw), x.dtype)
    _run(_upsample_planes, np.ascontiguousarray(x), sh, sw, y)
    return y


def upsample_nearest2d_backward(dy, scale):
    """See reference.upsample_nearest2d_backward (NumPy's strided sum over the blocks: 5-10x as long)."""
    n, c, h, w = dy.shape
    sh, sw = scale
    dx = np.empty((n, c, h // sh, w // sw), dy.dtype)
    _run(_upsample_planes_backward, np.ascontiguousarray(dy), sh, sw, dx)
    return dx


# ---- exp in SIMD-friendly arithmetic ---------------------------------------------
# math.exp compiles to a call per element; LLVM cannot vectorise it (NumPy's own
# exp is SIMD). Softmax, attention and the activations spend most of their time in
# exp, so here is one LLVM can vectorise: e^x = 2^k e^r with k = round(x / ln 2),
# |r| <= ln(2)/2, e^r by its Taylor polynomial (_exp_poly: a few units in the last
# place), and 2^k made by writing k + bias into the exponent bits of a float
# (_float_from_bits: a bit cast, no arithmetic). Being plain arithmetic, _exp inlines
# into any loop, and the loop vectorises with it: a SiLU is one pass over memory.
_LOG2E, _LN2_HI, _LN2_LO = 1.4426950408889634, 0.693145751953125, 1.42860682030941723212e-6
_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(14))
_TAYLOR_DEGREE = {np.float32: 7, np.float64: 13}  # |r|^(d+1) / (d+1)! <= 5e-9 (float32), 3e-17 (float64)


def _exp_poly(r):
    """e^r for |r| <= ln(2) / 2 by Horner's rule on its Taylor polynomial, of the degree r's float
    type needs (_TAYLOR_DEGREE): in float32 half the multiply-adds of float64's (activations and
    softmax 10-20% faster). Compiled by Numba through the overload below."""
    degree = _TAYLOR_DEGREE[np.float64 if isinstance(r, float) else type(r)]
    p = _TAYLOR[degree]
    for c in _TAYLOR[degree - 1 :: -1]:
        p = p * r + c
    return p


@overload(_exp_poly)
def _exp_poly_compiled(r):
    t = np.float32 if r == types.float32 else np.float64
    top, rest = _TAYLOR[_TAYLOR_DEGREE[t]], _TAYLOR[_TAYLOR_DEGREE[t] - 1 :: -1]

    def compiled(r):
        p = t(top)
        for k in range(len(rest)):  # a constant trip count: LLVM unrolls it
            p = p * r + t(rest[k])
        return p

    return compiled


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float whose bits are the integer `bits` (int32 -> float32, int64 -> float64), as a C union
    would read them: one LLVM bitcast, which vectorises."""
    float_type = types.float32 if bits.bitwidth == 32 else types.float64

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(float_type))

    return float_type(bits), codegen


@intrinsic
def _float_max(typingctx, a, b):
    """max(a, b) of two floats of one type by LLVM's maxnum (IEEE maxNum: a NaN operand loses), which,
    unlike Python's max, LLVM vectorises in reductions."""

    def codegen(context, builder, signature, args):
        kind = args[0].type
        name = "llvm.maxnum.f32" if a == types.float32 else "llvm.maxnum.f64"
        return builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(kind, [kind, kind]), name), args)

    return a(a, b), codegen


# per float type: the integer of its size, mantissa bits, exponent bias, and the x below which e^x
# is subnormal (returned as 0)
_EXP_FORMAT = {np.float32: (np.int32, 23, 127, -87.0), np.float64: (np.int64, 52, 1023, -708.0)}


def _exp(x):
    """e^x for x <= 88 (float32) / 709 (float64); compiled, 0 below the normal range (-inf -> 0) and
    nan stays nan. Here in Python for reading (ldexp makes 2^k); Numba compiles the overload below."""
    k = math.floor(x * _LOG2E + 0.5)
    return math.ldexp(_exp_poly((x - k * _LN2_HI) - k * _LN2_LO), k)


@overload(_exp)
def _exp_compiled(x):
    t = np.float32 if x == types.float32 else np.float64
    it, mantissa, bias, lowest = _EXP_FORMAT[t]

    def compiled(x):
        v = max(x, t(lowest))
        k = np.floor(v * t(_LOG2E) + t(0.5))  # np.floor keeps x's float type
        r = (v - k * t(_LN2_HI)) - k * t(_LN2_LO)
        two_to_k = _float_from_bits(it((it(k) + it(bias)) << it(mantissa)))  # Numba widens int32 sums: it(...)
        return _exp_poly(r) * two_to_k if x >= t(lowest) else (t(0.0) if x < t(lowest) else x)

    return compiled


@njit(cache=True, fastmath=_FAST, inline="always")
def _exp_into(src, shift, dst, n):
    """dst[:n] <- exp(src[:n] - shift), returning their sum (src may be dst)."""
    offset = src.dtype.type(shift)
    for j in range(n):
        dst[j] = _exp(src[j] - offset)
    total = 0.0
    for j in range(n):
        total += dst[j]
    return total


@njit(cache=True)
def _block_rows(block, blocks, rows):
    """The rows [first, last) of parallel block `block` out of `blocks`."""
    return block * rows // blocks, (block + 1) * rows // blocks


# ---- normalisation: rows normalised over their length, then an affine map ---------
# Layer norm of x (M, D) works on rows of length D, with the (D,) weight and bias.
# Group norm of x (N, C, *spatial) works on rows (n, g) of C/G channels x S positions,
# channel by channel: the per-channel weight and bias are read once per channel, and in
# the backward pass two sums per channel replace per-element weight-gradient updates
# (half the time at (128,64,16,16)); for layer norm, whose "channels" are single
# elements, that layout is 7x slower.


@njit(parallel=True, cache=True, fastmath=_FAST)
def _norm_forward(x, w, b, eps, y, mean, rstd):
    """Layer norm: y = (x - mean) * rstd * w + b over each row of x (M, D); w, b (D,)."""
    rows, length = x.shape
    for r in prange(rows):
        row, out = x[r], y[r]
        mu = 0.0
        for l in range(length):
            mu += row[l]
        mu /= length
        var = 0.0
        for l in range(length):
            var += (row[l] - mu) * (row[l] - mu)
        inv = 1.0 / math.sqrt(var / length + eps)
        mean[r], rstd[r] = mu, inv
        m, s = row.dtype.type(mu), row.dtype.type(inv)
        for l in range(length):
            out[l] = (row[l] - m) * s * w[l] + b[l]


@njit(parallel=True, cache=True, fastmath=_FAST)
def _norm_backward(dy, x, mean, rstd, w, blocks, dx, dscale, dshift):
    """Layer norm backward: dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) with dxhat = dy * w;
    dscale[block] / dshift[block] (D,): sums of dy * xhat and dy over the block's rows."""
    rows, length = x.shape
    for block in prange(blocks):
        first, last = _block_rows(block, blocks, rows)
        dw, db = dscale[block], dshift[block]
        for r in range(first, last):
            m, s = x.dtype.type(mean[r]), x.dtype.type(rstd[r])
            sum_d, sum_dx = 0.0, 0.0
            for l in range(length):
                xhat = (x[r, l] - m) * s
                d = dy[r, l]
                sum_d += d * w[l]
                sum_dx += d * w[l] * xhat
                dw[l] += d * xhat
                db[l] += d
            a, c = x.dtype.type(sum_d / length), x.dtype.type(sum_dx / length)
            for l in range(length):
                xhat = (x[r, l] - m) * s
                dx[r, l] = s * (dy[r, l] * w[l] - a - xhat * c)


@njit(parallel=True, cache=True, fastmath=_FAST)
def _group_norm_forward_rows(x, weight, bias, eps, with_silu, y, mean, rstd):
    """Group norm on rows (n, g) of x (N*G, K, S): K channels of S positions; weight, bias (G, K).

    mean and rstd = 1 / sqrt(var + eps) over the row's K*S values, then channel by channel
    y = (x - mean) * (rstd * w[k]) + b[k], or silu of it (with_silu): the per-channel parameters
    are read once per channel.
    Each channel's sums are taken in x's dtype (vectorised: 16 float32 lanes, not 8 float64 ones;
    2.5x faster for 16 positions), the row's sum of them in float64.
    """
    rows, channels, positions = x.shape
    groups, size = weight.shape[0], channels * positions
    zero = x.dtype.type(0)
    for r in prange(rows):
        g, row = r % groups, x[r]
        mu = 0.0
        for k in range(channels):
            s = zero
            for p in range(positions):
                s += row[k, p]
            mu += s
        mu /= size
        m = x.dtype.type(mu)
        var = 0.0
        for k in range(channels):
            s = zero
            for p in range(positions):
                s += (row[k, p] - m) * (row[k, p] - m)
            var += s
        inv = 1.0 / math.sqrt(var / size + eps)
        mean[r], rstd[r] = mu, inv
        for k in range(channels):
            a, b = x.dtype.type(inv * weight[g, k]), bias[g, k]
            src, out = row[k], y[r, k]
            if with_silu:
                for p in range(positions):
                    out[p] = _activation(_SILU, (src[p] - m) * a + b)[0]
            else:
                for p in range(positions):
                    out[p] = (src[p] - m) * a + b


@njit(parallel=True, cache=True, fastmath=_FAST)
def _group_norm_backward_rows(dy, x, mean, rstd, weight, bias, with_silu, blocks, dx, dweight, dbias):
    """Group norm backward on rows (n, g) of x (N*G, K, S): K channels of S positions; weight, bias (G, K).

    Per channel, two sums: sd = sum dy and sdx = sum dy xhat = rstd (sum dy x - mean sd).
    They give the weight and bias gradients (dweight[block, g, k] += sdx, dbias += sd) and
    the row means of dxhat = dy w and of dxhat xhat, so dx needs one more pass:
    dx = rstd (dy w - mean(dxhat) - xhat mean(dxhat xhat)).
    with_silu: dy is the gradient of silu(y), y = xhat w + b; it becomes silu'(y) dy (y rebuilt
    on the fly) in a scratch row, which stays in the cache for both passes.
    """
    rows, channels, positions = x.shape
    groups = weight.shape[0]
    for block in prange(blocks):
        first, last = _block_rows(block, blocks, rows)
        scratch = np.empty((channels if with_silu else 0, positions), x.dtype)
        for r in range(first, last):
            g = r % groups
            m, s = mean[r], rstd[r]
            mt, st = x.dtype.type(m), x.dtype.type(s)
            if with_silu:
                for k in range(channels):
                    scale, shift, src, d_in, d_out = st * weight[g, k], bias[g, k], x[r, k], dy[r, k], scratch[k]
                    for p in range(positions):
                        d_out[p] = d_in[p] * _activation(_SILU, (src[p] - mt) * scale + shift)[1]
            _group_norm_backward_row(scratch if with_silu else dy[r], x[r], m, s, weight[g], dx[r],
                                     dweight[block, g], dbias[block, g])


@njit(cache=True, fastmath=_FAST, inline="always")
def _group_norm_backward_row(dy, x, m, s, weight, dx, dweight, dbias):
    """One row of _group_norm_backward_rows: dy, x, dx (K, S); weight, dweight, dbias (K,)."""
    channels, positions = x.shape
    sum_d, sum_dx = 0.0, 0.0
    for k in range(channels):
        sd, sdx_raw = 0.0, 0.0
        for p in range(positions):
            d = dy[k, p]
            sd += d
            sdx_raw += d * x[k, p]
        sdx = s * (sdx_raw - m * sd)
        dweight[k] += sdx
        dbias[k] += sd
        sum_d += weight[k] * sd
        sum_dx += weight[k] * sdx
    a = x.dtype.type(sum_d / (channels * positions))
    c = x.dtype.type(sum_dx / (channels * positions))
    mt, st = x.dtype.type(m), x.dtype.type(s)
    for k in range(channels):
        wk = weight[k]
        for p in range(positions):
            xhat = (x[k, p] - mt) * st
            dx[k, p] = st * (dy[k, p] * wk - a - xhat * c)


def _row_param(param, length, fill, dtype):
    """A (D,) parameter (a norm's scale or shift, a convolution's bias) in x's dtype, or `fill` everywhere
    when there is none."""
    return np.full(length, fill, dtype) if param is None else np.asarray(param, dtype)


def group_norm(x, num_groups, weight, bias, eps, with_silu=False):
    """See reference.group_norm."""
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels (input shape {x.shape}) are not divisible by {num_groups} groups")
    x3 = np.ascontiguousarray(x).reshape(n * num_groups, c // num_groups, -1)
    per_group = lambda param, fill: np.ascontiguousarray(  # noqa: E731
        np.full(c, fill, x.dtype) if param is None else np.asarray(param, x.dtype)).reshape(num_groups, -1)
    y, mean, rstd = np.empty_like(x3), np.empty(x3.shape[0], x.dtype), np.empty(x3.shape[0], x.dtype)
    _run(_group_norm_forward_rows, x3, per_group(weight, 1), per_group(bias, 0), eps, with_silu, y, mean, rstd)
    return y.reshape(x.shape), mean.reshape(n, num_groups), rstd.reshape(n, num_groups)


def group_norm_backward(dy, x, mean, rstd, weight, num_groups, bias=None, with_silu=False):
    n, c = x.shape[:2]
    x3 = np.ascontiguousarray(x).reshape(n * num_groups, c // num_groups, -1)
    w = np.ones(c, x.dtype) if weight is None else np.asarray(weight, x.dtype)
    b = np.zeros(c, x.dtype) if bias is None else np.asarray(bias, x.dtype)
    blocks = min(x3.shape[0], get_num_threads())  # one partial sum of the (G, C/G) gradients per thread
    dx = np.empty(x.shape, x.dtype)
    dweight, dbias = np.zeros((2, blocks, num_groups, c // num_groups))
    _run(_group_norm_backward_rows, np.ascontiguousarray(dy, x.dtype).reshape(x3.shape), x3,
         mean.reshape(-1).astype(np.float64), rstd.reshape(-1).astype(np.float64),
         np.ascontiguousarray(w.reshape(num_groups, -1)), np.ascontiguousarray(b.reshape(num_groups, -1)), with_silu,
         blocks, dx.reshape(x3.shape), dweight, dbias)
    if weight is None:
        return dx, None, None
    return dx, dweight.sum(axis=0).reshape(c).astype(x.dtype), dbias.sum(axis=0).reshape(c).astype(x.dtype)


def layer_norm(x, weight, bias, eps):
    """See reference.layer_norm."""
    x = np.ascontiguousarray(x)
    y, mean, rstd = np.empty_like(x), np.empty(x.shape[0], x.dtype), np.empty(x.shape[0], x.dtype)
    d = x.shape[1]
    _run(_norm_forward, x, _row_param(weight, d, 1, x.dtype), _row_param(bias, d, 0, x.dtype), eps, y, mean, rstd)
    return y, mean, rstd


def layer_norm_backward(dy, x, mean, rstd, weight):
    x = np.ascontiguousarray(x)
    blocks = min(x.shape[0], get_num_threads())  # one partial sum of the (D,) gradients per thread
    dx = np.empty_like(x)
    dscale, dshift = np.zeros((2, blocks, x.shape[1]), x.dtype)
    _run(_norm_backward, np.ascontiguousarray(dy, x.dtype), x, mean.reshape(-1), rstd.reshape(-1),
         _row_param(weight, x.shape[1], 1, x.dtype), blocks, dx, dscale, dshift)
    if weight is None:
        return dx, None, None
    return dx, dscale.sum(axis=0), dshift.sum(axis=0)


# ---- softmax over rows -------------------------------------------------------------
@njit(cache=True, nogil=True, fastmath=True)
def _max_of(row):
    """The largest value of a 1-D float array (-inf if empty), for softmax's shift.

    Python's max keeps NaN, and LLVM does not vectorise that; _float_max (IEEE maxNum, which drops a
    NaN), compiled with every fastmath flag, it does: 0.72 -> 0.17 ms for 16,384 rows of 64 keys. A
    NaN then may not reach the maximum, but it still makes its row's sum, and so every value of the
    softmax row, NaN."""
    m = row.dtype.type(-np.inf)
    for j in range(row.size):
        m = _float_max(m, row[j])
    return m


@njit(parallel=True, cache=True, fastmath=_FAST)
def _softmax_rows(x, log, y):
    """softmax (or log_softmax when `log`) of every row of x (R, L): y = exp(x - max) / sum."""
    rows, length = x.shape
    for r in prange(rows):
        row, out = x[r], y[r]
        m = _max_of(row)
        total = _exp_into(row, m, out, length)
        if log:  # (x - m) - log(total) as two passes: exact where x == m (fastmath may not merge them)
            for l in range(length):
                out[l] = row[l] - m
            log_total = row.dtype.type(math.log(total))
            for l in range(length):
                out[l] -= log_total
        else:
            inv = row.dtype.type(1.0 / total)
            for l in range(length):
                out[l] *= inv


@njit(parallel=True, cache=True, fastmath=_FAST)
def _softmax_rows_backward(dy, y, log, dx):
    """softmax: dx = y (dy - sum(dy y));  log_softmax: dx = dy - exp(y) sum(dy)."""
    rows, length = y.shape
    for r in prange(rows):
        total = 0.0
        for l in range(length):
            total += dy[r, l] if log else dy[r, l] * y[r, l]
        t = y.dtype.type(total)
        for l in range(length):
            dx[r, l] = dy[r, l] - _exp(y[r, l]) * t if log else y[r, l] * (dy[r, l] - t)


def _as_rows(x, axis):
    """Move `axis` last and flatten the rest: a contiguous (R, L) array."""
    return np.ascontiguousarray(np.moveaxis(x, axis, -1)).reshape(-1, x.shape[axis])


def _from_rows(rows, like, axis):
    moved = np.moveaxis(like, axis, -1).shape
    return np.moveaxis(rows.reshape(moved), -1, axis)


def _softmax(x, axis, log):
    rows = _as_rows(x, axis)
    out = np.empty_like(rows)
    _run(_softmax_rows, rows, log, out)
    return _from_rows(out, x, axis)


def _softmax_backward(dy, y, axis, log):
    rows = _as_rows(y, axis)
    dx = np.empty_like(rows)
    _run(_softmax_rows_backward, _as_rows(dy.astype(y.dtype, copy=False), axis), rows, log, dx)
    return _from_rows(dx, y, axis)


def softmax(x, axis):
    """See reference.softmax."""
    return _softmax(x, axis, False)


def softmax_backward(dy, y, axis):
    return _softmax_backward(dy, y, axis, False)


def log_softmax(x, axis):
    """See reference.log_softmax."""
    return _softmax(x, axis, True)


def log_softmax_backward(dy, y, axis):
    return _softmax_backward(dy, y, axis, True)


# ---- attention: BLAS for the products, Numba for the fused softmax ----------------
# A block of scores at a time: S = Q K^T by one batched GEMM into a buffer that
# stays in cache, a Numba pass turns the scores into probabilities in place
# (scale, mask, causal, softmax, log-sum-exp), and another GEMM gives P V. The
# (B, H, Sq, Sk) probabilities never exist in full; backward recomputes each
# block's P from the saved lse. A block is a few whole (entry, head) items when
# their scores fit _ATTENTION_CHUNK_BYTES, else a band of queries of one item of up
# to _ATTENTION_BAND_BYTES (the softmax is per query, so a band needs nothing
# from the other rows): Stable Diffusion's 4,096 x 4,096 scores per head are
# 64 MiB, and each pass over them went to memory. Bands of 1-16 MiB ran
# alike on one thread; the larger made fewer BLAS calls and ran faster on
# two (smaller bands make BLAS pack all of K and V again for fewer rows).
# Blocks of items run one after another, each BLAS call on all threads;
# bands are shared out among the threads (see attention).
_ATTENTION_CHUNK_BYTES = 1 << 20
_ATTENTION_BAND_BYTES = 16 << 20


@njit(cache=True)
def _visible_keys(i, sk, is_causal):
    """Number of keys query i sees: all, or j <= i when causal (top-left aligned)."""
    return min(sk, i + 1) if is_causal else sk


@njit(cache=True, fastmath=_FAST, nogil=True)
def _scaled_logits(s, b0, i0, mask, has_mask, scale, is_causal):
    """In place: s[b, i, j] <- scale * s + mask, and -inf for the keys query i does not see.

    s is the block of batch items b0 + b and queries i0 + i.
    """
    chunk, sq, sk = s.shape
    for b in range(chunk):
        for i in range(sq):
            row = s[b, i]
            visible = _visible_keys(i0 + i, sk, is_causal)
            for j in range(visible):
                row[j] *= scale
            if has_mask:
                mask_row = mask[(b0 + b) % mask.shape[0], i0 + i]
                for j in range(visible):
                    row[j] += mask_row[j]
            row[visible:] = -np.inf


@njit(cache=True, nogil=True)
def _row_maxima(s, maxima):
    """maxima[b, i] = max_j s[b, i, j]."""
    chunk, sq, sk = s.shape
    for b in range(chunk):
        for i in range(sq):
            maxima[b, i] = _max_of(s[b, i])


@njit(cache=True, fastmath=_FAST, nogil=True)
def _shift_rows(s, b0, i0, scale, shift):
    """In place: s[b, i, :] <- scale * s[b, i, :] - shift[b0 + b, i0 + i]; a row whose shift is -inf becomes -inf."""
    chunk, sq, sk = s.shape
    for b in range(chunk):
        for i in range(sq):
            row, m = s[b, i], shift[b0 + b, i0 + i]
            if m == -np.inf:
                row[:] = -np.inf
                continue
            for j in range(sk):
                row[j] = scale * row[j] - m


@njit(cache=True, fastmath=_FAST, nogil=True)
def _exp_in_place(a):
    """a <- exp(a) over a flat array: one vectorised loop (NumPy's exp took 1.6x as long)."""
    for t in range(a.size):
        a[t] = _exp(a[t])


@njit(cache=True, fastmath=_FAST, nogil=True)
def _row_sums(s, sums):
    """sums[b, i] = sum_j s[b, i, j], accumulated in float64."""
    chunk, sq, sk = s.shape
    for b in range(chunk):
        for i in range(sq):
            total, row = 0.0, s[b, i]
            for j in range(sk):
                total += row[j]
            sums[b, i] = total


def _exponentials(s, b0, i0, mask, has_mask, scale, is_causal, shift, find_max, sums):
    """In place: s[b, i, j] <- exp(logit - m_bi) with logit = scale * s + mask (-inf for the keys query i
    does not see); sums[b, i] = sum_j (when find_max). A row that sees no key becomes 0.

    find_max: m_bi is the row's largest logit, stored in shift[b0 + b, i0 + i]; else m_bi =
    shift[b0 + b, i0 + i] (the saved log-sum-exp: the exponentials are then the probabilities).
    Without a mask the scale rides along in the shift pass and the maximum is taken from the raw
    scores (scale > 0). Three passes over the block: the shift (per row), exp (flat: one vectorised
    loop, whatever the row length), the sums (per row).
    """
    prescale = has_mask or is_causal or not scale > 0
    if prescale:
        _scaled_logits(s, b0, i0, mask, has_mask, scale, is_causal)
    factor = s.dtype.type(1 if prescale else scale)
    if find_max:
        maxima = shift[b0 : b0 + s.shape[0], i0 : i0 + s.shape[1]]
        _row_maxima(s, maxima)
        maxima *= factor
    _shift_rows(s, b0, i0, factor, shift)
    _exp_in_place(s.reshape(-1))
    if find_max:
        _row_sums(s, sums)


@njit(cache=True, nogil=True)
def _divide_rows(out, sums, lse, b0, h0, i0):
    """out[b0 + b, h0 + h, i0 + i, :] /= sums[b, h, i] and lse[...] += log(sums[b, h, i]) over a block: the
    softmax's normalisation, applied to P V instead of P (rows of the head width, not of the key count);
    a zero sum gives lse = -inf. (Whole arrays and offsets: a contiguous out compiles as such.)"""
    chunk, heads, sq = sums.shape
    for b in range(chunk):
        for h in range(heads):
            for i in range(sq):
                total = sums[b, h, i]
                if total > 0:
                    inv = out.dtype.type(1.0 / total)
                    for e in range(out.shape[3]):
                        out[b0 + b, h0 + h, i0 + i, e] *= inv
                    lse[b0 + b, h0 + h, i0 + i] += math.log(total)
                else:
                    lse[b0 + b, h0 + h, i0 + i] = -np.inf


@njit(cache=True, fastmath=_FAST)
def _probabilities_backward(p, dp, dout, out, b0, h0, i0, heads, scale):
    """In place: dp <- ds = scale * p * (dp - dout . out), row by row of a block: p, dp (items, Sq, Sk),
    item t the head h0 + t % heads of entry b0 + t // heads, queries from i0, in dout and out (B, H, Sq, Dv)."""
    chunk, sq, sk = p.shape
    for t in range(chunk):
        b, h = b0 + t // heads, h0 + t % heads
        for i in range(sq):
            row, grad = p[t, i], dp[t, i]
            row_dot = 0.0
            for e in range(dout.shape[3]):
                row_dot += dout[b, h, i0 + i, e] * out[b, h, i0 + i, e]
            d = grad.dtype.type(row_dot)
            for j in range(sk):
                grad[j] = scale * row[j] * (grad[j] - d)


def _attention_mask(mask, dtype):
    """The (1 or B * H, Sq, Sk) mask, or a dummy, and whether there is one (one compiled kernel for both)."""
    if mask is None:
        return np.zeros((1, 1, 1), dtype), False
    return np.ascontiguousarray(mask, dtype), True


def _attention_blocks(q, k):
    """The blocks (b0, b1, h0, h1, i0, i1) of batch entries, heads and queries, and the largest block's
    number of scores: whole entries (all heads) whose scores fit _ATTENTION_CHUNK_BYTES, else a few
    heads of one entry, else bands of queries of one head of _ATTENTION_BAND_BYTES (at least one row).
    A block's items b * H + h are consecutive: the Numba passes index lse and the mask by item."""
    batch, heads, sq, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    items = _ATTENTION_CHUNK_BYTES // max(1, sq * sk * q.itemsize)  # (entry, head) items that fit
    if items >= heads:
        step = max(1, items // max(1, heads))
        return [(b0, min(batch, b0 + step), 0, heads, 0, sq) for b0 in range(0, batch, step)], step * heads * sq * sk
    if items:
        return [(b, b + 1, h0, min(heads, h0 + items), 0, sq) for b in range(batch)
                for h0 in range(0, heads, items)], items * sq * sk
    rows = min(sq, max(1, _ATTENTION_BAND_BYTES // max(1, sk * q.itemsize)))
    return [(b, b + 1, h, h + 1, i0, min(sq, i0 + rows)) for b in range(batch) for h in range(heads)
            for i0 in range(0, sq, rows)], rows * sk


def _empty_laid_out_as(a, shape):
    """An uninitialised (B, H, S, E) array laid out as a is: (B, S, H, E) in memory when a is the heads
    of a projection seen as (B, H, S, E), so that merging the heads back ((B, S, H * E)) and, for
    gradients, the projection's backward need no copy; else C-contiguous."""
    b, h, s, e = shape
    if h > 1 and a.strides[1] < a.strides[2]:
        return np.empty((b, s, h, e), a.dtype).transpose(0, 2, 1, 3)
    return np.empty(shape, a.dtype)


def attention(q, k, v, mask, scale, is_causal):
    """See reference.attention. Per block of scores: S = Q K^T (BLAS), exponentials in place (Numba),
    out = (E V) / row sums (BLAS, then a pass over the small output); lse = m + log(row sum).

    q, k, v may be strided views, as the heads of a projection (B, S, H * D) seen as (B, H, S, D) are:
    BLAS reads each head's rows with their stride, and out is laid out as q is (_empty_laid_out_as),
    so neither splitting nor merging the heads copies (29 ms of a 390 ms UNet sampling step did).

    Bands of queries (long sequences) are shared out among threads, each running its blocks
    with single-threaded BLAS and Numba (_in_threads): every block writes its own rows of out
    and lse. At Stable Diffusion's 4,096 tokens (16 heads of 40) this took 0.37 s against
    0.55 s for one block after another with both threads inside each BLAS call and each pass.
    """
    (_, heads, sq, _), sk = q.shape, k.shape[2]
    out = _empty_laid_out_as(q, q.shape[:3] + v.shape[3:])
    lse = np.empty(q.shape[:3], q.dtype)
    item_lse = lse.reshape(-1, sq)  # lse by item b * H + h, as the Numba passes index it
    mask, has_mask = _attention_mask(mask, q.dtype)
    blocks, size = _attention_blocks(q, k)
    scale, is_causal = q.dtype.type(scale), bool(is_causal)

    def run(blocks):
        buffer, sums = np.empty(size, q.dtype), np.empty(size // max(1, sk), np.float64)
        for b0, b1, h0, h1, i0, i1 in blocks:
            shape = (b1 - b0, h1 - h0, i1 - i0)
            s = buffer[: math.prod(shape) * sk].reshape(shape + (sk,))
            row_sums = sums[: math.prod(shape)].reshape(shape)
            np.matmul(q[b0:b1, h0:h1, i0:i1], k[b0:b1, h0:h1].swapaxes(2, 3), out=s)
            _exponentials(s.reshape(-1, i1 - i0, sk), b0 * heads + h0, i0, mask, has_mask, scale, is_causal,
                          item_lse, True, row_sums.reshape(-1, i1 - i0))
            np.matmul(s, v[b0:b1, h0:h1], out=out[b0:b1, h0:h1, i0:i1])
            _divide_rows(out, row_sums, lse, b0, h0, i0)

    if size * q.itemsize > _ATTENTION_CHUNK_BYTES:  # bands of queries
        _in_threads(run, blocks)
    else:
        run(blocks)
    return out, lse


_THREADS = {}  # the worker pool and threadpoolctl's controller, made on first use


def _in_threads(run, items):
    """run(items[t::T]) on T = get_num_threads() threads at once, each thread's BLAS and Numba on one
    thread (numba.set_num_threads is per thread; BLAS is limited through threadpoolctl while they run).
    run's NumPy products and Numba kernels (nogil) release the GIL. One thread, or no threadpoolctl:
    run(items) here."""
    workers = get_num_threads()
    threads = min(workers, len(items))
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        threads = 1
    if threads < 2:
        return run(items)
    if _THREADS.get("size") != workers:  # a new pool only when set_num_threads changed the count
        if "pool" in _THREADS:
            _THREADS["pool"].shutdown(wait=False)
        _THREADS.update(size=workers, pool=ThreadPoolExecutor(workers, thread_name_prefix="tinysd"),
                        blas=_THREADS.get("blas") or ThreadpoolController())

    def one_thread(t):
        set_num_threads(1)
        run(items[t::threads])

    with _THREADS["blas"].limit(limits=1, user_api="blas"):
        futures = [_THREADS["pool"].submit(one_thread, t) for t in range(threads)]
        wait(futures)  # all of them, before BLAS gets its threads back, even when one failed
    for done in futures:
        done.result()  # raises the first failure


def attention_backward(dout, q, k, v, out, lse, mask, scale, is_causal):
    """See reference.attention_backward: each block's probabilities are rebuilt from lse.

    A band of queries adds its share to dk and dv (the keys see every band); dq's rows are its own.
    The inputs may be strided views (see attention); dq, dk and dv are laid out as q, k and v are.
    """
    dout, q, k, v, out = (np.asarray(a, q.dtype) for a in (dout, q, k, v, out))
    (_, heads, sq, _), sk = q.shape, k.shape[2]
    item_lse = np.ascontiguousarray(lse, q.dtype).reshape(-1, sq)
    mask, has_mask = _attention_mask(mask, q.dtype)
    blocks, size = _attention_blocks(q, k)
    buffers = np.empty(2 * size, q.dtype)
    row_sums = np.empty(size // max(1, sk), np.float64)  # unused here: the rows sum to 1
    banded = bool(blocks) and blocks[0][5] - blocks[0][4] < sq
    dq, dk, dv = (_empty_laid_out_as(a, a.shape) for a in (q, k, v))
    if banded:
        dk[:], dv[:] = 0, 0
    share = np.empty((sk, max(k.shape[3], v.shape[3])), q.dtype) if banded else None
    for b0, b1, h0, h1, i0, i1 in blocks:
        shape = (b1 - b0, h1 - h0, i1 - i0, sk)
        n = math.prod(shape)
        s, dp = buffers[:n].reshape(shape), buffers[size : size + n].reshape(shape)
        np.matmul(q[b0:b1, h0:h1, i0:i1], k[b0:b1, h0:h1].swapaxes(2, 3), out=s)
        np.matmul(dout[b0:b1, h0:h1, i0:i1], v[b0:b1, h0:h1].swapaxes(2, 3), out=dp)
        # the probabilities, rebuilt from the saved lse
        items = s.reshape(-1, i1 - i0, sk)
        _exponentials(items, b0 * heads + h0, i0, mask, has_mask, q.dtype.type(scale), bool(is_causal), item_lse,
                      False, row_sums[: n // sk].reshape(-1, i1 - i0))
        _probabilities_backward(items, dp.reshape(items.shape), dout, out, b0, h0, i0, h1 - h0, q.dtype.type(scale))
        np.matmul(dp, k[b0:b1, h0:h1], out=dq[b0:b1, h0:h1, i0:i1])
        if not banded:
            np.matmul(s.swapaxes(2, 3), dout[b0:b1, h0:h1], out=dv[b0:b1, h0:h1])
            np.matmul(dp.swapaxes(2, 3), q[b0:b1, h0:h1], out=dk[b0:b1, h0:h1])
            continue
        for grad, left, right in ((dv, s, dout), (dk, dp, q)):  # one head's band: its share of the keys' grads
            part = share[:, : right.shape[3]]
            np.matmul(left[0, 0].T, right[b0, h0, i0:i1], out=part)
            grad[b0, h0] += part
    return dq, dk, dv


# ---- activations: one fused pass, exp through the SIMD-friendly _exp ---------------
# silu and both gelus are built from one exponential per element:
#   silu(x)      = x s,          s = sigmoid(x) = 1 / (1 + e^-x)
#   gelu_tanh(x) = x s,          s = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
#                                (since (1 + tanh u) / 2 = sigmoid(2u))
#   gelu(x)      = x Phi(x),     Phi(x) = 1 - erfc(x / sqrt 2) / 2 for x >= 0 (mirrored below 0)
# with erfc(z) ~ t exp(-z^2 + P(t)), t = 1 / (1 + z/2), P the degree-9 Chebyshev fit of
# Numerical Recipes (relative error < 1.2e-7: float32 only; float64 uses libm's erf).
# math.exp / math.erf in a Numba ufunc are one library call per element, slower even than
# NumPy. Measured for (256, 16, 32, 32) in float32, one thread: silu forward 3.8 ms with
# exp as a separate pass over runs of 512 (2^k through an integer scratch array), 2.1 ms
# as one loop with _exp inlined (PyTorch 2.0); backward 4.2 -> 2.5 ms (PyTorch 2.9).
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = 0.044715
_ERFC_FIT = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
             0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277)  # P(t), lowest power first
_SILU, _GELU_TANH, _GELU_ERF = 0, 1, 2


@njit(cache=True, fastmath=_FAST, inline="always")
def _sigmoid_gate(kind, x):
    """silu or gelu_tanh at x: (x s, d(x s)/dx) with s = sigmoid(a(x)), a(x) = x (silu) or 2u (gelu_tanh)."""
    t = type(x)
    slope = t(1.0) if kind == _SILU else t(0.0)
    cubic = t(1.0) - slope
    a = slope * x + cubic * t(2.0 * _SQRT_2_OVER_PI) * (x + t(_TANH_C) * x * x * x)
    highest = t(88.0) if t is np.float32 else t(709.0)  # _exp's range; s ~ 0 beyond it anyway
    s = t(1.0) / (t(1.0) + _exp(min(-a, highest)))
    da = slope + cubic * t(2.0 * _SQRT_2_OVER_PI) * (t(1.0) + t(3.0 * _TANH_C) * x * x)
    return x * s, s + x * s * (t(1.0) - s) * da  # d/dx [x sigmoid(a(x))] = s + x s (1 - s) a'(x)


@njit(cache=True, fastmath=_FAST, inline="always")
def _gelu_erf(x):
    """gelu (erf) at x in float32: (x Phi(x), Phi(x) + x phi(x)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    t = type(x)
    z = abs(x) * t(_INV_SQRT_2)
    tt = t(1.0) / (t(1.0) + t(0.5) * z)
    p = t(_ERFC_FIT[9])
    for c in _ERFC_FIT[8::-1]:
        p = p * tt + t(c)
    half_erfc = t(0.5) * tt * _exp(p - z * z)  # erfc(z) / 2 = t exp(P(t) - z^2) / 2
    cdf = t(1.0) - half_erfc if x >= 0 else half_erfc
    return x * cdf, cdf + x * _exp(t(-0.5) * x * x) * t(_INV_SQRT_2PI)


@njit(cache=True, fastmath=_FAST, inline="always")
def _activation(kind, x):
    """(act(x), act'(x)) of one element; inlined, so the compiler drops whichever its caller does not use."""
    if kind == _GELU_ERF:
        return _gelu_erf(x)
    return _sigmoid_gate(kind, x)


def _activation_kernels(kind):
    """The two parallel kernels of one activation `kind`, compiled for it alone.

    `kind` is a constant of the closure, so Numba drops the other activations' code before it
    compiles: with `kind` an argument, every kernel carried all three activations inlined, and
    the GEGLU kernel alone took 19 s to compile (8 s then)."""

    @njit(parallel=True, cache=True, fastmath=_FAST)
    def activation(x, dy, out, backward):
        """out = act(x), or dy act'(x) when backward, over flat arrays (dy: x itself when not backward)."""
        for i in prange(x.size):
            value, slope = _activation(kind, x[i])
            out[i] = dy[i] * slope if backward else value

    @njit(parallel=True, cache=True, fastmath=_FAST)
    def geglu_rows(x, dy, out, backward):
        """GEGLU over rows x (M, 2D) = [a, b]: out (M, D) = a * act(b); or, when backward, out (M, 2D) =
        [dy act(b), dy a act'(b)]."""
        half = x.shape[1] // 2
        for r in prange(x.shape[0]):
            a, b, g, y = x[r, :half], x[r, half:], dy[r], out[r]
            if backward:
                for j in range(half):
                    value, slope = _activation(kind, b[j])
                    y[j] = g[j] * value
                    y[half + j] = g[j] * a[j] * slope
            else:
                for j in range(half):
                    y[j] = a[j] * _activation(kind, b[j])[0]

    return activation, geglu_rows


_ACTIVATION_KERNELS = {kind: _activation_kernels(kind) for kind in (_SILU, _GELU_TANH, _GELU_ERF)}


def _activate(kind, x, dy=None):
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    flat_dy = x.reshape(-1) if dy is None else np.ascontiguousarray(dy, x.dtype).reshape(-1)
    _run(_ACTIVATION_KERNELS[kind][0], x.reshape(-1), flat_dy, out.reshape(-1), dy is not None)
    return out


def silu(x):
    """See reference.silu."""
    return _activate(_SILU, x)


def silu_backward(dy, x):
    return _activate(_SILU, x, dy)


_UNARY = ["float32(float32)", "float64(float64)"]
_BINARY = ["float32(float32, float32)", "float64(float64, float64)"]


@vectorize(_UNARY, cache=True)
def _gelu_erf_exact(x):
    return 0.5 * x * (1.0 + math.erf(x * _INV_SQRT_2))


@vectorize(_BINARY, cache=True)
def _gelu_erf_exact_backward(dy, x):
    return dy * (0.5 * (1.0 + math.erf(x * _INV_SQRT_2)) + x * math.exp(-0.5 * x * x) * _INV_SQRT_2PI)


def _check_approximate(op, approximate):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu(x, approximate):
    """See reference.gelu. Exact erf in float64 (libm, one call per element), the fit in float32."""
    _check_approximate("gelu", approximate)
    if approximate == "none" and x.dtype != np.float32:
        return _gelu_erf_exact(x)
    return _activate(_GELU_TANH if approximate == "tanh" else _GELU_ERF, x)


def gelu_backward(dy, x, approximate):
    _check_approximate("gelu_backward", approximate)
    if approximate == "none" and x.dtype != np.float32:
        return _gelu_erf_exact_backward(dy, x)
    return _activate(_GELU_TANH if approximate == "tanh" else _GELU_ERF, x, dy)


def _geglu(x, dy, approximate):
    """geglu (dy None) or geglu_backward on x's rows in one pass, no copies of the halves (float64 with
    exact erf: the reference's composition, with libm's erf)."""
    half = x.shape[-1] // 2
    if approximate == "none" and x.dtype != np.float32:
        a, b = x[..., :half], x[..., half:]
        if dy is None:
            return a * _gelu_erf_exact(b)
        return np.concatenate([_gelu_erf_exact(b) * dy, _gelu_erf_exact_backward(dy * a, b)], axis=-1)
    rows = np.ascontiguousarray(x).reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (0, 2D) for an empty batch
    out = np.empty(x.shape[:-1] + ((half,) if dy is None else (2 * half,)), x.dtype)
    flat_dy = rows if dy is None else np.ascontiguousarray(dy, x.dtype).reshape(rows.shape[0], half)
    kind = _GELU_TANH if approximate == "tanh" else _GELU_ERF
    _run(_ACTIVATION_KERNELS[kind][1], rows, flat_dy, out.reshape(rows.shape[0], out.shape[-1]), dy is not None)
    return out


def geglu(x, approximate):
    """See reference.geglu."""
    _check_approximate("geglu", approximate)
    return _geglu(x, None, approximate)


def geglu_backward(dy, x, approximate):
    """See reference.geglu_backward."""
    _check_approximate("geglu_backward", approximate)
    return _geglu(x, dy, approximate)


# ---- optimiser ---------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _adamw(param, grad, m, v, vmax, amsgrad, lr, beta1, beta2, eps, weight_decay, bias1, bias2_sqrt):
    decay, step_size = 1.0 - lr * weight_decay, lr / bias1
    for i in prange(param.size):
        g = grad[i]
        m[i] = beta1 * m[i] + (1.0 - beta1) * g
        v[i] = beta2 * v[i] + (1.0 - beta2) * g * g
        second = v[i]
        if amsgrad:
            vmax[i] = max(vmax[i], v[i])
            second = vmax[i]
        param[i] = param[i] * decay - step_size * m[i] / (math.sqrt(second) / bias2_sqrt + eps)


def adamw_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """See reference.adamw_step: one fused pass over the flat arrays, in place."""
    state = [param, exp_avg, exp_avg_sq] + ([] if max_exp_avg_sq is None else [max_exp_avg_sq])
    if not all(a.flags.c_contiguous and a.dtype == param.dtype for a in state):
        return reference.adamw_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps,
                                    weight_decay)
    flat = [a.reshape(-1) for a in state]
    vmax = flat[3] if max_exp_avg_sq is not None else flat[2]
    _run(_adamw, flat[0], np.ascontiguousarray(grad, param.dtype).reshape(-1), flat[1], flat[2], vmax,
           max_exp_avg_sq is not None, lr, beta1, beta2, eps, weight_decay, 1.0 - beta1**step,
           math.sqrt(1.0 - beta2**step))
