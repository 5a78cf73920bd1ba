"""Devices and array modules.

A tinysd Tensor holds a NumPy array (device "cpu") or a CuPy array (device
"cuda"). Code that must work on both asks for the array module of its data:

    xp = array_module(x)      # numpy or cupy
    y = xp.exp(x)

CuPy is imported lazily, so everything works on machines without it.
"""

import numpy as np

_cupy = None
_cupy_checked = False


def cupy_or_none():
    """Return the cupy module if it is importable, else None (checked once)."""
    global _cupy, _cupy_checked
    if not _cupy_checked:
        _cupy_checked = True
        try:
            import cupy

            _cupy = cupy
        except Exception:  # ImportError, or a broken CUDA install
            _cupy = None
    return _cupy


def is_cupy_array(x):
    cp = cupy_or_none()
    return cp is not None and isinstance(x, cp.ndarray)


def array_module(x):
    """numpy for NumPy arrays (and scalars), cupy for CuPy arrays."""
    return cupy_or_none() if is_cupy_array(x) else np


def device_of(x):
    return "cuda" if is_cupy_array(x) else "cpu"


def normalize_device(device):
    """Accept "cpu", "cuda", "cuda:0" (one GPU is supported) and return "cpu" or "cuda"."""
    name = str(device).lower()
    if name == "cpu":
        return "cpu"
    if name in ("cuda", "cuda:0", "gpu"):
        return "cuda"
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")


def to_device(x, device):
    """Move an array to a device ("cpu" or "cuda"); a no-op when it is already there."""
    device = normalize_device(device)
    if device == device_of(x):
        return x
    if device == "cpu":
        return x.get()
    if not cuda_is_available():
        raise RuntimeError("device 'cuda' requested, but CuPy or an NVIDIA GPU is not available")
    return cupy_or_none().asarray(x)


def cuda_is_available():
    """True when CuPy imports and sees at least one GPU."""
    cp = cupy_or_none()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def xp_for_device(device):
    if normalize_device(device) == "cuda":
        if not cuda_is_available():
            raise RuntimeError("device 'cuda' requested, but CuPy or an NVIDIA GPU is not available")
        return cupy_or_none()
    return np


# ---- CPU threads -------------------------------------------------------------------------------------
def set_num_threads(n):
    """Run CPU work on n threads: Numba's parallel kernels and NumPy's BLAS (OpenBLAS, MKL).

    Like torch.set_num_threads. Use fewer threads than cores when other programs keep some
    cores busy: BLAS threads meet after every matrix product, and one that the OS has
    parked behind another program holds up the rest. Measured on a 2-core machine with
    another process spinning on one core, a UNet training step of examples/mnist_digits.py
    took 0.73 s on 2 threads and 0.34 s on 1 (on an idle machine: 0.28 s and 0.34 s).
    BLAS threads are set through threadpoolctl (installed with tinysd[numba]); without it
    only Numba's threads change, and a warning says so.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int, got {n!r}")
    try:
        import numba
    except ImportError:
        pass
    else:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import warnings

        warnings.warn("set_num_threads: threadpoolctl is not installed, so NumPy's BLAS keeps its own "
                      "thread count (pip install threadpoolctl, or set OPENBLAS_NUM_THREADS before starting)",
                      stacklevel=2)
    else:
        threadpool_limits(n, user_api="blas")  # stays in force: not used as a context manager


def get_num_threads():
    """Numba's thread count for parallel kernels (all cores unless set_num_threads or NUMBA_NUM_THREADS said less)."""
    try:
        import numba
    except ImportError:
        return 1
    return numba.get_num_threads()
