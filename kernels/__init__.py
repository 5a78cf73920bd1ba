"""Hot kernels, one module per backend, with the same function names in each.

    reference   plain NumPy: the readable specification of every kernel
    numba_cpu   Numba versions for NumPy arrays on the CPU
    cupy_gpu    CuPy versions for arrays on an NVIDIA GPU

`for_array(x)` picks the module for an array: CuPy arrays get `cupy_gpu`,
NumPy arrays get `numba_cpu` when numba is importable, else `reference`.
Setting the environment variable TINYSD_KERNELS=reference forces the
reference everywhere (for debugging, and to test the gradients once with it).
"""

import importlib
import os

from tinysd import backend

_modules = {}


def load(name):
    """Import one backend module ("reference", "numba_cpu", "cupy_gpu") once; None if unavailable."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"kernels.{name}")
        except ImportError:
            _modules[name] = None
    return _modules[name]


def forced():
    """The backend forced by TINYSD_KERNELS, or None."""
    value = os.environ.get("TINYSD_KERNELS", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("reference", "numba_cpu", "cupy_gpu"):
        raise ValueError(f"TINYSD_KERNELS={value!r}: expected reference, numba_cpu, cupy_gpu or auto")
    return value


def for_array(x):
    """The kernel module that should process array `x`."""
    name = forced()
    if name == "reference":
        return load("reference")
    if backend.is_cupy_array(x):
        return load("cupy_gpu")
    return load("numba_cpu") or load("reference")
