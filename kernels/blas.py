"""Matrix products for the Numba kernels: OpenBLAS called from Numba loops, in blocks small
enough for its small-matrix kernels.

NumPy multiplies matrices with OpenBLAS. Its usual path first packs both matrices
into its own blocked layout; for the skinny products of small models (thousands of
rows times 32-576 columns, the im2col and Linear products of examples/mnist_digits.py)
that packing costs so much that on one thread it ran them 1.2-1.9x slower than
PyTorch's MKL. OpenBLAS also has small-matrix kernels that skip the packing, built for
AVX-512 CPUs (its SkylakeX, Cooperlake and SapphireRapids targets) and taken for
products of at most 100^3 multiply-adds. So `product` cuts a product into blocks under
that size, either of the rows of the result or, for weight gradients (a small result
summed over thousands of rows), of the summed dimension, and calls OpenBLAS's
`cblas_sgemm` on each block. Measured on one thread, for the shapes of the main job:
1.3-1.5x faster than np.matmul, within 10% of PyTorch (benchmarks/bench_blas.py; table
in benchmarks/README.md).

`product` is an ordinary Python function (np.matmul) that Numba compiles to those
calls (`overload`), so a kernel's loop over chunks of samples is written once and runs
either way: compiled, with no Python between the chunks, when `gemm_for(dtype)` finds
the sgemm of the OpenBLAS NumPy loaded (float32, one thread); as plain Python with
np.matmul everywhere else (another BLAS, float64, more threads).
"""

import ctypes

import numpy as np
from numba import get_num_threads, njit
from numba.extending import overload

_SMALL_MATRIX_CPUS = {"SkylakeX", "Cooperlake", "SapphireRapids"}  # OpenBLAS targets with those kernels
_MAX_BLOCK = 100**3  # multiply-adds: OpenBLAS takes the small-matrix kernel at or below this
_MIN_BLOCK = 96  # rows (of the result, or summed) per block: below ~80, blocks ran slower than np.matmul
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enum values


def _openblas_sgemm():
    """(cblas_sgemm as a ctypes function, whether OpenBLAS has small-matrix kernels for this CPU),
    from the OpenBLAS NumPy loaded; (None, False) when NumPy uses another BLAS."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None, False
    for lib in threadpool_info():
        if lib.get("internal_api") != "openblas":
            continue
        dll = ctypes.CDLL(lib["filepath"])
        # NumPy's wheels carry OpenBLAS built with 64-bit integers and renamed symbols
        for name, integer in (("scipy_cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm64_", ctypes.c_int64),
                              ("scipy_cblas_sgemm", ctypes.c_int), ("cblas_sgemm", ctypes.c_int)):
            sgemm = getattr(dll, name, None)
            if sgemm is None or (integer is ctypes.c_int and b"USE64BITINT" in _config(dll)):
                continue
            enum, n, ptr, real = ctypes.c_int, integer, ctypes.c_void_p, ctypes.c_float
            sgemm.argtypes = [enum, enum, enum, n, n, n, real, ptr, n, ptr, n, real, ptr, n]
            sgemm.restype = None
            return sgemm, lib.get("architecture") in _SMALL_MATRIX_CPUS
    return None, False


def _config(dll):
    for name in ("scipy_openblas_get_config64_", "openblas_get_config64_", "openblas_get_config"):
        if (fn := getattr(dll, name, None)) is not None:
            fn.restype = ctypes.c_char_p
            return fn() or b""
    return b""


# Float32 only: a Numba function called with a second ctypes function type (dgemm's) spent
# ~0.1 ms on every call choosing its compilation; float64 (gradient checks) goes to np.matmul.
_SGEMM, _SMALL_KERNELS = _openblas_sgemm()
_NO_BIAS = np.empty(0, np.float32)  # the compiled products' "no bias" (sgemm: float32 only)


@njit(cache=True)
def _leading(x):
    """BLAS's leading dimension of a row-major matrix: its row stride in elements (any value >= its
    width will do for a single row, whose stride NumPy may report as anything)."""
    return x.strides[0] // x.itemsize if x.shape[0] > 1 else x.shape[1]


@njit(cache=True)
def add_to_rows(out, bias):
    """out[i, :] += bias for every row i (nothing when bias is empty)."""
    if bias.size == 0:
        return
    for i in range(out.shape[0]):
        row = out[i]
        for j in range(row.size):
            row[j] += bias[j]


@njit(cache=True)
def _gemm_in_blocks(gemm, a, trans_a, b, out, beta, rows, summed, bias):
    """out = op(a) @ b + beta * out (+ bias on every row), row-major, op(a) = a.T if trans_a else a,
    by blocks of `rows` rows of out (summed == 0) or of `summed` terms of the sum (rows == 0).
    By rows, each block gets its bias while it is still in the cache."""
    m, n = out.shape
    k = b.shape[0]
    lda, ldb, ldc = _leading(a), _leading(b), _leading(out)
    flag = _TRANS if trans_a else _NO_TRANS
    if rows:
        for i in range(0, m, rows):
            r = min(rows, m - i)
            block = a[:, i:] if trans_a else a[i:]  # rows i.. of op(a)
            gemm(_ROW_MAJOR, flag, _NO_TRANS, r, n, k, 1.0, block.ctypes, lda, b.ctypes, ldb, beta,
                 out[i:].ctypes, ldc)
            add_to_rows(out[i : i + r], bias)
    else:
        for s in range(0, k, summed):
            r = min(summed, k - s)
            block = a[s:] if trans_a else a[:, s:]  # columns s.. of op(a)
            gemm(_ROW_MAJOR, flag, _NO_TRANS, m, n, r, 1.0, block.ctypes, lda, b[s:].ctypes, ldb,
                 beta if s == 0 else 1.0, out.ctypes, ldc)
        add_to_rows(out, bias)


@njit(cache=True)
def _product_with(gemm, a, trans_a, b, out, beta, max_block, min_block, bias):
    """out = op(a) @ b + beta * out (+ bias on every row; an empty bias adds nothing) through `gemm`:
    in blocks of at most `max_block` multiply-adds when they are at least `min_block` rows (or summed
    terms) tall, else in one call."""
    m, n = out.shape
    k = b.shape[0]
    rows, summed = max_block // (n * k) // 8 * 8, max_block // (m * n) // 8 * 8  # multiples of 8 ran faster
    if rows >= summed and rows >= min_block:
        _gemm_in_blocks(gemm, a, trans_a, b, out, beta, rows, 0, bias)
    elif summed > rows and summed >= min_block:
        _gemm_in_blocks(gemm, a, trans_a, b, out, beta, 0, summed, bias)
    else:
        _gemm_in_blocks(gemm, a, trans_a, b, out, beta, m, 0, bias)


def product(gemm, a, trans_a, b, out, beta):
    """out = op(a) @ b + beta * out, op(a) = a.T if trans_a else a, beta 0 or 1.

    Called from Python: np.matmul (gemm is ignored). Compiled by Numba (gemm from `gemm_for`):
    OpenBLAS's sgemm, in small-matrix blocks where this CPU has those kernels; there a, b and out
    must have contiguous rows (row strides >= their widths), as slices of C-contiguous arrays do.
    """
    if beta:
        out += (a.T if trans_a else a) @ b
    else:
        np.matmul(a.T if trans_a else a, b, out=out)


def _block_limits():
    """(max_block, min_block) for _product_with: one call per product where OpenBLAS has no small-matrix kernels."""
    return (_MAX_BLOCK, _MIN_BLOCK) if _SMALL_KERNELS else (0, 1)


@overload(product)
def _product_compiled(gemm, a, trans_a, b, out, beta):
    max_block, min_block = _block_limits()  # constants of the compiled code

    def compiled(gemm, a, trans_a, b, out, beta):
        _product_with(gemm, a, trans_a, b, out, beta, max_block, min_block, _NO_BIAS)

    return compiled


def gemm_for(dtype):
    """The sgemm for `product` in compiled loops over `dtype` arrays, or None: run those loops as Python."""
    if _SGEMM is not None and dtype == np.float32 and get_num_threads() == 1:
        return _SGEMM
    return None


def _rows_of_columns(x, dtype):
    """Whether BLAS can take x as it is: non-empty, of `dtype`, unit-stride columns, rows that do not overlap."""
    return (x.dtype == dtype and x.size > 0 and x.strides[1] == x.itemsize
            and (x.shape[0] == 1 or x.strides[0] >= x.shape[1] * x.itemsize))


def row_bias(bias, dtype):
    """The bias to add to every row of a product, as `add_to_rows` takes it: a contiguous array of
    `dtype`, or an empty one for no bias (one compiled signature for both)."""
    return np.empty(0, dtype) if bias is None else np.ascontiguousarray(bias, dtype)


def matmul(a, b, out, trans_a=False, accumulate=False, bias=None):
    """out = op(a) @ b (or out += op(a) @ b with accumulate), op(a) = a.T if trans_a else a, from Python;
    bias (out's width) is added to every row (in the cache, block by block, where blocks are by rows).

    a, b, out: 2-D NumPy arrays of one float dtype; out must not overlap a or b.
    """
    gemm = gemm_for(out.dtype)
    if gemm is not None and all(_rows_of_columns(x, out.dtype) for x in (a, b, out)):
        _product_with(gemm, a, trans_a, b, out, 1.0 if accumulate else 0.0, *_block_limits(), row_bias(bias, out.dtype))
        return
    product(None, a, trans_a, b, out, accumulate)
    if bias is not None:
        out += bias
