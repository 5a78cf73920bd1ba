"""Shared test helpers: safe sample values, memory layouts, and `check_op`.

    check_op(shapes, numpy_fn, our_fn)

draws one array per shape, checks `our_fn` against `numpy_fn` in float32 and
float64, then gradient-checks `our_fn` in float64 against finite differences.
"""

import importlib.util
import math
from pathlib import Path

import numpy as np

import tinysd
from tinysd.gradcheck import gradcheck
from tinysd.tensor import Function

LAYOUTS = ("contiguous", "transposed", "strided")


def sample(rng, shapes, positive=()):
    """Float64 arrays of `shapes` that keep finite differences honest.

    All values, over all arrays, are distinct and at least 0.002 apart, with
    |x| in [0.25, 2.5]: no ties (max, maximum) and no kinks (abs, relu, clamp)
    within a finite-difference step. Arrays whose index is in `positive` are
    > 0 (log, sqrt, the base of pow); the others get random signs.
    """
    sizes = [math.prod(s) for s in shapes]
    values = np.linspace(0.25, 2.5, sum(sizes))[rng.permutation(sum(sizes))]
    arrays, start = [], 0
    for i, (shape, size) in enumerate(zip(shapes, sizes)):
        a = values[start : start + size].reshape(shape)
        if i not in positive:
            a = a * rng.choice([-1.0, 1.0], size=shape)
        arrays.append(a)
        start += size
    return arrays


def with_layout(a, layout):
    """The same values as `a`, stored contiguously, in reversed axis order, or with gaps."""
    if layout == "transposed":
        return a.T.copy().T  # Fortran order (np.ascontiguousarray would make a 0-d array 1-d)
    if layout == "strided" and a.ndim:
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        wide[..., ::2] = a
        return wide[..., ::2]
    return a


class DtypeProbe(Function):
    """Identity whose backward records the dtype of the gradient that reaches it."""

    seen = []

    def forward(self, x):
        return x

    def backward(self, g):
        DtypeProbe.seen.append(g.dtype)
        return g


def check_op(shapes, numpy_fn, our_fn, *, seed=0, positive=(), layout="contiguous", device="cpu",
             arrays=None, grad=True, rtol32=1e-5):
    """Forward against NumPy (float32, float64), gradient dtype (float32), gradcheck (float64).

    `arrays` overrides the sampled inputs; `layout` stores the float64 inputs
    non-contiguously to check that ops do not assume C order.
    """
    if arrays is None:
        arrays = sample(np.random.default_rng(seed), shapes, positive)
    for dtype, rtol in ((np.float64, 1e-12), (np.float32, rtol32)):
        inputs = [with_layout(a.astype(dtype), layout) for a in arrays]
        out = our_fn(*(tinysd.tensor(a, device=device) for a in inputs))
        expected = np.asarray(numpy_fn(*inputs))
        assert out.shape == expected.shape, f"shape {out.shape}, NumPy gives {expected.shape}"
        assert out.dtype == dtype, f"{dtype.__name__} inputs gave a {out.dtype} result"
        np.testing.assert_allclose(out.numpy(), expected, rtol=rtol, atol=rtol)
    if not grad:
        return
    # In float32 every gradient, including those passed between ops, stays float32.
    DtypeProbe.seen = []
    xs = [tinysd.tensor(a.astype(np.float32), requires_grad=True, device=device) for a in arrays]
    out = our_fn(*(DtypeProbe.apply(x) for x in xs))
    out.backward(tinysd.ones_like(out))
    assert DtypeProbe.seen and all(d == np.float32 for d in DtypeProbe.seen), DtypeProbe.seen
    assert all(x.grad.dtype == np.float32 and x.grad.shape == x.shape for x in xs)
    # float64, non-contiguous when asked: finite differences against backward().
    xs = [tinysd.tensor(with_layout(a, layout), requires_grad=True, device=device) for a in arrays]
    assert gradcheck(our_fn, xs)


def load_script(relative_path):
    """A script of this repository (an example, a benchmark) imported as a module, by its path."""
    path = Path(__file__).resolve().parent.parent / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
