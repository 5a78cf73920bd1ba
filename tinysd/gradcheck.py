"""Finite-difference gradient checks.

The derivative is the limit of a difference quotient; the central difference

    df/dx_i ~ (f(x + eps e_i) - f(x - eps e_i)) / (2 eps)

has error O(eps^2), so in float64 with eps = 1e-6 it agrees with the exact
derivative to about 1e-8. `gradcheck` compares that with what `backward()`
computes. It checks a vector-Jacobian product with a *random* upstream
gradient v: L(x) = sum(v * fn(x)). (With v = 1 a transposed gradient can
still add up right; with random v it cannot.)

Two modes:
  full         every element of every input is perturbed: exact, one pair of
               forward passes per element, for small inputs.
  directional  one random unit direction u (over all inputs at once):
               (L(x + eps u) - L(x - eps u)) / 2 eps must equal sum(grad * u).
               Two forward passes, for large inputs such as conv and attention.
"""

import numpy as np

from . import backend
from .tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    pass


def numerical_grad(f, x, eps=1e-6):
    """dL/dx by central differences, for a function f of one array returning a scalar.

    `x` is a NumPy array (or a Tensor, whose values are used); f receives a
    perturbed copy and may return a Python number, a 0-d array or a 1-element Tensor.
    """
    # order="C": a C-ordered copy, so `flat` below is a view of it (for a transposed x,
    # reshape(-1) would return a copy and the perturbations would never reach f).
    x = np.array(x.numpy() if isinstance(x, Tensor) else x, dtype=np.float64, order="C")
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + eps
        plus = _scalar(f(x.copy()))
        flat[i] = original - eps
        minus = _scalar(f(x.copy()))
        flat[i] = original
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def _scalar(value):
    if isinstance(value, Tensor):
        return float(value.item())
    return float(np.asarray(backend.to_device(np.asarray(value) if np.isscalar(value) else value, "cpu")))


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, mode="auto", seed=0, full_limit=512):
    """Check backward() of `fn(*inputs)` against finite differences; raise GradcheckError on mismatch.

    inputs: Tensors (float64 ones with requires_grad=True are checked; others
    are passed through) or arrays. Returns True when every gradient matches:
    |analytic - numeric| <= atol + rtol * |numeric|.
    mode: "full", "directional", or "auto" (full when the checked inputs hold
    at most `full_limit` elements).
    """
    inputs = [x if isinstance(x, Tensor) else Tensor(np.asarray(x)) for x in inputs]
    checked = [i for i, x in enumerate(inputs) if x.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise ValueError(f"gradcheck: input {i} is {inputs[i].dtype}; finite differences need float64")
    rng = np.random.default_rng(seed)

    out = fn(*inputs)
    xp = backend.array_module(out.data)
    v = xp.asarray(rng.standard_normal(out.shape))
    for x in inputs:
        x.grad = None
    out.backward(v)
    analytic = {i: _host(inputs[i].grad.data) if inputs[i].grad is not None else np.zeros(inputs[i].shape)
                for i in checked}

    def loss(values):
        """L with input i replaced by values[i]."""
        args = [Tensor(backend.to_device(values[i], inputs[i].device)) if i in values else x
                for i, x in enumerate(inputs)]
        with no_grad():
            y = fn(*args)
        return float((_host(y.data) * _host(v)).sum())

    base = {i: _host(inputs[i].data).astype(np.float64) for i in checked}
    total = sum(base[i].size for i in checked)
    if mode == "auto":
        mode = "full" if total <= full_limit else "directional"

    if mode == "full":
        for i in checked:
            numeric = numerical_grad(lambda xi: loss({**base, i: xi}), base[i], eps)
            _compare(f"input {i}", analytic[i], numeric, atol, rtol)
    elif mode == "directional":
        direction = {i: rng.standard_normal(base[i].shape) for i in checked}
        norm = np.sqrt(sum((d * d).sum() for d in direction.values())) or 1.0
        direction = {i: d / norm for i, d in direction.items()}
        plus = loss({i: base[i] + eps * direction[i] for i in checked})
        minus = loss({i: base[i] - eps * direction[i] for i in checked})
        numeric = (plus - minus) / (2 * eps)
        predicted = sum(float((analytic[i] * direction[i]).sum()) for i in checked)
        _compare(f"inputs {checked} along a random direction", np.array(predicted), np.array(numeric), atol, rtol)
    else:
        raise ValueError(f"gradcheck: unknown mode {mode!r} (full, directional or auto)")
    return True


def _host(a):
    return backend.to_device(a, "cpu")


def _compare(what, analytic, numeric, atol, rtol):
    error = np.abs(analytic - numeric)
    allowed = atol + rtol * np.abs(numeric)
    if np.all(error <= allowed):
        return
    worst = np.unravel_index(np.argmax(error - allowed), error.shape) if error.ndim else ()
    raise GradcheckError(
        f"gradcheck failed for {what}: worst element {tuple(int(k) for k in worst)}: "
        f"backward gives {analytic[worst]:.8g}, finite differences give {numeric[worst]:.8g}, "
        f"error {error[worst]:.3g} > allowed {allowed[worst]:.3g} "
        f"({int((error > allowed).sum())} of {error.size} elements off)"
    )
