"""tinysd: Stable Diffusion from the foundations, on a small autograd engine of its own."""

import os
import sys

# Idle threads should sleep, not spin: our Numba kernels and BLAS take turns on the same cores.
# OpenMP (Numba's threading layer) is asked to let idle threads sleep: with spinning threads a
# parallel kernel that runs while BLAS or another program holds a core waits a whole scheduler
# time slice (8 ms instead of 0.2 ms for a layer norm on 2 cores). After each matrix product
# OpenBLAS's threads spin for about 2^28 cycles (0.1 s) before they sleep; 2^4 made a Stable
# Diffusion UNet step 7% and a 512 x 512 VAE decode 11% faster on 2 cores. Each runtime reads its
# setting once, when it is loaded (OpenBLAS with NumPy, OpenMP with Numba or torch), so these
# take effect where tinysd is imported first (the examples do) or the environment sets them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def _numba_uses_full_avx512_vectors():
    """Let Numba's LLVM vectorise with 512-bit registers on AVX-512 CPUs.

    LLVM's tuning for Intel's AVX-512 server CPUs prefers 256-bit vectors (the "prefer-256-bit"
    feature, against the clock slow-down of early AVX-512 parts), so Numba's loops ran at half
    the width the CPU has. Turned off, on this Emerald Rapids machine, one thread: silu and gelu
    1.2-1.4x faster. Numba reads NUMBA_CPU_FEATURES once, when it is imported: this works where
    tinysd is imported first and the environment does not set it already.
    """
    if "NUMBA_CPU_FEATURES" in os.environ or "numba" in sys.modules:
        return
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
    except (ImportError, RuntimeError):  # no Numba, or LLVM cannot tell this CPU's features
        return
    if features.get("avx512f"):
        os.environ["NUMBA_CPU_FEATURES"] = features.flatten() + ",-prefer-256-bit"


_numba_uses_full_avx512_vectors()


def _glibc_mallopt():
    """glibc's mallopt, or None where the C library is not glibc."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def _reuse_freed_memory():
    """Let glibc's malloc keep freed arrays' memory for the next ones, instead of handing it back to
    the system and taking fresh pages, each zeroed by the kernel on first touch (a page fault).

    A training step frees and allocates hundreds of arrays of 0.1-30 MB. By default glibc maps
    large ones separately and trims the top of its heap once more than a few MB there are free:
    the VAE's training step took 2,500 page faults (10 MB of fresh pages) each time, the UNet's
    more. With arrays up to 32 MiB kept in the heap (M_MMAP_THRESHOLD) and the heap not trimmed
    below 1 GiB of free memory (M_TRIM_THRESHOLD): 6 and 36 faults a step, VAE 2-7% and UNet 3-8%
    faster, the same peak resident memory.
    Not done where the environment sets malloc options (MALLOC_* variables, or glibc.malloc.*
    tunables in GLIBC_TUNABLES), where TINYSD_REUSE_FREED_MEMORY=0, or without glibc. The
    threshold first, since a trim threshold alone would stop glibc from raising its mmap
    threshold by itself and map every array above 128 KiB afresh.
    """
    if (os.environ.get("TINYSD_REUSE_FREED_MEMORY", "1") == "0" or any(k.startswith("MALLOC_") for k in os.environ)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    if mallopt(m_mmap_threshold, 32 << 20):
        mallopt(m_trim_threshold, 1 << 30)


_reuse_freed_memory()

import numpy as np  # noqa: E402

from . import backend, ops
from .tensor import (
    Function,
    Tensor,
    arange,
    default_generator,
    enable_grad,
    full,
    full_like,
    is_grad_enabled,
    manual_seed,
    no_grad,
    ones,
    ones_like,
    rand,
    randint,
    randn,
    randn_like,
    tensor,
    zeros,
    zeros_like,
)
from .ops import (
    abs,
    argmax,
    argmin,
    cat,
    chunk,
    clamp,
    exp,
    flatten,
    log,
    log_softmax,
    matmul,
    max,
    maximum,
    mean,
    min,
    minimum,
    pad,
    permute,
    relu,
    reshape,
    sigmoid,
    softmax,
    split,
    sqrt,
    squeeze,
    stack,
    sum,
    tanh,
    transpose,
    unsqueeze,
    var,
    where,
)

float32 = np.float32
float64 = np.float64
int64 = np.int64
bool_ = np.bool_


set_num_threads = backend.set_num_threads
get_num_threads = backend.get_num_threads


class cuda:
    """`tinysd.cuda.is_available()`, as in PyTorch."""

    is_available = staticmethod(backend.cuda_is_available)


def __getattr__(name):
    """`tinysd.StableDiffusionPipeline`, imported on first use (it pulls in the models)."""
    if name == "StableDiffusionPipeline":
        from .pipeline import StableDiffusionPipeline

        return StableDiffusionPipeline
    raise AttributeError(f"module 'tinysd' has no attribute {name!r}")


__version__ = "0.1.0"
