"""CuPy kernels for arrays on an NVIDIA GPU: the same functions as kernels/reference.py.

On a GPU at these sizes most of the time goes to kernel launches, so each op is
a few fused launches:

    matrix products        cuBLAS through cupy.matmul (TF32 stays off: CuPy's default)
    conv2d                 im2col (one kernel) -> one GEMM; grad_input: GEMM -> col2im,
                           a gather (each input pixel sums its own contributions, no atomics);
                           grad_weight: GEMM of dy with the column buffer
    attention              scores by batched GEMM -> fused masked softmax that also
                           writes lse -> GEMM; backward recomputes p = exp(s - lse)
    softmax, norms         one block per row: block reductions for the statistics and
                           the normalised output written in the same kernel
    activations, AdamW     one ElementwiseKernel each (AdamW updates p, m, v in place)

Kernels are written once for a type T and instantiated for float and double
(RawModule name expressions, ElementwiseKernel type placeholders); everything
compiles on first use and CuPy caches the binaries.

What was verified, and what was not. Nothing here has run on a GPU: it was
written on a machine without one. The CUDA source below and the operations of
the ElementwiseKernels compile with NVRTC 12.9 (compute_90, float and double).
Every function was also run on the CPU through a stand-in for CuPy (NumPy for
the array functions and matmul; the CUDA source compiled with g++ against a
small shim, one OS thread per CUDA thread, __syncthreads as a barrier) and
matched kernels/reference.py in float32 and float64 over strides, paddings,
dilations, groups, masks and causal attention (and tests/test_kernels.py's
cupy_gpu cases passed that way). Not verified: CuPy's own side
(kernel argument passing, ElementwiseKernel broadcasting and in-place outputs,
cuBLAS), real GPU concurrency, and speed. The test suite's "cuda" cases check
it all against the reference wherever a GPU is present.
"""

import functools
import math

import cupy as cp
import numpy as np

# linear layers: the reference's products, which CuPy hands to cuBLAS as written
from .reference import linear, linear_grad_input, linear_grad_weight  # noqa: F401
# GEGLU: the reference's composition of gelu (CuPy's erf through cupyx)
from .reference import geglu, geglu_backward  # noqa: F401,E402
# group norm + SiLU's backward rebuilds y with the reference's elementwise affine map
from .reference import _group_norm_affine  # noqa: E402

BLOCK = 128  # threads per block for the one-block-per-row kernels (must match the CUDA source)

_SOURCE = r"""
#define BLOCK 128

template<typename T> __device__ T neg_inf();
template<> __device__ float neg_inf<float>() { return -__int_as_float(0x7f800000); }
template<> __device__ double neg_inf<double>() { return -__longlong_as_double(0x7ff0000000000000LL); }

// Sum / max of one value per thread over the block (blockDim.x == BLOCK); every thread gets the result.
template<typename T> __device__ T block_sum(T v) {
    __shared__ T buf[BLOCK];
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    T total = buf[0];
    __syncthreads();  // the buffer may be reused by the next call
    return total;
}

template<typename T> __device__ T block_max(T v) {
    __shared__ T buf[BLOCK];
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s && buf[threadIdx.x + s] > buf[threadIdx.x]) buf[threadIdx.x] = buf[threadIdx.x + s];
        __syncthreads();
    }
    T best = buf[0];
    __syncthreads();
    return best;
}

// ---- softmax over rows of length n (one block per row) ------------------------------------
// score_j = scale * x_j + mask_j, keys j > (row % q_len) dropped when causal.
// Writes softmax (or log_softmax when log_out) to y (may alias x) and lse = log sum_j exp(score_j).
template<typename T>
__global__ void softmax_rows(const T* x, T* y, T* lse, const T* mask, long long mask_rows,
                             int n, int q_len, T scale, int causal, int log_out) {
    long long row = blockIdx.x;
    const T* xr = x + row * n;
    T* yr = y + row * n;
    const T* mr = mask_rows > 0 ? mask + (row % mask_rows) * n : 0;
    int last = n - 1;  // the last visible key
    if (causal && row % q_len < last) last = (int)(row % q_len);

    T m = neg_inf<T>();
    for (int j = threadIdx.x; j <= last; j += BLOCK) {
        T s = scale * xr[j] + (mr ? mr[j] : T(0));
        if (s > m) m = s;
    }
    m = block_max(m);
    if (m == neg_inf<T>()) m = 0;  // no visible key: sum = 0, lse = -inf, probabilities 0 (as the reference)
    T sum = 0;
    for (int j = threadIdx.x; j <= last; j += BLOCK) sum += exp(scale * xr[j] + (mr ? mr[j] : T(0)) - m);
    sum = block_sum(sum);
    T log_sum = log(sum);
    for (int j = threadIdx.x; j < n; j += BLOCK) {
        T s = j <= last ? scale * xr[j] + (mr ? mr[j] : T(0)) : neg_inf<T>();
        yr[j] = log_out ? s - m - log_sum : (sum > 0 ? exp(s - m) / sum : T(0));
    }
    if (threadIdx.x == 0) lse[row] = m + log_sum;
}

// softmax: dx = y * (dy - sum(dy * y));  log_softmax: dx = dy - exp(y) * sum(dy).
template<typename T>
__global__ void softmax_backward_rows(const T* dy, const T* y, T* dx, int n, int log_out) {
    long long row = blockIdx.x;
    const T* dyr = dy + row * n;
    const T* yr = y + row * n;
    T* dxr = dx + row * n;
    T acc = 0;
    for (int j = threadIdx.x; j < n; j += BLOCK) acc += log_out ? dyr[j] : dyr[j] * yr[j];
    acc = block_sum(acc);
    for (int j = threadIdx.x; j < n; j += BLOCK)
        dxr[j] = log_out ? dyr[j] - exp(yr[j]) * acc : yr[j] * (dyr[j] - acc);
}

// ---- group / layer norm: one block per (sample, group) row of `length` = channels_per_group * spatial --
template<typename T>
__global__ void norm_forward_rows(const T* x, const T* weight, const T* bias, T* y, T* mean_out, T* rstd_out,
                                  int length, int spatial, int group_channels, int groups, T eps,
                                  int has_weight, int has_bias) {
    long long row = blockIdx.x;
    const T* xr = x + row * length;
    T* yr = y + row * length;
    T s = 0;
    for (int j = threadIdx.x; j < length; j += BLOCK) s += xr[j];
    T mean = block_sum(s) / length;
    T q = 0;
    for (int j = threadIdx.x; j < length; j += BLOCK) { T d = xr[j] - mean; q += d * d; }
    T rstd = T(1) / sqrt(block_sum(q) / length + eps);
    int c0 = (int)(row % groups) * group_channels;
    for (int j = threadIdx.x; j < length; j += BLOCK) {
        int c = c0 + j / spatial;
        T v = (xr[j] - mean) * rstd;
        if (has_weight) v *= weight[c];
        if (has_bias) v += bias[c];
        yr[j] = v;
    }
    if (threadIdx.x == 0) { mean_out[row] = mean; rstd_out[row] = rstd; }
}

// dx = rstd * (g - mean(g) - xh * mean(g * xh)),  g = dy * weight,  xh = (x - mean) * rstd.
template<typename T>
__global__ void norm_backward_rows(const T* dy, const T* x, const T* mean_in, const T* rstd_in, const T* weight,
                                   T* dx, int length, int spatial, int group_channels, int groups, int has_weight) {
    long long row = blockIdx.x;
    const T* dyr = dy + row * length;
    const T* xr = x + row * length;
    T* dxr = dx + row * length;
    T mean = mean_in[row], rstd = rstd_in[row];
    int c0 = (int)(row % groups) * group_channels;
    T a = 0, b = 0;
    for (int j = threadIdx.x; j < length; j += BLOCK) {
        T g = has_weight ? dyr[j] * weight[c0 + j / spatial] : dyr[j];
        a += g;
        b += g * (xr[j] - mean) * rstd;
    }
    a = block_sum(a) / length;
    b = block_sum(b) / length;
    for (int j = threadIdx.x; j < length; j += BLOCK) {
        T g = has_weight ? dyr[j] * weight[c0 + j / spatial] : dyr[j];
        dxr[j] = rstd * (g - a - (xr[j] - mean) * rstd * b);
    }
}

// ---- convolution: column buffer col[(c, kh, kw), (n, oh, ow)] ----------------------------------
template<typename T>
__global__ void im2col(const T* x, T* col, long long total, int N, int C, int H, int W, int KH, int KW,
                       int HO, int WO, int sh, int sw, int ph, int pw, int dh, int dw) {
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        long long t = idx;
        int ow = t % WO; t /= WO;
        int oh = t % HO; t /= HO;
        int n = t % N; t /= N;
        int kw = t % KW; t /= KW;
        int kh = t % KH; t /= KH;
        int c = (int)t;
        int ih = oh * sh - ph + kh * dh, iw = ow * sw - pw + kw * dw;
        col[idx] = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? x[(((long long)n * C + c) * H + ih) * W + iw] : T(0);
    }
}

// The adjoint of im2col: x[n, c, ih, iw] = sum of the col entries that read it.
template<typename T>
__global__ void col2im(const T* col, T* x, long long total, int N, int C, int H, int W, int KH, int KW,
                       int HO, int WO, int sh, int sw, int ph, int pw, int dh, int dw) {
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        long long t = idx;
        int iw = t % W; t /= W;
        int ih = t % H; t /= H;
        int c = t % C;
        int n = (int)(t / C);
        T sum = 0;
        for (int kh = 0; kh < KH; ++kh) {
            int th = ih + ph - kh * dh;  // = oh * sh
            if (th < 0 || th % sh) continue;
            int oh = th / sh;
            if (oh >= HO) continue;
            for (int kw = 0; kw < KW; ++kw) {
                int tw = iw + pw - kw * dw;
                if (tw < 0 || tw % sw) continue;
                int ow = tw / sw;
                if (ow >= WO) continue;
                sum += col[((((long long)c * KH + kh) * KW + kw) * N + n) * HO * WO + (long long)oh * WO + ow];
            }
        }
        x[idx] = sum;
    }
}

// ---- pooling: one thread per output (forward) or per input pixel (backward, a gather) ----------
template<typename T>
__global__ void max_pool_forward(const T* x, T* y, long long* argmax, long long total, int H, int W, int HO, int WO,
                                 int KH, int KW, int sh, int sw, int ph, int pw) {
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        int ow = idx % WO, oh = (idx / WO) % HO;
        const T* plane = x + (idx / ((long long)HO * WO)) * H * W;
        T best = neg_inf<T>();
        long long best_at = -1;
        for (int kh = 0; kh < KH; ++kh) {
            int ih = oh * sh - ph + kh;
            if (ih < 0 || ih >= H) continue;
            for (int kw = 0; kw < KW; ++kw) {
                int iw = ow * sw - pw + kw;
                if (iw < 0 || iw >= W) continue;
                T v = plane[ih * W + iw];
                if (best_at < 0 || v > best || (isnan(v) && !isnan(best))) { best = v; best_at = ih * W + iw; }
            }
        }
        y[idx] = best;
        argmax[idx] = best_at;
    }
}

// For each input pixel: the windows (oh, ow) that contain it, as in col2im.
template<typename T>
__global__ void pool_backward(const T* dy, const long long* argmax, T* dx, long long total, int H, int W,
                              int HO, int WO, int KH, int KW, int sh, int sw, int ph, int pw, int is_max) {
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        int iw = idx % W, ih = (idx / W) % H;
        long long base = (idx / ((long long)H * W)) * HO * WO;  // this (n, c) plane of dy
        T sum = 0;
        for (int kh = 0; kh < KH; ++kh) {
            int th = ih + ph - kh;
            if (th < 0 || th % sh) continue;
            int oh = th / sh;
            if (oh >= HO) continue;
            for (int kw = 0; kw < KW; ++kw) {
                int tw = iw + pw - kw;
                if (tw < 0 || tw % sw) continue;
                int ow = tw / sw;
                if (ow >= WO) continue;
                long long o = base + (long long)oh * WO + ow;
                if (!is_max || argmax[o] == (long long)ih * W + iw) sum += dy[o];
            }
        }
        dx[idx] = is_max ? sum : sum / (T)(KH * KW);
    }
}

template<typename T>
__global__ void avg_pool_forward(const T* x, T* y, long long total, int H, int W, int HO, int WO,
                                 int KH, int KW, int sh, int sw, int ph, int pw) {
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        int ow = idx % WO, oh = (idx / WO) % HO;
        const T* plane = x + (idx / ((long long)HO * WO)) * H * W;
        T sum = 0;
        for (int kh = 0; kh < KH; ++kh) {
            int ih = oh * sh - ph + kh;
            if (ih < 0 || ih >= H) continue;
            for (int kw = 0; kw < KW; ++kw) {
                int iw = ow * sw - pw + kw;
                if (iw >= 0 && iw < W) sum += plane[ih * W + iw];
            }
        }
        y[idx] = sum / (T)(KH * KW);  // count_include_pad: padding counts as zeros
    }
}
"""

_KERNEL_NAMES = (
    "softmax_rows", "softmax_backward_rows", "norm_forward_rows", "norm_backward_rows",
    "im2col", "col2im", "max_pool_forward", "pool_backward", "avg_pool_forward",
)  # fmt: skip
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


@functools.cache
def _module():
    """The RawModule with every template kernel instantiated for float and double (compiled once)."""
    names = [f"{k}<{t}>" for k in _KERNEL_NAMES for t in _CTYPES.values()]
    return cp.RawModule(code=_SOURCE, name_expressions=names)


def _kernel(name, dtype):
    return _module().get_function(f"{name}<{_CTYPES[np.dtype(dtype)]}>")


def _check_float(op, *arrays):
    for a in arrays:
        if a is not None and a.dtype not in _CTYPES:
            raise ValueError(f"{op}: expected float32 or float64 arrays, got {a.dtype} of shape {a.shape}")


def _i32(*values):
    return tuple(np.int32(v) for v in values)


def _launch(name, arrays, total, *scalars):
    """Launch a grid-stride kernel with arguments (*arrays, total, *scalars) over `total` items."""
    if total == 0:
        return
    blocks = min((total + 255) // 256, 65535)
    _kernel(name, arrays[0].dtype)((blocks,), (256,), (*arrays, np.int64(total), *scalars))


def _rows(x, axis):
    """x with `axis` moved last, C-contiguous, and the same data as (rows, n)."""
    moved = cp.ascontiguousarray(cp.moveaxis(x, axis, -1))
    return moved, moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1])


# ---- softmax ---------------------------------------------------------------------------------
def _softmax(x, axis, log_out):
    _check_float("softmax", x)
    moved, rows = _rows(x, axis)
    y = cp.empty_like(rows)
    if rows.shape[0] and rows.shape[1]:
        lse = cp.empty(rows.shape[0], dtype=x.dtype)
        _kernel("softmax_rows", x.dtype)(
            (rows.shape[0],),
            (BLOCK,),
            (rows, y, lse, rows, np.int64(0), *_i32(rows.shape[1], 1), x.dtype.type(1), *_i32(0, log_out)),
        )
    return cp.moveaxis(y.reshape(moved.shape), -1, axis)


def _softmax_backward(dy, y, axis, log_out):
    moved_dy, dy_rows = _rows(dy, axis)
    _, y_rows = _rows(y, axis)
    dx = cp.empty_like(dy_rows)
    if dy_rows.shape[0] and dy_rows.shape[1]:
        _kernel("softmax_backward_rows", dy.dtype)(
            (dy_rows.shape[0],), (BLOCK,), (dy_rows, y_rows, dx, *_i32(dy_rows.shape[1], log_out))
        )
    return cp.moveaxis(dx.reshape(moved_dy.shape), -1, axis)


def softmax(x, axis):
    """y_i = exp(x_i - m) / sum_j exp(x_j - m), m = max_j x_j; one block per row."""
    return _softmax(x, axis, 0)


def softmax_backward(dy, y, axis):
    """dx = y * (dy - sum(dy * y))."""
    return _softmax_backward(dy, y, axis, 0)


def log_softmax(x, axis):
    """y = (x - m) - log(sum exp(x - m))."""
    return _softmax(x, axis, 1)


def log_softmax_backward(dy, y, axis):
    """dx = dy - exp(y) * sum(dy)."""
    return _softmax_backward(dy, y, axis, 1)


# ---- convolution -----------------------------------------------------------------------------
def _geometry(x_shape, kh, kw, out_hw, stride, padding, dilation):
    """The int32 arguments shared by im2col and col2im."""
    n, c, h, w = x_shape
    return _i32(n, c, h, w, kh, kw, *out_hw, *stride, *padding, *dilation)


def _im2col(x, kh, kw, out_hw, stride, padding, dilation):
    """Columns (C * KH * KW, N * HO * WO): col[(c, p, q), (n, i, j)] = x_pad[n, c, i*sh + p*dh, j*sw + q*dw]."""
    x = cp.ascontiguousarray(x)
    n, c = x.shape[:2]
    col = cp.empty((c * kh * kw, n * out_hw[0] * out_hw[1]), dtype=x.dtype)
    _launch("im2col", (x, col), col.size, *_geometry(x.shape, kh, kw, out_hw, stride, padding, dilation))
    return col


def _col2im(col, x_shape, kh, kw, out_hw, stride, padding, dilation):
    """The adjoint of _im2col: each pixel of x sums the column entries that read it."""
    x = cp.empty(x_shape, dtype=col.dtype)
    _launch("col2im", (col, x), x.size, *_geometry(x_shape, kh, kw, out_hw, stride, padding, dilation))
    return x


def _gemm(a, b):
    """Per-group matrix products (G, m, k) @ (G, k, n) -> (G, m, n) on cuBLAS.

    With one group, a 2-D product lets cuBLAS read transposed views without copying them.
    """
    if a.shape[0] == 1:
        return cp.matmul(a[0], b[0])[None]
    return cp.matmul(a, b)


def _channels_first(dy, groups):
    """dy (N, O, HO, WO) -> (G, O // G, N * HO * WO), the layout of the GEMM output."""
    o = dy.shape[1]
    return cp.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(groups, o // groups, -1)


def conv2d(x, w, stride, padding, dilation, groups, bias=None):
    """y[n, o] = sum over the group's channels and the window of x * w (+ bias[o]): im2col, then one GEMM per group."""
    _check_float("conv2d", x, w)
    n = x.shape[0]
    o, cg, kh, kw = w.shape
    out_hw = tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(x.shape[2:], (kh, kw), stride, padding, dilation)
    )
    col = _im2col(x, kh, kw, out_hw, stride, padding, dilation)
    y = _gemm(w.reshape(groups, o // groups, cg * kh * kw), col.reshape(groups, cg * kh * kw, -1))
    y = cp.ascontiguousarray(y.reshape(o, n, *out_hw).transpose(1, 0, 2, 3))
    if bias is not None:
        y += bias.reshape(1, -1, 1, 1)
    return y


def conv2d_grad_input(dy, w, x_shape, stride, padding, dilation, groups):
    """dx = col2im(w^T dy): the adjoint of conv2d in x."""
    o, cg, kh, kw = w.shape
    dcol = _gemm(w.reshape(groups, o // groups, cg * kh * kw).transpose(0, 2, 1), _channels_first(dy, groups))
    dcol = dcol.reshape(cg * groups * kh * kw, -1)
    return _col2im(dcol, tuple(x_shape), kh, kw, dy.shape[2:], stride, padding, dilation)


def conv2d_grad_weight(dy, x, w_shape, stride, padding, dilation, groups):
    """dw = dy col^T, summed over samples and positions by the GEMM."""
    _, cg, kh, kw = w_shape
    col = _im2col(x, kh, kw, dy.shape[2:], stride, padding, dilation)
    dw = _gemm(_channels_first(dy, groups), col.reshape(groups, cg * kh * kw, -1).transpose(0, 2, 1))
    return dw.reshape(w_shape)


def conv_transpose2d(x, w, stride, padding, output_padding, dilation, groups):
    """The adjoint of the conv with weight w whose output has x's shape: conv2d_grad_input."""
    n, _, h, wd = x.shape
    _, out_per_group, kh, kw = w.shape
    out_hw = tuple(
        (size - 1) * s - 2 * p + d * (k - 1) + op + 1
        for size, k, s, p, d, op in zip((h, wd), (kh, kw), stride, padding, dilation, output_padding)
    )
    return conv2d_grad_input(x, w, (n, out_per_group * groups, *out_hw), stride, padding, dilation, groups)


# ---- pooling and upsampling --------------------------------------------------------------------
def _pool_out(x_shape, kernel, stride, padding):
    return tuple((size + 2 * p - k) // s + 1 for size, k, s, p in zip(x_shape[2:], kernel, stride, padding))


def _pool_args(x_shape, out_hw, kernel, stride, padding):
    return _i32(*x_shape[2:], *out_hw, *kernel, *stride, *padding)


def max_pool2d(x, kernel, stride, padding):
    """y = max over each window (padding is -inf); argmax = flat index into the H * W plane."""
    _check_float("max_pool2d", x)
    x = cp.ascontiguousarray(x)
    out_hw = _pool_out(x.shape, kernel, stride, padding)
    y = cp.empty(x.shape[:2] + out_hw, dtype=x.dtype)
    argmax = cp.empty(y.shape, dtype=cp.int64)
    _launch("max_pool_forward", (x, y, argmax), y.size, *_pool_args(x.shape, out_hw, kernel, stride, padding))
    return y, argmax


def _pool_backward(dy, argmax, x_shape, kernel, stride, padding, is_max):
    dy = cp.ascontiguousarray(dy)
    dx = cp.empty(tuple(x_shape), dtype=dy.dtype)
    args = _pool_args(x_shape, dy.shape[2:], kernel, stride, padding)
    _launch("pool_backward", (dy, argmax, dx), dx.size, *args, np.int32(is_max))
    return dx


def max_pool2d_backward(dy, argmax, x_shape, kernel, stride, padding):
    """Each input pixel gathers dy from the windows whose argmax it is."""
    return _pool_backward(dy, cp.ascontiguousarray(argmax), x_shape, kernel, stride, padding, 1)


def avg_pool2d(x, kernel, stride, padding):
    """y = window sum / (kh * kw) (count_include_pad=True)."""
    _check_float("avg_pool2d", x)
    x = cp.ascontiguousarray(x)
    out_hw = _pool_out(x.shape, kernel, stride, padding)
    y = cp.empty(x.shape[:2] + out_hw, dtype=x.dtype)
    _launch("avg_pool_forward", (x, y), y.size, *_pool_args(x.shape, out_hw, kernel, stride, padding))
    return y


def avg_pool2d_backward(dy, x_shape, kernel, stride, padding):
    """Each input pixel gathers dy / (kh * kw) from the windows that contain it."""
    dummy_argmax = cp.empty(1, dtype=cp.int64)  # unused when is_max = 0
    return _pool_backward(dy, dummy_argmax, x_shape, kernel, stride, padding, 0)


def upsample_nearest2d(x, scale):
    """y[n, c, i, j] = x[n, c, i // sh, j // sw]: one copy of a broadcast view."""
    n, c, h, w = x.shape
    sh, sw = scale
    return cp.broadcast_to(x[:, :, :, None, :, None], (n, c, h, sh, w, sw)).reshape(n, c, h * sh, w * sw)


def upsample_nearest2d_backward(dy, scale):
    """dx sums each sh x sw block of dy: one reduction."""
    n, c, h2, w2 = dy.shape
    sh, sw = scale
    return dy.reshape(n, c, h2 // sh, sh, w2 // sw, sw).sum(axis=(3, 5))


# ---- group norm and layer norm --------------------------------------------------------------------
# Layer norm of (M, D) is group norm of (M, D, 1) with one group, so both use the same kernels.
_weight_grad = cp.ReductionKernel(
    "T dy, T x, T mean, T rstd", "T dweight",
    "dy * (x - mean) * rstd", "a + b", "dweight = a", "0", "tinysd_norm_weight_grad",
)  # fmt: skip


def _norm_forward(x, num_groups, weight, bias, eps):
    """x (N, C, *spatial) -> (y, mean, rstd) with mean, rstd (N, G)."""
    _check_float("group_norm", x, weight, bias)
    x = cp.ascontiguousarray(x)
    n, c = x.shape[:2]
    spatial = x.size // (n * c) if n * c else 1
    length = (c // num_groups) * spatial
    y = cp.empty_like(x)
    mean = cp.empty((n, num_groups), dtype=x.dtype)
    rstd = cp.empty((n, num_groups), dtype=x.dtype)
    if x.size:
        affine = [x if a is None else cp.ascontiguousarray(a) for a in (weight, bias)]  # x: an unread stand-in
        _kernel("norm_forward_rows", x.dtype)(
            (n * num_groups,), (BLOCK,),
            (x, *affine, y, mean, rstd, *_i32(length, spatial, c // num_groups, num_groups), x.dtype.type(eps),
             *_i32(weight is not None, bias is not None)),
        )  # fmt: skip
    return y, mean, rstd


def _norm_backward(dy, x, mean, rstd, weight, num_groups):
    dy, x = cp.ascontiguousarray(dy), cp.ascontiguousarray(x)
    n, c = x.shape[:2]
    spatial = x.size // (n * c) if n * c else 1
    group_channels = c // num_groups
    dx = cp.empty_like(x)
    if x.size:
        _kernel("norm_backward_rows", x.dtype)(
            (n * num_groups,), (BLOCK,),
            (dy, x, cp.ascontiguousarray(mean), cp.ascontiguousarray(rstd),
             x if weight is None else cp.ascontiguousarray(weight), dx,
             *_i32(group_channels * spatial, spatial, group_channels, num_groups, weight is not None)),
        )  # fmt: skip
    if weight is None:
        return dx, None, None
    shape4 = (n, num_groups, group_channels, spatial)
    stat4 = (n, num_groups, 1, 1)
    dy4 = dy.reshape(shape4)
    dweight = _weight_grad(dy4, x.reshape(shape4), mean.reshape(stat4), rstd.reshape(stat4), axis=(0, 3))
    return dx, dweight.reshape(c), dy4.sum(axis=(0, 3)).reshape(c)


def group_norm(x, num_groups, weight, bias, eps, with_silu=False):
    """y = (x - mean) * rstd * w[c] + b[c] over each (sample, group); one block per group. with_silu:
    silu(y), by a second kernel (fused on the CPU only)."""
    y, mean, rstd = _norm_forward(x, num_groups, weight, bias, eps)
    return (silu(y) if with_silu else y), mean, rstd


def group_norm_backward(dy, x, mean, rstd, weight, num_groups, bias=None, with_silu=False):
    """dx = rstd * (g - mean(g) - xh * mean(g * xh)), g = dy * w; dw = sum dy * xh; db = sum dy.
    with_silu: dy, the gradient of silu(y), becomes silu'(y) dy first (y rebuilt from x and the stats)."""
    if with_silu:
        dy = silu_backward(dy, _group_norm_affine(x, mean, rstd, weight, bias, num_groups))
    return _norm_backward(dy, x, mean, rstd, weight, num_groups)


def layer_norm(x, weight, bias, eps):
    """Each row of x (M, D) normalised over D: group norm of (M, D, 1) with one group."""
    y, mean, rstd = _norm_forward(x.reshape(x.shape[0], -1, 1), 1, weight, bias, eps)
    return y.reshape(x.shape), mean.reshape(x.shape[0]), rstd.reshape(x.shape[0])


def layer_norm_backward(dy, x, mean, rstd, weight):
    as_groups = (x.shape[0], -1, 1)
    dx, dweight, dbias = _norm_backward(dy.reshape(as_groups), x.reshape(as_groups), mean, rstd, weight, 1)
    return dx.reshape(x.shape), dweight, dbias


# ---- attention --------------------------------------------------------------------------------------
_attention_probs = cp.ElementwiseKernel(
    "T s, T lse, raw T mask, int64 mask_size, int32 causal, int32 q_len, int32 k_len, T scale",
    "T p",
    """
    int key = i % k_len;
    int query = (i / k_len) % q_len;
    T score = scale * s + (mask_size > 0 ? mask[i % mask_size] : T(0));
    p = (causal && key > query) ? T(0) : exp(score - (isfinite(lse) ? lse : T(0)));
    """,
    "tinysd_attention_probs",
)  # p = exp(s - lse), recomputed in backward (in place over the raw scores)

_attention_score_grad = cp.ElementwiseKernel(
    "T p, T delta, T scale", "T ds", "ds = scale * p * (ds - delta)", "tinysd_attention_score_grad"
)  # in place over dp = dout v^T

_row_dot = cp.ReductionKernel("T a, T b", "T out", "a * b", "a + b", "out = a", "0", "tinysd_row_dot")


def _mask_args(mask, dtype):
    """(mask array, its element count) for the kernels; a 1-element dummy and 0 when there is none."""
    if mask is None:
        return cp.empty(1, dtype=dtype), 0
    mask = cp.ascontiguousarray(mask, dtype=dtype)
    return mask, mask.size


def _fold_heads(*arrays):
    """(B, H, S, E) arrays -> contiguous (B * H, S, E): the layout the attention kernels index."""
    return tuple(cp.ascontiguousarray(a).reshape(-1, *a.shape[2:]) for a in arrays)


def attention(q, k, v, mask, scale, is_causal):
    """See reference.attention: the heads folded into the batch, then _attention_folded."""
    _check_float("attention", q, k, v)
    out, lse = _attention_folded(*_fold_heads(q, k, v), mask, scale, is_causal)
    return out.reshape(q.shape[:3] + v.shape[3:]), lse.reshape(q.shape[:3])


def attention_backward(dout, q, k, v, out, lse, mask, scale, is_causal):
    """See reference.attention_backward: the heads folded into the batch, then _attention_backward_folded."""
    lse = cp.ascontiguousarray(lse).reshape(-1, q.shape[2])
    grads = _attention_backward_folded(*_fold_heads(dout, q, k, v, out), lse, mask, scale, is_causal)
    return tuple(g.reshape(a.shape) for g, a in zip(grads, (q, k, v)))


def _attention_folded(q, k, v, mask, scale, is_causal):
    """out = softmax(scale q k^T + mask) v and lse for q (B, Sq, D), via GEMM -> fused masked softmax -> GEMM."""
    b, sq, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = cp.matmul(q, k.transpose(0, 2, 1))  # (B, Sq, Sk), becomes the probabilities in place
    lse = cp.empty((b, sq), dtype=q.dtype)
    mask, mask_size = _mask_args(mask, q.dtype)
    if scores.size:
        _kernel("softmax_rows", q.dtype)(
            (b * sq,), (BLOCK,),
            (scores, scores, lse, mask, np.int64(mask_size // sk if mask_size else 0),
             *_i32(sk, sq), q.dtype.type(scale), *_i32(bool(is_causal), 0)),
        )  # fmt: skip
    return cp.matmul(scores, v), lse


def _attention_backward_folded(dout, q, k, v, out, lse, mask, scale, is_causal):
    """dv = p^T g, ds = scale * p * (g v^T - delta), dq = ds k, dk = ds^T q (p recomputed from lse)."""
    _, sq, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask, mask_size = _mask_args(mask, q.dtype)
    p = cp.matmul(q, k.transpose(0, 2, 1))
    t = q.dtype.type  # scalars typed exactly as the kernels declare them
    _attention_probs(p, lse[:, :, None], mask, np.int64(mask_size), *_i32(bool(is_causal), sq, sk), t(scale), p)
    dv = cp.matmul(p.transpose(0, 2, 1), dout)
    ds = cp.matmul(dout, v.transpose(0, 2, 1))
    delta = _row_dot(dout, out, axis=2)  # sum_j p_ij dp_ij = sum_e dout_ie out_ie
    _attention_score_grad(p, delta[:, :, None], t(scale), ds)
    return cp.matmul(ds, k), cp.matmul(ds.transpose(0, 2, 1), q), dv


# ---- activations ------------------------------------------------------------------------------------
_silu = cp.ElementwiseKernel("T x", "T y", "y = x / (T(1) + exp(-x))", "tinysd_silu")
_silu_backward = cp.ElementwiseKernel(
    "T dy, T x", "T dx", "T s = T(1) / (T(1) + exp(-x)); dx = dy * s * (T(1) + x * (T(1) - s));", "tinysd_silu_backward"
)  # d/dx x s(x) = s + x s (1 - s)

_GELU_TANH_U = "T u = T(0.7978845608028654) * (x + T(0.044715) * x * x * x);"  # sqrt(2/pi) (x + 0.044715 x^3)
_gelu = {
    "none": cp.ElementwiseKernel(
        "T x", "T y", "y = T(0.5) * x * (T(1) + erf(x * T(0.7071067811865476)));", "tinysd_gelu_erf"
    ),
    "tanh": cp.ElementwiseKernel("T x", "T y", _GELU_TANH_U + "y = T(0.5) * x * (T(1) + tanh(u));", "tinysd_gelu_tanh"),
}
_gelu_backward = {
    # d/dx x Phi(x) = Phi(x) + x phi(x)
    "none": cp.ElementwiseKernel(
        "T dy, T x",
        "T dx",
        "T cdf = T(0.5) * (T(1) + erf(x * T(0.7071067811865476)));"
        "dx = dy * (cdf + x * T(0.3989422804014327) * exp(T(-0.5) * x * x));",
        "tinysd_gelu_erf_backward",
    ),
    # d/dx 0.5 x (1 + tanh u) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx
    "tanh": cp.ElementwiseKernel(
        "T dy, T x",
        "T dx",
        _GELU_TANH_U + "T t = tanh(u); T du = T(0.7978845608028654) * (T(1) + T(0.134145) * x * x);"
        "dx = dy * (T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du);",
        "tinysd_gelu_tanh_backward",
    ),
}


def silu(x):
    """y = x * sigmoid(x)."""
    return _silu(x)


def silu_backward(dy, x):
    return _silu_backward(dy, x)


def _gelu_kind(approximate):
    if approximate not in _gelu:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate


def gelu(x, approximate):
    """'none': x Phi(x) with the normal CDF Phi (erf); 'tanh': PyTorch's tanh approximation."""
    return _gelu[_gelu_kind(approximate)](x)


def gelu_backward(dy, x, approximate):
    return _gelu_backward[_gelu_kind(approximate)](dy, x)


# ---- AdamW ------------------------------------------------------------------------------------------
# Scalars computed on the host in double precision, as the reference does:
# decay = 1 - lr wd, step_size = lr / (1 - b1^t), bias2_sqrt = sqrt(1 - b2^t).
_ADAMW_IN = "T grad, T decay, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, T step_size, T bias2_sqrt, T eps"
_ADAMW_BODY = """
    param = param * decay;
    exp_avg = beta1 * exp_avg + one_minus_beta1 * grad;
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * grad * grad;
    {amsgrad}
    param = param - step_size * exp_avg / (sqrt({second}) / bias2_sqrt + eps);
"""
_adamw = cp.ElementwiseKernel(
    _ADAMW_IN, "T param, T exp_avg, T exp_avg_sq",
    _ADAMW_BODY.format(amsgrad="", second="exp_avg_sq"), "tinysd_adamw",
)  # fmt: skip
_adamw_amsgrad = cp.ElementwiseKernel(
    _ADAMW_IN, "T param, T exp_avg, T exp_avg_sq, T max_exp_avg_sq",
    _ADAMW_BODY.format(
        amsgrad="max_exp_avg_sq = max_exp_avg_sq > exp_avg_sq ? max_exp_avg_sq : exp_avg_sq;", second="max_exp_avg_sq"
    ),
    "tinysd_adamw_amsgrad",
)  # fmt: skip


def adamw_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW update of param, exp_avg, exp_avg_sq (and max_exp_avg_sq) in place, in one kernel."""
    _check_float("adamw_step", param, grad)
    t = param.dtype.type
    scalars = (
        t(1.0 - lr * weight_decay), t(beta1), t(1.0 - beta1), t(beta2), t(1.0 - beta2),
        t(lr / (1.0 - beta1**step)), t(math.sqrt(1.0 - beta2**step)), t(eps),
    )  # fmt: skip
    if max_exp_avg_sq is None:
        _adamw(grad, *scalars, param, exp_avg, exp_avg_sq)
    else:
        _adamw_amsgrad(grad, *scalars, param, exp_avg, exp_avg_sq, max_exp_avg_sq)
