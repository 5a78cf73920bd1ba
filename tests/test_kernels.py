"""Kernel tests.

Part 1 checks kernels/reference.py against direct definitions (nested loops,
mean/var formulas, the softmax formula, adjoint identities, finite
differences) in float64. Part 2 checks every available backend module
(reference, numba_cpu, cupy_gpu) against the reference, on shapes drawn by
hypothesis, in float32 (loose tolerance) and float64 (tight).
"""

import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import tinysd
from kernels import load
from kernels import reference as ref
from tinysd import backend
from tinysd.gradcheck import numerical_grad


# ---- shared strategies and helpers --------------------------------------------
pairs = lambda lo, hi: st.tuples(st.integers(lo, hi), st.integers(lo, hi))  # noqa: E731


@st.composite
def conv_configs(draw, max_groups=3):
    """A conv2d problem: shapes, stride, padding, dilation, groups with HO, WO >= 1."""
    groups = draw(st.integers(1, max_groups))
    c = groups * draw(st.integers(1, 3))
    o = groups * draw(st.integers(1, 3))
    kernel, stride, dilation, padding = draw(pairs(1, 3)), draw(pairs(1, 3)), draw(pairs(1, 2)), draw(pairs(0, 2))
    size = [
        max(1, dilation[a] * (kernel[a] - 1) + 1 - 2 * padding[a]) + draw(st.integers(0, 5)) for a in range(2)
    ]
    n = draw(st.integers(1, 2))
    return dict(x_shape=(n, c, *size), w_shape=(o, c // groups, *kernel), stride=stride, padding=padding,
                dilation=dilation, groups=groups)


@st.composite
def pool_configs(draw):
    """A pooling problem: kernel, stride, padding <= kernel // 2 (PyTorch's rule) and an input the window fits."""
    kernel, stride = draw(pairs(1, 3)), draw(pairs(1, 3))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    size = [max(1, kernel[a] - 2 * padding[a]) + draw(st.integers(0, 5)) for a in range(2)]
    return dict(x_shape=(draw(st.integers(1, 2)), draw(st.integers(1, 3)), *size), kernel=kernel, stride=stride,
                padding=padding)


def conv_out(cfg):
    n, c, h, w = cfg["x_shape"]
    o, _, kh, kw = cfg["w_shape"]
    (sh, sw), (ph, pw), (dh, dw) = cfg["stride"], cfg["padding"], cfg["dilation"]
    return (n, o, (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def randn(*shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def dot(a, b):
    return float(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64)))


# ---- part 1: the reference against direct definitions (float64) ---------------
def direct_conv2d(x, w, stride, padding, dilation, groups):
    """y[n,o,a,b] = sum_{c,i,j} w[o,c,i,j] x[n, g(o) C/G + c, a sh + i dh - ph, b sw + j dw - pw], nested loops."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, o, ho, wo))
    for b_, oc, a, b in itertools.product(range(n), range(o), range(ho), range(wo)):
        first_channel = (oc // (o // groups)) * cg
        for ci, i, j in itertools.product(range(cg), range(kh), range(kw)):
            r, col = a * sh + i * dh - ph, b * sw + j * dw - pw
            if 0 <= r < h and 0 <= col < wd:
                y[b_, oc, a, b] += w[oc, ci, i, j] * x[b_, first_channel + ci, r, col]
    return y


@given(conv_configs(), st.booleans())
def test_reference_conv2d_matches_nested_loops(cfg, with_bias):
    x, w = randn(*cfg["x_shape"]), randn(*cfg["w_shape"], seed=1)
    args = cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"]
    bias = randn(cfg["w_shape"][0], seed=2) if with_bias else None
    expected = direct_conv2d(x, w, *args) + (0 if bias is None else bias[:, None, None])
    np.testing.assert_allclose(ref.conv2d(x, w, *args, bias), expected, rtol=1e-12, atol=1e-12)


@given(conv_configs())
def test_reference_conv2d_gradients_are_adjoints(cfg):
    """<conv(x, w), dy> == <x, grad_input(dy)> == <w, grad_weight(dy)> (conv is linear in x and in w)."""
    x, w, dy = randn(*cfg["x_shape"]), randn(*cfg["w_shape"], seed=1), randn(*conv_out(cfg), seed=2)
    args = cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"]
    lhs = dot(ref.conv2d(x, w, *args), dy)
    dx = ref.conv2d_grad_input(dy, w, x.shape, *args)
    dw = ref.conv2d_grad_weight(dy, x, w.shape, *args)
    assert dx.shape == x.shape and dw.shape == w.shape
    assert math.isclose(lhs, dot(x, dx), rel_tol=1e-10, abs_tol=1e-10)
    assert math.isclose(lhs, dot(w, dw), rel_tol=1e-10, abs_tol=1e-10)


@given(conv_configs(), st.data())
def test_reference_conv_transpose2d_is_adjoint_of_conv2d(cfg, data):
    """<conv_transpose(x, w), y> == <x, conv2d(y, w)>, and the output has PyTorch's size."""
    (sh, sw), (dh, dw) = cfg["stride"], cfg["dilation"]
    output_padding = (data.draw(st.integers(0, max(sh, dh) - 1)), data.draw(st.integers(0, max(sw, dw) - 1)))
    n, o, h, w_ = conv_out(cfg)
    w = randn(o, cfg["w_shape"][1], *cfg["w_shape"][2:], seed=1)  # (C_in, C_out / G, KH, KW), C_in = o
    x = randn(n, o, h, w_)
    (kh, kw), (ph, pw) = w.shape[2:], cfg["padding"]
    ho = (h - 1) * sh - 2 * ph + dh * (kh - 1) + output_padding[0] + 1
    wo = (w_ - 1) * sw - 2 * pw + dw * (kw - 1) + output_padding[1] + 1
    assume(min(ho, wo) >= 1)  # empty outputs are an error (test_conv_transpose2d_matches_reference)
    y = ref.conv_transpose2d(x, w, cfg["stride"], cfg["padding"], output_padding, cfg["dilation"], cfg["groups"])
    assert y.shape == (n, w.shape[1] * cfg["groups"], ho, wo)
    probe = randn(*y.shape, seed=3)
    back = ref.conv2d(probe, w, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"])
    back = back[:, :, :h, :w_]  # output_padding >= stride (allowed when < dilation) adds rows no input reaches
    assert math.isclose(dot(y, probe), dot(x, back), rel_tol=1e-10, abs_tol=1e-10)


def test_reference_conv2d_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="conv2d"):
        ref.conv2d(randn(1, 4, 5, 5), randn(2, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1)


def direct_windows(x, kernel, stride, padding, pad_value):
    """{(n, c, a, b): list of (value, flat index)} over each pooling window, padding as pad_value (index -1)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = {}
    for key in itertools.product(range(n), range(c), range(ho), range(wo)):
        window = []
        for i, j in itertools.product(range(kh), range(kw)):
            r, col = key[2] * sh + i - ph, key[3] * sw + j - pw
            inside = 0 <= r < h and 0 <= col < w
            window.append((x[key[0], key[1], r, col] if inside else pad_value, r * w + col if inside else -1))
        out[key] = window
    return out, (ho, wo)


@given(pool_configs())
def test_reference_pools_match_direct_windows(cfg):
    x = randn(*cfg["x_shape"])
    kernel, stride, padding = cfg["kernel"], cfg["stride"], cfg["padding"]
    y, argmax = ref.max_pool2d(x, kernel, stride, padding)
    avg = ref.avg_pool2d(x, kernel, stride, padding)
    windows, (ho, wo) = direct_windows(x, kernel, stride, padding, -np.inf)
    assert y.shape == avg.shape == argmax.shape == x.shape[:2] + (ho, wo)
    for key, window in windows.items():
        values = [v for v, _ in window]
        best = int(np.argmax(values))
        assert y[key] == values[best] and argmax[key] == window[best][1]
        assert math.isclose(avg[key], sum(v for v in values if v != -np.inf) / len(values), abs_tol=1e-12)


@given(pool_configs())
def test_reference_pool_backwards_match_finite_differences(cfg):
    x = randn(*cfg["x_shape"])
    kernel, stride, padding = cfg["kernel"], cfg["stride"], cfg["padding"]
    y, argmax = ref.max_pool2d(x, kernel, stride, padding)
    dy = randn(*y.shape, seed=1)
    dx = ref.max_pool2d_backward(dy, argmax, x.shape, kernel, stride, padding)
    np.testing.assert_allclose(dx, numerical_grad(lambda t: dot(ref.max_pool2d(t, kernel, stride, padding)[0], dy), x),
                               atol=1e-6)
    dx = ref.avg_pool2d_backward(dy, x.shape, kernel, stride, padding)
    np.testing.assert_allclose(dx, numerical_grad(lambda t: dot(ref.avg_pool2d(t, kernel, stride, padding), dy), x),
                               atol=1e-6)


@given(pairs(1, 3), st.integers(1, 3))
def test_reference_upsample_nearest(scale, h):
    x = randn(2, 2, h, h + 1)
    y = ref.upsample_nearest2d(x, scale)
    for n, c, i, j in np.ndindex(*y.shape):
        assert y[n, c, i, j] == x[n, c, i // scale[0], j // scale[1]]
    dy = randn(*y.shape, seed=1)
    assert math.isclose(dot(y, dy), dot(x, ref.upsample_nearest2d_backward(dy, scale)), rel_tol=1e-12)


def finite_difference_check(forward, inputs, grads, dout, eps=1e-6):
    """Each gradient in `grads` equals the numerical gradient of <forward(*inputs), dout> w.r.t. that input."""
    for index, grad in grads.items():
        def loss(t, index=index):
            args = list(inputs)
            args[index] = t
            return dot(forward(*args), dout)

        np.testing.assert_allclose(grad, numerical_grad(loss, inputs[index], eps=eps), rtol=1e-5, atol=1e-6)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.booleans(), st.booleans())
def test_reference_group_norm_formula_and_gradients(n, groups, per_group, affine, with_silu):
    c = groups * per_group
    x = randn(n, c, 3, 2) * 2 + 1
    weight, bias = (randn(c, seed=1), randn(c, seed=2)) if affine else (None, None)
    y, mean, rstd = ref.group_norm(x, groups, weight, bias, 1e-5)
    xg = x.reshape(n, groups, -1)
    np.testing.assert_allclose(mean, xg.mean(axis=2), atol=1e-12)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(xg.var(axis=2) + 1e-5), rtol=1e-12)
    expected = ((xg - xg.mean(2, keepdims=True)) / np.sqrt(xg.var(2, keepdims=True) + 1e-5)).reshape(x.shape)
    if affine:
        expected = expected * weight[:, None, None] + bias[:, None, None]
    np.testing.assert_allclose(y, expected, atol=1e-12)
    if with_silu:  # silu(group_norm(x)) in one op, and its gradients
        y, mean, rstd = ref.group_norm(x, groups, weight, bias, 1e-5, with_silu=True)
        np.testing.assert_allclose(y, expected / (1 + np.exp(-expected)), atol=1e-12)
    dy = randn(*x.shape, seed=3)
    dx, dweight, dbias = ref.group_norm_backward(dy, x, mean, rstd, weight, groups, bias, with_silu)
    forward = lambda x_, w_, b_: ref.group_norm(x_, groups, w_, b_, 1e-5, with_silu)[0]  # noqa: E731
    grads = {0: dx, 1: dweight, 2: dbias} if affine else {0: dx}
    finite_difference_check(forward, [x, weight, bias], grads, dy)


@given(st.integers(1, 4), st.integers(1, 6), st.booleans())
def test_reference_layer_norm_formula_and_gradients(m, d, affine):
    x = randn(m, d) * 3 - 1
    weight, bias = (randn(d, seed=1), randn(d, seed=2)) if affine else (None, None)
    y, mean, rstd = ref.layer_norm(x, weight, bias, 1e-5)
    np.testing.assert_allclose(mean, x.mean(1), atol=1e-12)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(x.var(1) + 1e-5), rtol=1e-12)
    expected = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    if affine:
        expected = expected * weight + bias
    np.testing.assert_allclose(y, expected, atol=1e-12)
    dy = randn(m, d, seed=3)
    dx, dweight, dbias = ref.layer_norm_backward(dy, x, mean, rstd, weight)
    forward = lambda x_, w_, b_: ref.layer_norm(x_, w_, b_, 1e-5)[0]  # noqa: E731
    finite_difference_check(forward, [x, weight, bias], {0: dx, 1: dweight, 2: dbias} if affine else {0: dx}, dy)


@st.composite
def attention_configs(draw):
    b, h, sq, sk, d, dv = (draw(st.integers(1, n)) for n in (2, 3, 5, 5, 4, 4))
    mask_kind = draw(st.sampled_from(["none", "additive", "boolean-like"]))
    return dict(b=b, h=h, sq=sq, sk=sk, d=d, dv=dv, mask_kind=mask_kind, is_causal=draw(st.booleans()),
                mask_batch=draw(st.sampled_from([1, b * h])), heads_last=draw(st.booleans()))


def attention_inputs(cfg, dtype=np.float64):
    """q (B, H, Sq, D), k, v; with heads_last, views of (B, S, H, E) arrays (a projection's heads); a mask
    of (1 or B * H) items, item b * H + h for head h of entry b."""
    def heads(s, e, seed):
        if cfg.get("heads_last"):
            return randn(cfg["b"], s, cfg["h"], e, dtype=dtype, seed=seed).transpose(0, 2, 1, 3)
        return randn(cfg["b"], cfg["h"], s, e, dtype=dtype, seed=seed)

    q, k, v = heads(cfg["sq"], cfg["d"], 0), heads(cfg["sk"], cfg["d"], 1), heads(cfg["sk"], cfg["dv"], 2)
    mask = None
    shape = (cfg["mask_batch"], cfg["sq"], cfg["sk"])
    if cfg["mask_kind"] == "additive":
        mask = randn(*shape, dtype=dtype, seed=3)
    elif cfg["mask_kind"] == "boolean-like":  # 0 keeps, -inf drops; key 0 always kept
        drop = np.random.default_rng(4).random(shape) < 0.4
        drop[..., 0] = False
        mask = np.where(drop, -np.inf, 0.0).astype(dtype)
    return q, k, v, mask, 1.0 / math.sqrt(cfg["d"])


@given(attention_configs())
def test_reference_attention_matches_softmax_formula(cfg):
    q, k, v, mask, scale = attention_inputs(cfg)
    out, lse = ref.attention(q, k, v, mask, scale, cfg["is_causal"])
    for b, h, i in np.ndindex(cfg["b"], cfg["h"], cfg["sq"]):
        s = np.array([scale * q[b, h, i] @ k[b, h, j] for j in range(cfg["sk"])])
        if mask is not None:
            s = s + mask[0 if mask.shape[0] == 1 else b * cfg["h"] + h, i]
        if cfg["is_causal"]:
            s[i + 1:] = -np.inf  # top-left aligned tril(ones(Sq, Sk))
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        np.testing.assert_allclose(out[b, h, i], p @ v[b, h], atol=1e-12)
        assert math.isclose(lse[b, h, i], s.max() + math.log(np.exp(s - s.max()).sum()), rel_tol=1e-12,
                            abs_tol=1e-12)


@given(attention_configs())
def test_reference_attention_backward_matches_finite_differences(cfg):
    q, k, v, mask, scale = attention_inputs(cfg)
    out, lse = ref.attention(q, k, v, mask, scale, cfg["is_causal"])
    dout = randn(*out.shape, seed=5)
    dq, dk, dv = ref.attention_backward(dout, q, k, v, out, lse, mask, scale, cfg["is_causal"])
    forward = lambda q_, k_, v_: ref.attention(q_, k_, v_, mask, scale, cfg["is_causal"])[0]  # noqa: E731
    finite_difference_check(forward, [q, k, v], {0: dq, 1: dk, 2: dv}, dout)


def test_reference_attention_fully_masked_row_outputs_zero():
    q, k, v = randn(1, 1, 2, 3), randn(1, 1, 4, 3, seed=1), randn(1, 1, 4, 2, seed=2)
    mask = np.zeros((1, 2, 4))
    mask[0, 1] = -np.inf
    out, lse = ref.attention(q, k, v, mask, 0.5, False)
    assert np.all(out[0, 0, 1] == 0) and lse[0, 0, 1] == -np.inf and np.all(np.isfinite(out[0, 0, 0]))
    dq, dk, dv = ref.attention_backward(np.ones_like(out), q, k, v, out, lse, mask, 0.5, False)
    assert np.all(dq[0, 0, 1] == 0) and np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))


@given(st.integers(1, 4), st.integers(1, 5), st.sampled_from([0, 1, -1]))
def test_reference_softmax_formula_and_gradients(m, d, axis):
    x = randn(m, d, 2) * 3
    y = ref.softmax(x, axis)
    np.testing.assert_allclose(y, np.exp(x) / np.exp(x).sum(axis=axis, keepdims=True), rtol=1e-12)
    dy = randn(*x.shape, seed=1)
    finite_difference_check(lambda t: ref.softmax(t, axis), [x], {0: ref.softmax_backward(dy, y, axis)}, dy)
    y = ref.log_softmax(x, axis)
    np.testing.assert_allclose(y, np.log(np.exp(x) / np.exp(x).sum(axis=axis, keepdims=True)), atol=1e-12)
    finite_difference_check(lambda t: ref.log_softmax(t, axis), [x], {0: ref.log_softmax_backward(dy, y, axis)}, dy)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_reference_activations_formula_and_gradients(approximate):
    x = np.concatenate([randn(20) * 3, [-800.0, -40.0, 0.0, 40.0, 800.0]])
    with np.errstate(over="ignore"):
        silu = x / (1 + np.exp(-x))
    np.testing.assert_allclose(ref.silu(x), silu, atol=1e-12)
    erf = np.array([math.erf(t / math.sqrt(2)) for t in x])
    tanh = np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
    np.testing.assert_allclose(ref.gelu(x, approximate), 0.5 * x * (1 + (erf if approximate == "none" else tanh)),
                               atol=1e-12)
    x, dy = randn(20) * 3, randn(20, seed=1)
    finite_difference_check(ref.silu, [x], {0: ref.silu_backward(dy, x)}, dy)
    finite_difference_check(lambda t: ref.gelu(t, approximate), [x], {0: ref.gelu_backward(dy, x, approximate)}, dy)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_reference_geglu_formula_and_gradient(approximate):
    x, dy = randn(3, 2, 10) * 3, randn(3, 2, 5, seed=1)
    np.testing.assert_allclose(ref.geglu(x, approximate), x[..., :5] * ref.gelu(x[..., 5:], approximate), atol=1e-12)
    finite_difference_check(lambda t: ref.geglu(t, approximate), [x], {0: ref.geglu_backward(dy, x, approximate)}, dy)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_reference_adamw_matches_scalar_formula(amsgrad):
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.99, 1e-8, 0.1
    p0, grads = randn(5), [randn(5, seed=s) for s in range(1, 4)]
    p, m, v = p0.copy(), np.zeros(5), np.zeros(5)
    vmax = np.zeros(5) if amsgrad else None
    for step, g in enumerate(grads, start=1):
        ref.adamw_step(p, g, m, v, vmax, step, lr, b1, b2, eps, wd)
    for i in range(5):  # the same updates, one scalar at a time
        pi, mi, vi, vmi = p0[i], 0.0, 0.0, 0.0
        for step, g in enumerate(grads, start=1):
            pi *= 1 - lr * wd
            mi = b1 * mi + (1 - b1) * g[i]
            vi = b2 * vi + (1 - b2) * g[i] ** 2
            vmi = max(vmi, vi)
            vhat = (vmi if amsgrad else vi) / (1 - b2**step)
            pi -= lr * (mi / (1 - b1**step)) / (math.sqrt(vhat) + eps)
        assert math.isclose(p[i], pi, rel_tol=1e-12) and math.isclose(m[i], mi, rel_tol=1e-12)


# ---- part 2: every backend against the reference -------------------------------
def _backends():
    params = [pytest.param("reference", id="reference")]
    numba_marks = [] if load("numba_cpu") is not None else [pytest.mark.skip(reason="numba_cpu unavailable")]
    params.append(pytest.param("numba_cpu", marks=numba_marks, id="numba_cpu"))
    gpu = backend.cuda_is_available() and load("cupy_gpu") is not None
    params.append(pytest.param("cupy_gpu", id="cupy_gpu",
                               marks=[] if gpu else [pytest.mark.skip(reason="CuPy, a GPU or kernels.cupy_gpu absent")]))
    return params


class Backend:
    """A kernel module plus moving arrays to its device and back."""

    def __init__(self, name):
        self.name, self.module = name, load(name)
        self.device = "cuda" if name == "cupy_gpu" else "cpu"

    def __getattr__(self, name):
        return getattr(self.module, name)

    def put(self, x):
        return None if x is None else backend.to_device(x, self.device)

    def get(self, x):
        return None if x is None else backend.to_device(x, "cpu")


@pytest.fixture(scope="module", params=_backends())
def kb(request):
    return Backend(request.param)


DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-4, atol=2e-4), np.float64: dict(rtol=1e-10, atol=1e-10)}


def assert_matches(got, expected, dtype):
    got = backend.to_device(got, "cpu")
    assert got.dtype == expected.dtype == dtype, (got.dtype, expected.dtype)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@given(m=st.integers(1, 40), n_in=st.integers(1, 12), n_out=st.integers(1, 12), bias=st.booleans())
def test_linear_matches_reference(kb, dtype, m, n_in, n_out, bias):
    x, w, dy = randn(m, n_in, dtype=dtype), randn(n_out, n_in, dtype=dtype, seed=1), randn(m, n_out, dtype=dtype, seed=2)
    b = randn(n_out, dtype=dtype, seed=3) if bias else None
    assert_matches(kb.linear(kb.put(x), kb.put(w), kb.put(b)), ref.linear(x, w, b), dtype)
    assert_matches(kb.linear_grad_input(kb.put(dy), kb.put(w)), ref.linear_grad_input(dy, w), dtype)
    assert_matches(kb.linear_grad_weight(kb.put(dy), kb.put(x)), ref.linear_grad_weight(dy, x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(cfg=conv_configs(max_groups=2), with_bias=st.booleans())
def test_conv2d_matches_reference(kb, dtype, cfg, with_bias):
    x, w = randn(*cfg["x_shape"], dtype=dtype), randn(*cfg["w_shape"], dtype=dtype, seed=1)
    dy = randn(*conv_out(cfg), dtype=dtype, seed=2)
    args = cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"]
    bias = randn(cfg["w_shape"][0], dtype=dtype, seed=3) if with_bias else None
    assert_matches(kb.conv2d(kb.put(x), kb.put(w), *args, kb.put(bias)), ref.conv2d(x, w, *args, bias), dtype)
    assert_matches(kb.conv2d_grad_input(kb.put(dy), kb.put(w), x.shape, *args),
                   ref.conv2d_grad_input(dy, w, x.shape, *args), dtype)
    assert_matches(kb.conv2d_grad_weight(kb.put(dy), kb.put(x), w.shape, *args),
                   ref.conv2d_grad_weight(dy, x, w.shape, *args), dtype)


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
@pytest.mark.parametrize("dtype", DTYPES)
@given(cfg=conv_configs(max_groups=2), band_bytes=st.integers(0, 4000), with_bias=st.booleans())
def test_numba_conv2d_in_bands_of_rows_matches_reference(dtype, cfg, band_bytes, with_bias):
    """Large images go a band of output rows at a time (channels-first im2col, BLAS writing into y):
    forced here on small ones by shrinking the cache and band budgets (0 bytes: bands of one row).
    3x3 stride-1 convolutions the direct loops take (one input channel, say) never reach the bands."""
    numba_cpu = load("numba_cpu")
    x, w = randn(*cfg["x_shape"], dtype=dtype), randn(*cfg["w_shape"], dtype=dtype, seed=1)
    args = cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"]
    bias = randn(cfg["w_shape"][0], dtype=dtype, seed=3) if with_bias else None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_cpu, "_CACHE_BYTES", band_bytes)
        patch.setattr(numba_cpu, "_BAND_BYTES", band_bytes)
        bands = []
        patch.setattr(numba_cpu, "_conv2d_in_bands", lambda *a, f=numba_cpu._conv2d_in_bands: bands.append(1) or f(*a))
        got = numba_cpu.conv2d(x, w, *args, bias)
    _, _, ho, wo = conv_out(cfg)
    im2col_bytes = ho * wo * math.prod(cfg["w_shape"][2:]) * cfg["x_shape"][1] * np.dtype(dtype).itemsize
    plan = numba_cpu._ConvPlan("conv2d", x.shape, w.shape, *args, x.dtype)
    direct = numba_cpu._stride_1_3x3(plan) and numba_cpu._direct_3x3_fits(plan.c, plan.o, plan.wo)
    assert bool(bands) == (not direct and (im2col_bytes > band_bytes or cfg["x_shape"][1] == 1))
    assert_matches(got, ref.conv2d(x, w, *args, bias), dtype)


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
@pytest.mark.parametrize("dtype", DTYPES)
@given(cfg=conv_configs(max_groups=2), cache_scale=st.integers(1, 40))
def test_numba_conv_chunk_loops_on_one_thread_match_reference(dtype, cfg, cache_scale):
    """On one thread, float32 convolutions run their loop over chunks of samples compiled, calling
    OpenBLAS from Numba (kernels/blas.py's product); float64 runs the same loop as Python. Small
    cache budgets make chunks of a few samples, the last one short."""
    import numba

    numba_cpu, blas = load("numba_cpu"), load("blas")
    x, w = randn(*cfg["x_shape"], dtype=dtype), randn(*cfg["w_shape"], dtype=dtype, seed=1)
    dy, bias = randn(*conv_out(cfg), dtype=dtype, seed=2), randn(cfg["w_shape"][0], dtype=dtype, seed=3)
    args = cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"]
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        assert (blas.gemm_for(np.dtype(dtype)) is not None) == (blas._SGEMM is not None and dtype == np.float32)
        with pytest.MonkeyPatch.context() as patch:
            _, _, ho, wo = conv_out(cfg)  # a budget of at least one sample's im2col matrix: not the bands path
            im2col_bytes = ho * wo * cfg["x_shape"][1] * math.prod(cfg["w_shape"][2:]) * np.dtype(dtype).itemsize
            patch.setattr(numba_cpu, "_CACHE_BYTES", im2col_bytes * cache_scale)
            got = (numba_cpu.conv2d(x, w, *args), numba_cpu.conv2d(x, w, *args, bias),
                   numba_cpu.conv2d_grad_input(dy, w, x.shape, *args),
                   numba_cpu.conv2d_grad_weight(dy, x, w.shape, *args))
    finally:
        numba.set_num_threads(threads)
    expected = (ref.conv2d(x, w, *args), ref.conv2d(x, w, *args, bias), ref.conv2d_grad_input(dy, w, x.shape, *args),
                ref.conv2d_grad_weight(dy, x, w.shape, *args))
    for g, e in zip(got, expected):
        assert_matches(g, e, dtype)


def conv_and_gradients(m, x, w, dy, args, bias):
    """conv2d(x, w) + bias, its input gradient and its weight gradient (for dy) by the kernel module m."""
    return (m.conv2d(x, w, *args, bias), m.conv2d_grad_input(dy, w, x.shape, *args),
            m.conv2d_grad_weight(dy, x, w.shape, *args))


@st.composite
def winograd_configs(draw):
    """A 3x3, stride-1 conv2d problem of any size, padding 0 to 3 (3: more than F(2x2, 3x3)'s path takes)."""
    padding = draw(pairs(0, 3))
    size = [max(1, 3 - 2 * p) + draw(st.integers(0, 6)) for p in padding]
    n, channels = draw(st.integers(1, 3)), draw(st.integers(2, 5))  # (1 channel: conv2d goes by direct loops)
    return dict(x_shape=(n, channels, *size),
                w_shape=(draw(st.integers(1, 5)), 0, 3, 3), stride=(1, 1), padding=padding, dilation=(1, 1), groups=1)


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, None])
@given(cfg=winograd_configs(), cache_scale=st.integers(1, 20))
def test_numba_winograd_conv2d_matches_reference(dtype, threads, cfg, cache_scale):
    """3x3 convolutions with stride 1 go by Winograd's F(2x2, 3x3) (kernels/winograd.py) where padding <= 2:
    forward (+ bias), input and weight gradients against the reference, on one thread (float32: the
    compiled chunk loop) and on all; odd sizes crop the tiles, small cache budgets make short chunks, the
    last one shorter."""
    import numba

    numba_cpu = load("numba_cpu")
    cfg["w_shape"] = (cfg["w_shape"][0], cfg["x_shape"][1], 3, 3)
    x, w = randn(*cfg["x_shape"], dtype=dtype), randn(*cfg["w_shape"], dtype=dtype, seed=1)
    dy, bias = randn(*conv_out(cfg), dtype=dtype, seed=2), randn(cfg["w_shape"][0], dtype=dtype, seed=3)
    args = cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"]
    before = numba.get_num_threads()
    numba.set_num_threads(threads or before)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(numba_cpu, "_WINOGRAD_MIN_CHANNELS", 1)  # small problems: quick tests of the same path
            patch.setattr(numba_cpu, "_WINOGRAD_MIN_PRODUCT", 1)
            patch.setattr(numba_cpu, "_direct_3x3_fits", lambda c, o, width: False)  # (one output channel: dx)
            (_, _, ho, wo), c = conv_out(cfg), cfg["x_shape"][1]  # at least one sample's im2col matrix: no bands
            patch.setattr(numba_cpu, "_CACHE_BYTES", ho * wo * 9 * c * np.dtype(dtype).itemsize * cache_scale)
            calls = []
            for loop in ("_winograd_chunks", "_winograd_grad_weight_chunks"):
                patch.setattr(numba_cpu, loop, lambda *a, f=getattr(numba_cpu, loop): calls.append(1) or f(*a))
            got = conv_and_gradients(numba_cpu, x, w, dy, args, bias)
    finally:
        numba.set_num_threads(before)
    assert len(calls) == (3 if max(cfg["padding"]) <= 2 else 0)
    for g, e in zip(got, conv_and_gradients(ref, x, w, dy, args, bias)):
        assert_matches(g, e, dtype)


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
@pytest.mark.parametrize("dtype", DTYPES)
@given(n=st.integers(1, 3), c=st.sampled_from([1, 1, 2, 3, 4]), o=st.integers(1, 6), size=pairs(1, 9),
       padding=pairs(0, 2), with_bias=st.booleans())
def test_numba_direct_3x3_conv_matches_reference(dtype, n, c, o, size, padding, with_bias):
    """3x3, stride 1, with one input channel (an image model's first layer) or an even number of outputs
    and few channels (width limit lifted here) goes by direct loops over the padded input: forward (+ bias)
    and input gradient (whose own input channels are O) against the reference; the one-channel weight
    gradient too."""
    numba_cpu = load("numba_cpu")
    size = tuple(max(s, 3 - 2 * p) for s, p in zip(size, padding))  # the kernel fits the padded input
    x, w = randn(n, c, *size, dtype=dtype), randn(o, c, 3, 3, dtype=dtype, seed=1)
    bias = randn(o, dtype=dtype, seed=3) if with_bias else None
    args = (1, 1), padding, (1, 1), 1
    dy = randn(*ref.conv2d(x, w, *args).shape, dtype=dtype, seed=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_cpu, "_DIRECT_MIN_WIDTH", 1)
        calls = []
        for kernel in ("_one_channel_3x3", "_direct_3x3", "_one_channel_3x3_grad_weight"):
            patch.setattr(numba_cpu, kernel, lambda *a, f=getattr(numba_cpu, kernel), k=kernel: calls.append(k) or f(*a))
        got = conv_and_gradients(numba_cpu, x, w, dy, args, bias)
    direct = lambda cin, cout: "_one_channel_3x3" if cin == 1 else "_direct_3x3" if cout % 2 == 0 else None  # noqa: E731
    expected_calls = [direct(c, o), direct(o, c), "_one_channel_3x3_grad_weight" if c == 1 else None]
    assert calls == [k for k in expected_calls if k]
    for g, e in zip(got, conv_and_gradients(ref, x, w, dy, args, bias)):
        assert_matches(g, e, dtype)


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, None])
@given(n=st.integers(1, 5), c=st.integers(1, 6), o=st.integers(1, 6), size=pairs(1, 6), with_bias=st.booleans(),
       cache_scale=st.integers(1, 12))
def test_numba_pointwise_conv_matches_reference(dtype, threads, n, c, o, size, with_bias, cache_scale):
    """1x1 kernels with stride 1 and no padding go by one product per chunk of samples, channels first:
    forward (+ bias) and input gradient against the reference, on one thread (float32: the compiled loop)
    and on all; small cache budgets make chunks of one sample up to all, the last one shorter."""
    import numba

    numba_cpu = load("numba_cpu")
    x, w = randn(n, c, *size, dtype=dtype), randn(o, c, 1, 1, dtype=dtype, seed=1)
    bias = randn(o, dtype=dtype, seed=3) if with_bias else None
    args = (1, 1), (0, 0), (1, 1), 1
    dy = randn(n, o, *size, dtype=dtype, seed=2)
    before = numba.get_num_threads()
    numba.set_num_threads(threads or before)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(numba_cpu, "_CACHE_BYTES", max(c, o) * math.prod(size) * np.dtype(dtype).itemsize * cache_scale)
            calls = []
            patch.setattr(numba_cpu, "_pointwise_chunks",
                          lambda *a, f=numba_cpu._pointwise_chunks: calls.append(1) or f(*a))
            got = numba_cpu.conv2d(x, w, *args, bias), numba_cpu.conv2d_grad_input(dy, w, x.shape, *args)
    finally:
        numba.set_num_threads(before)
    assert len(calls) == (2 if c > 1 else 1)  # (a one-channel forward goes by bands)
    assert_matches(got[0], ref.conv2d(x, w, *args, bias), dtype)
    assert_matches(got[1], ref.conv2d_grad_input(dy, w, x.shape, *args), dtype)


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
@pytest.mark.parametrize("dtype", DTYPES)
def test_numba_pointwise_transpose_with_output_padding_matches_reference(dtype):
    """A 1x1 transposed convolution with output padding (as hypothesis found): its output has rows and
    columns no input pixel reaches, so it is not a product at every pixel; they stay zero."""
    numba_cpu = load("numba_cpu")
    x, w = randn(2, 3, 2, 3, dtype=dtype), randn(3, 4, 1, 1, dtype=dtype, seed=1)
    args = (1, 1), (0, 0), (1, 0), (2, 1), 1  # stride, padding, output padding, dilation, groups
    got = numba_cpu.conv_transpose2d(x, w, *args)
    assert got.shape == (2, 4, 3, 3)
    assert_matches(got, ref.conv_transpose2d(x, w, *args), dtype)


def test_winograd_f2_3_in_one_dimension():
    """The 1-D form of the algorithm: A^T [(G g) * (B^T d)] is the correlation of 4 inputs d with a
    3-tap filter g (2 outputs), and the weight tiles' gradient maps back by the adjoint of g -> G g G^T."""
    from kernels import winograd

    d, g = randn(4), randn(3, seed=1)
    direct = [d[0:3] @ g, d[1:4] @ g]
    np.testing.assert_allclose(winograd.A_T @ ((winograd.G @ g) * (winograd.B_T @ d)), direct, rtol=1e-12)
    w, du = randn(2, 3, 3, 3, seed=2), randn(16, 3, 2, seed=3)
    assert np.isclose(dot(winograd.weight_tiles(w), du), dot(w, winograd.weight_from_tiles(du)), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@given(cfg=conv_configs(max_groups=2), data=st.data())
def test_conv_transpose2d_matches_reference(kb, dtype, cfg, data):
    (sh, sw), (dh, dw) = cfg["stride"], cfg["dilation"]
    output_padding = (data.draw(st.integers(0, max(sh, dh) - 1)), data.draw(st.integers(0, max(sw, dw) - 1)))
    x = randn(*conv_out(cfg), dtype=dtype)
    w = randn(x.shape[1], *cfg["w_shape"][1:], dtype=dtype, seed=1)
    args = cfg["stride"], cfg["padding"], output_padding, cfg["dilation"], cfg["groups"]
    (h, w_), (ph, pw), (kh, kw) = x.shape[2:], cfg["padding"], w.shape[2:]
    ho = (h - 1) * sh - 2 * ph + dh * (kh - 1) + output_padding[0] + 1
    wo = (w_ - 1) * sw - 2 * pw + dw * (kw - 1) + output_padding[1] + 1
    if min(ho, wo) < 1:  # an empty output (stride larger than the kernel): every backend says so
        for module, put in ((kb, kb.put), (ref, lambda a: a)):
            with pytest.raises(ValueError, match="conv_transpose2d: .* empty output"):
                module.conv_transpose2d(put(x), put(w), *args)
        return
    assert_matches(kb.conv_transpose2d(kb.put(x), kb.put(w), *args), ref.conv_transpose2d(x, w, *args), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(cfg=pool_configs())
def test_pools_match_reference(kb, dtype, cfg):
    x = randn(*cfg["x_shape"], dtype=dtype)
    args = cfg["kernel"], cfg["stride"], cfg["padding"]
    y, argmax = kb.max_pool2d(kb.put(x), *args)
    y_ref, argmax_ref = ref.max_pool2d(x, *args)
    assert_matches(y, y_ref, dtype)
    dy = randn(*y_ref.shape, dtype=dtype, seed=1)
    # argmax may be backend-private: compare what the backend's own backward makes of it
    assert_matches(kb.max_pool2d_backward(kb.put(dy), argmax, x.shape, *args),
                   ref.max_pool2d_backward(dy, argmax_ref, x.shape, *args), dtype)
    assert_matches(kb.avg_pool2d(kb.put(x), *args), ref.avg_pool2d(x, *args), dtype)
    assert_matches(kb.avg_pool2d_backward(kb.put(dy), x.shape, *args),
                   ref.avg_pool2d_backward(dy, x.shape, *args), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(scale=pairs(1, 3), shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)))
def test_upsample_matches_reference(kb, dtype, scale, shape):
    x = randn(*shape, dtype=dtype)
    y = ref.upsample_nearest2d(x, scale)
    assert_matches(kb.upsample_nearest2d(kb.put(x), scale), y, dtype)
    dy = randn(*y.shape, dtype=dtype, seed=1)
    assert_matches(kb.upsample_nearest2d_backward(kb.put(dy), scale), ref.upsample_nearest2d_backward(dy, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_silu", [False, True])
@given(n=st.integers(1, 3), groups=st.integers(1, 3), per_group=st.integers(1, 3),
       spatial=st.lists(st.integers(1, 5), min_size=0, max_size=2), affine=st.booleans())
def test_group_norm_matches_reference(kb, dtype, with_silu, n, groups, per_group, spatial, affine):
    c = groups * per_group
    x = randn(n, c, *spatial, dtype=dtype) * 2 + 1
    weight, bias = (randn(c, dtype=dtype, seed=1), randn(c, dtype=dtype, seed=2)) if affine else (None, None)
    y, mean, rstd = kb.group_norm(kb.put(x), groups, kb.put(weight), kb.put(bias), 1e-5, with_silu)
    expected = ref.group_norm(x, groups, weight, bias, 1e-5, with_silu)
    for got, exp in zip((y, mean, rstd), expected):
        assert_matches(got, exp, dtype)
    dy = randn(*x.shape, dtype=dtype, seed=3)
    got = kb.group_norm_backward(kb.put(dy), kb.put(x), mean, rstd, kb.put(weight), groups, kb.put(bias), with_silu)
    expected = ref.group_norm_backward(dy, x, expected[1], expected[2], weight, groups, bias, with_silu)
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if e is not None:
            assert_matches(g, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(m=st.integers(1, 6), d=st.integers(1, 40), affine=st.booleans())
def test_layer_norm_matches_reference(kb, dtype, m, d, affine):
    x = randn(m, d, dtype=dtype) * 3 - 1
    weight, bias = (randn(d, dtype=dtype, seed=1), randn(d, dtype=dtype, seed=2)) if affine else (None, None)
    y, mean, rstd = kb.layer_norm(kb.put(x), kb.put(weight), kb.put(bias), 1e-5)
    expected = ref.layer_norm(x, weight, bias, 1e-5)
    for got, exp in zip((y, mean, rstd), expected):
        assert_matches(got, exp, dtype)
    dy = randn(m, d, dtype=dtype, seed=3)
    got = kb.layer_norm_backward(kb.put(dy), kb.put(x), mean, rstd, kb.put(weight))
    expected = ref.layer_norm_backward(dy, x, expected[1], expected[2], weight)
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if e is not None:
            assert_matches(g, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(cfg=attention_configs())
def test_attention_matches_reference(kb, dtype, cfg):
    q, k, v, mask, scale = attention_inputs(cfg, dtype)
    out, lse = kb.attention(kb.put(q), kb.put(k), kb.put(v), kb.put(mask), scale, cfg["is_causal"])
    out_ref, lse_ref = ref.attention(q, k, v, mask, scale, cfg["is_causal"])
    assert_matches(out, out_ref, dtype)
    assert_matches(lse, lse_ref, dtype)
    dout = randn(*out_ref.shape, dtype=dtype, seed=5)
    got = kb.attention_backward(kb.put(dout), kb.put(q), kb.put(k), kb.put(v), out, lse, kb.put(mask), scale,
                                cfg["is_causal"])
    expected = ref.attention_backward(dout, q, k, v, out_ref, lse_ref, mask, scale, cfg["is_causal"])
    for g, e in zip(got, expected):
        assert_matches(g, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_fully_masked_row_matches_reference(kb, dtype):
    q = randn(1, 2, 3, 4, dtype=dtype)
    k, v = randn(1, 2, 5, 4, dtype=dtype, seed=1), randn(1, 2, 5, 2, dtype=dtype, seed=2)
    mask = np.zeros((2, 3, 5), dtype)
    mask[1, 2] = -np.inf  # query 2 of head 1 sees no key
    out, lse = kb.attention(kb.put(q), kb.put(k), kb.put(v), kb.put(mask), 0.5, False)
    out_ref, lse_ref = ref.attention(q, k, v, mask, 0.5, False)
    assert_matches(out, out_ref, dtype)
    assert kb.get(lse)[0, 1, 2] == -np.inf
    dout = randn(*out_ref.shape, dtype=dtype, seed=3)
    got = kb.attention_backward(kb.put(dout), kb.put(q), kb.put(k), kb.put(v), out, lse, kb.put(mask), 0.5, False)
    for g, e in zip(got, ref.attention_backward(dout, q, k, v, out_ref, lse_ref, mask, 0.5, False)):
        assert_matches(g, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data())
def test_softmax_matches_reference(kb, dtype, shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = randn(*shape, dtype=dtype) * 3
    dy = randn(*shape, dtype=dtype, seed=1)
    y = ref.softmax(x, axis)
    assert_matches(kb.softmax(kb.put(x), axis), y, dtype)
    assert_matches(kb.softmax_backward(kb.put(dy), kb.put(y), axis), ref.softmax_backward(dy, y, axis), dtype)
    y = ref.log_softmax(x, axis)
    assert_matches(kb.log_softmax(kb.put(x), axis), y, dtype)
    assert_matches(kb.log_softmax_backward(kb.put(dy), kb.put(y), axis), ref.log_softmax_backward(dy, y, axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(rows=st.integers(1, 70), half=st.integers(1, 1100), approximate=st.sampled_from(["none", "tanh"]))
def test_geglu_matches_reference(kb, dtype, rows, half, approximate):
    """Halves longer than one run of the activation (512) and more rows than parallel blocks (64)."""
    assume(rows * half <= 20_000)
    x, dy = randn(rows, 2 * half, dtype=dtype) * 3, randn(rows, half, dtype=dtype, seed=1)
    assert_matches(kb.geglu(kb.put(x), approximate), ref.geglu(x, approximate), dtype)
    assert_matches(kb.geglu_backward(kb.put(dy), kb.put(x), approximate), ref.geglu_backward(dy, x, approximate), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_activations_match_reference(kb, dtype, approximate):
    x = np.concatenate([randn(300) * 4, [-100.0, -20.0, 0.0, 20.0, 100.0]]).astype(dtype)
    dy = randn(x.size, dtype=dtype, seed=1)
    assert_matches(kb.silu(kb.put(x)), ref.silu(x), dtype)
    assert_matches(kb.silu_backward(kb.put(dy), kb.put(x)), ref.silu_backward(dy, x), dtype)
    assert_matches(kb.gelu(kb.put(x), approximate), ref.gelu(x, approximate), dtype)
    assert_matches(kb.gelu_backward(kb.put(dy), kb.put(x), approximate), ref.gelu_backward(dy, x, approximate), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_step_matches_reference(kb, dtype, amsgrad):
    shape = (7, 13)
    state = [randn(*shape, dtype=dtype, seed=s) for s in range(4)]
    state[3] = np.abs(state[3])  # exp_avg_sq >= 0
    state.append(np.abs(randn(*shape, dtype=dtype, seed=9)) if amsgrad else None)
    mine = [kb.put(None if a is None else a.copy()) for a in state]
    theirs = [None if a is None else a.copy() for a in state]
    for step in (1, 2, 3):
        kb.adamw_step(mine[0], mine[1], mine[2], mine[3], mine[4], step, 1e-2, 0.9, 0.999, 1e-8, 0.01)
        ref.adamw_step(theirs[0], theirs[1], theirs[2], theirs[3], theirs[4], step, 1e-2, 0.9, 0.999, 1e-8, 0.01)
    for got, exp in zip(mine, theirs):
        if exp is not None:
            assert_matches(kb.get(got), exp, dtype)


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
@pytest.mark.parametrize("dtype", DTYPES)
def test_numba_vectorised_exp_matches_numpy(dtype):
    """The SIMD-friendly exp inside numba_cpu: relative error near one rounding, -inf -> 0, nan stays nan."""
    numba_cpu = load("numba_cpu")
    x = np.concatenate([np.linspace(-80, 80, 2001), [-np.inf, -1e4, -745.0, -100.0, -87.5, -1e-30, 0.0, np.nan]])
    x = x.astype(dtype)
    got = x.copy()
    numba_cpu._exp_into(got, 0.0, got, got.size)  # in place
    with np.errstate(under="ignore"):
        expected = np.exp(x.astype(np.float64))
    tiny = np.finfo(dtype).tiny
    normal = expected > tiny
    np.testing.assert_allclose(got[normal], expected[normal], rtol=32 * np.finfo(dtype).eps)
    assert np.all(np.abs(got[~normal & ~np.isnan(x)]) <= tiny)  # underflow: 0 (or below the smallest normal)
    assert np.isnan(got[-1])
    finite = x[:2001]  # now with a shift, into another array, and the sum it returns
    shifted = np.empty_like(finite)
    total = numba_cpu._exp_into(finite, 5.0, shifted, finite.size)
    with np.errstate(under="ignore"):
        np.testing.assert_allclose(shifted, np.exp((finite - dtype(5.0)).astype(np.float64)), rtol=32 * np.finfo(dtype).eps,
                                   atol=np.finfo(dtype).tiny)
    assert math.isclose(total, shifted.astype(np.float64).sum(), rel_tol=1e-6)
    for v in (-20.5, -0.3, 0.0, 1.0, 40.25):  # the Python version, kept for reading
        assert math.isclose(numba_cpu._exp(v), math.exp(v), rel_tol=1e-15)


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keys", [1, 7, 16, 64, 300])
def test_numba_row_maxima_match_numpy(dtype, keys):
    """Attention's row maxima (a vectorised maxNum): exact, with masked (-inf) keys and fully masked rows."""
    numba_cpu = load("numba_cpu")
    s = randn(3, 5, keys, dtype=dtype) * 10
    s[0, 1, ::2] = -np.inf
    s[1, 2] = -np.inf
    got = np.empty((3, 5), dtype)
    numba_cpu._row_maxima(s, got)
    np.testing.assert_array_equal(got, s.max(axis=2))


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", ["bands", "heads"])
@pytest.mark.parametrize("mask_kind, is_causal, per_item_mask", [("none", False, False), ("additive", True, True),
                                                                  ("boolean-like", False, False),
                                                                  ("boolean-like", True, True)])
def test_numba_attention_in_bands_of_queries_matches_reference(monkeypatch, dtype, split, mask_kind, is_causal,
                                                               per_item_mask):
    """Long sequences: when one (entry, head) item's scores outgrow the chunk, a block is a band of queries of
    one head (dk, dv summed over the bands); when a few items fit, it is a few heads of one entry. Both forced
    on small arrays here."""
    numba_cpu = load("numba_cpu")
    cfg = dict(b=2, h=3, sq=7, sk=6, d=3, dv=2, mask_kind=mask_kind, is_causal=is_causal,
               mask_batch=6 if per_item_mask else 1, heads_last=True)
    q, k, v, mask, scale = attention_inputs(cfg, dtype)
    if mask is not None:
        mask[-1, 4] = -np.inf  # a query that sees no key, in the second band
    row_bytes = cfg["sk"] * np.dtype(dtype).itemsize
    chunk_rows = 2 * cfg["sq"] if split == "heads" else 2  # two whole items, or two rows
    monkeypatch.setattr(numba_cpu, "_ATTENTION_CHUNK_BYTES", chunk_rows * row_bytes)
    monkeypatch.setattr(numba_cpu, "_ATTENTION_BAND_BYTES", 3 * row_bytes)
    blocks, _ = numba_cpu._attention_blocks(q, k)
    if split == "heads":
        assert blocks == [(0, 1, 0, 2, 0, 7), (0, 1, 2, 3, 0, 7), (1, 2, 0, 2, 0, 7), (1, 2, 2, 3, 0, 7)]
    else:
        assert blocks[:4] == [(0, 1, 0, 1, 0, 3), (0, 1, 0, 1, 3, 6), (0, 1, 0, 1, 6, 7), (0, 1, 1, 2, 0, 3)]
        assert len(blocks) == 2 * 3 * 3
    out, lse = numba_cpu.attention(q, k, v, mask, scale, is_causal)
    out_ref, lse_ref = ref.attention(q, k, v, mask, scale, is_causal)
    assert_matches(out, out_ref, dtype)
    assert_matches(lse, lse_ref, dtype)
    dout = randn(*out_ref.shape, dtype=dtype, seed=5)
    got = numba_cpu.attention_backward(dout, q, k, v, out, lse, mask, scale, is_causal)
    for g, e in zip(got, ref.attention_backward(dout, q, k, v, out_ref, lse_ref, mask, scale, is_causal)):
        assert_matches(g, e, dtype)


# ---- part 3: numba_cpu's choice of thread count ----------------------------------
@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
@pytest.mark.parametrize("dtype", DTYPES)
@given(m=st.integers(1, 60), n=st.integers(1, 9), k=st.integers(1, 60), trans_a=st.booleans(),
       accumulate=st.booleans(), offsets=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
       block=st.integers(1, 400), with_bias=st.booleans())
def test_blas_matmul_in_blocks_matches_numpy(dtype, m, n, k, trans_a, accumulate, offsets, block, with_bias):
    """kernels.blas.matmul: out (=|+=) op(a) @ b (+ bias on every row) by blocks of rows or of the sum, on
    views whose rows are strided (column offsets into wider arrays). Block limits shrunk so small shapes
    split into many blocks; on a CPU without OpenBLAS's small-matrix kernels (or in float64) it is
    np.matmul, checked the same way."""
    wide = lambda rows, cols, off, seed: randn(rows, cols + off, dtype=dtype, seed=seed)[:, off:]  # noqa: E731
    a = wide(k, m, offsets[0], 0) if trans_a else wide(m, k, offsets[0], 0)
    bias = randn(n, dtype=dtype, seed=3) if with_bias else None
    _check_blas_matmul(a, wide(k, n, offsets[1], 1), wide(m, n, offsets[2], 2), trans_a, accumulate, block, bias)


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("which", ["a", "b", "out"])
def test_blas_matmul_takes_single_rows_with_any_stride(which, trans_a):
    """NumPy may report any row stride for a one-row matrix (w.T of a (n, 1) weight has the item
    size): BLAS must still get a leading dimension of at least the row's length."""
    m, k, n = {"a": (3, 1, 4) if trans_a else (1, 5, 4), "b": (3, 1, 4), "out": (1, 5, 4)}[which]
    shapes = {"a": (k, m) if trans_a else (m, k), "b": (k, n), "out": (m, n)}
    arrays = {name: randn(*shape, dtype=np.float32, seed=i) for i, (name, shape) in enumerate(shapes.items())}
    one_row = arrays[which]
    assert one_row.shape[0] == 1
    arrays[which] = np.lib.stride_tricks.as_strided(one_row, strides=(one_row.itemsize, one_row.itemsize))
    _check_blas_matmul(arrays["a"], arrays["b"], arrays["out"], trans_a, False, 10**6)


def _check_blas_matmul(a, b, out, trans_a, accumulate, block, bias=None):
    """blas.matmul against NumPy, with blocks of at most `block` multiply-adds (as if this CPU had
    OpenBLAS's small-matrix kernels: the blocking is right or wrong on any OpenBLAS)."""
    import numba

    blas = load("blas")
    expected = (a.T if trans_a else a) @ b + (out if accumulate else 0) + (0 if bias is None else bias)
    through_openblas = []
    threads = numba.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blas, "_MAX_BLOCK", block)
        patch.setattr(blas, "_MIN_BLOCK", 1)
        patch.setattr(blas, "_SMALL_KERNELS", True)
        patch.setattr(blas, "_product_with", lambda *args, f=blas._product_with: through_openblas.append(1) or f(*args))
        numba.set_num_threads(1)
        try:
            blas.matmul(a, b, out, trans_a=trans_a, accumulate=accumulate, bias=bias)
        finally:
            numba.set_num_threads(threads)
    assert bool(through_openblas) == (blas._SGEMM is not None and out.dtype == np.float32)
    np.testing.assert_allclose(out, expected, **TOL[out.dtype.type])


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
def test_numba_small_arrays_run_on_one_thread_large_on_all(monkeypatch):
    import numba

    numba_cpu = load("numba_cpu")
    seen = []

    def kernel(x):
        seen.append(numba.get_num_threads())
        if x.size == 3:
            raise RuntimeError("fails inside")

    threads = numba.get_num_threads()
    monkeypatch.setattr(numba_cpu, "_PARALLEL_MIN_SIZE", 10)
    numba_cpu._run(kernel, np.zeros(9))
    numba_cpu._run(kernel, np.zeros(10))
    with pytest.raises(RuntimeError, match="fails inside"):
        numba_cpu._run(kernel, np.zeros(3))
    assert seen == [1, threads, 1] and numba.get_num_threads() == threads  # restored, also after an error


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
@pytest.mark.parametrize("dtype", DTYPES)
def test_numba_parallel_kernels_on_all_threads_match_reference(monkeypatch, dtype):
    """The other tests draw small arrays, which run on one thread: here every parallel kernel runs on all."""
    numba_cpu = load("numba_cpu")
    monkeypatch.setattr(numba_cpu, "_PARALLEL_MIN_SIZE", 0)
    x, dy = randn(5, 6, 7, 8, dtype=dtype), randn(5, 6, 7, 8, dtype=dtype, seed=1)
    w, b = randn(6, dtype=dtype, seed=2), randn(6, dtype=dtype, seed=3)
    got, expected = numba_cpu.group_norm(x, 3, w, b, 1e-5), ref.group_norm(x, 3, w, b, 1e-5)
    for g, e in zip(got, expected):
        assert_matches(g, e, dtype)
    for g, e in zip(numba_cpu.group_norm_backward(dy, x, got[1], got[2], w, 3),
                    ref.group_norm_backward(dy, x, expected[1], expected[2], w, 3)):
        assert_matches(g, e, dtype)
    x2, dy2, w2 = x.reshape(-1, 56), dy.reshape(-1, 56), randn(56, dtype=dtype, seed=4)
    got, expected = numba_cpu.layer_norm(x2, w2, w2, 1e-5), ref.layer_norm(x2, w2, w2, 1e-5)
    for g, e in zip(got, expected):
        assert_matches(g, e, dtype)
    for g, e in zip(numba_cpu.layer_norm_backward(dy2, x2, got[1], got[2], w2),
                    ref.layer_norm_backward(dy2, x2, expected[1], expected[2], w2)):
        assert_matches(g, e, dtype)
    for forward, backward in (("softmax", "softmax_backward"), ("log_softmax", "log_softmax_backward")):
        y = getattr(ref, forward)(x, 2)
        assert_matches(getattr(numba_cpu, forward)(x, 2), y, dtype)
        assert_matches(getattr(numba_cpu, backward)(dy, y, 2), getattr(ref, backward)(dy, y, 2), dtype)
    pool = (3, 3), (2, 2), (1, 1)
    y, argmax = numba_cpu.max_pool2d(x, *pool)
    y_ref, argmax_ref = ref.max_pool2d(x, *pool)
    assert_matches(y, y_ref, dtype)
    g = randn(*y.shape, dtype=dtype, seed=5)
    assert_matches(numba_cpu.max_pool2d_backward(g, argmax, x.shape, *pool),
                   ref.max_pool2d_backward(g, argmax_ref, x.shape, *pool), dtype)
    assert_matches(numba_cpu.avg_pool2d(x, *pool), ref.avg_pool2d(x, *pool), dtype)
    assert_matches(numba_cpu.avg_pool2d_backward(g, x.shape, *pool), ref.avg_pool2d_backward(g, x.shape, *pool), dtype)
    assert_matches(numba_cpu.silu(x), ref.silu(x), dtype)
    assert_matches(numba_cpu.silu_backward(dy, x), ref.silu_backward(dy, x), dtype)
    for approximate in ("none", "tanh"):
        assert_matches(numba_cpu.gelu(x, approximate), ref.gelu(x, approximate), dtype)
        assert_matches(numba_cpu.gelu_backward(dy, x, approximate), ref.gelu_backward(dy, x, approximate), dtype)
    mine, theirs = [x.copy(), dy, np.zeros_like(x), np.zeros_like(x)], [x.copy(), dy, np.zeros_like(x), np.zeros_like(x)]
    numba_cpu.adamw_step(*mine, None, 1, 1e-2, 0.9, 0.999, 1e-8, 0.01)
    ref.adamw_step(*theirs, None, 1, 1e-2, 0.9, 0.999, 1e-8, 0.01)
    for got, exp in zip(mine, theirs):
        assert_matches(got, exp, dtype)


def test_set_num_threads_sets_numba_and_blas_threads():
    numba = pytest.importorskip("numba")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = numba.get_num_threads()
    blas_threads = lambda: [pool["num_threads"] for pool in threadpoolctl.threadpool_info()  # noqa: E731
                            if pool["user_api"] == "blas"]
    blas_before = blas_threads()
    try:
        tinysd.set_num_threads(1)
        assert tinysd.get_num_threads() == numba.get_num_threads() == 1
        assert blas_threads() and all(n == 1 for n in blas_threads())
    finally:
        numba.set_num_threads(before)
        threadpoolctl.threadpool_limits(max(blas_before, default=1), user_api="blas")
    with pytest.raises(ValueError, match="set_num_threads"):
        tinysd.set_num_threads(0)


@pytest.mark.skipif(load("numba_cpu") is None, reason="numba_cpu unavailable")
def test_numba_float32_gelu_erf_fit_is_accurate():
    """float32 gelu uses a fit of erfc (relative error < 1.2e-7): check it densely against libm's erfc.

    Relative error ~1e-6 in the bulk (the fit's 1.2e-7 plus a dozen float32 roundings); in the far left tail exp(-x^2 / 2) of a float32 x^2 carries
    x^2 / 2 * eps of relative error (1e-5 at x = -12, where gelu is -1e-32). Not checked against
    the reference, whose 1 + erf(x / sqrt 2) cancels to 0 below x ~ -8."""
    numba_cpu = load("numba_cpu")
    x = np.linspace(-12, 12, 24001).astype(np.float32)
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    pdf = np.exp(-0.5 * x.astype(np.float64) ** 2) / math.sqrt(2 * math.pi)
    got = numba_cpu.gelu(x, "none")
    bulk = np.abs(x) <= 3
    np.testing.assert_allclose(got[bulk], (x * cdf)[bulk], rtol=2e-6, atol=1e-37)
    np.testing.assert_allclose(got, x * cdf, rtol=2e-5, atol=1e-37)
    np.testing.assert_allclose(numba_cpu.gelu_backward(np.ones_like(x), x, "none"), cdf + x * pdf, rtol=0, atol=3e-7)


@pytest.mark.parametrize("preset", [None, "+sse2"])
def test_numba_gets_full_width_avx512_vectors_unless_the_environment_says_otherwise(preset):
    """Imported before Numba, tinysd turns off LLVM's preference for 256-bit vectors on AVX-512
    CPUs; a NUMBA_CPU_FEATURES the environment sets is left as it is."""
    pytest.importorskip("numba")
    llvm = pytest.importorskip("llvmlite.binding")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CPU_FEATURES"}
    if preset:
        env["NUMBA_CPU_FEATURES"] = preset
    code = "import tinysd, numba.core.config as c; print(c.CPU_FEATURES)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    features = done.stdout.strip()
    if preset:
        assert features == preset
    elif llvm.get_host_cpu_features().get("avx512f"):
        assert features.endswith(",-prefer-256-bit") and "+avx512f" in features
    else:
        assert features in ("", "None")


_FAULTS_OF_ALLOCATIONS = """
import resource
import numpy as np
import tinysd
def faults_of_a_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones(1 << 20, np.float32) for _ in range(10)]  # 10 x 4 MiB, written, then all freed
    del arrays
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_round()
print(sum(faults_of_a_round() for _ in range(5)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and Linux's fault counts")
def test_freed_arrays_memory_is_reused_without_page_faults():
    """tinysd keeps glibc from handing freed arrays' memory back (tinysd._reuse_freed_memory): allocating
    the same 40 MiB of arrays again takes no fresh pages. TINYSD_REUSE_FREED_MEMORY=0 keeps glibc's
    defaults, which trim those pages and fault them in anew each round (about 28,000 faults in the 5
    rounds here), and so does any malloc setting of the user's own (here a glibc.malloc tunable)."""
    if tinysd._glibc_mallopt() is None:
        pytest.skip("no glibc")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def faults(setting, **more):
        done = subprocess.run([sys.executable, "-c", _FAULTS_OF_ALLOCATIONS], capture_output=True, text=True,
                              env={**env, "TINYSD_REUSE_FREED_MEMORY": setting, **more}, check=True)
        return int(done.stdout.split()[-1])

    reused, default = faults("1"), faults("0")
    users_own = faults("1", GLIBC_TUNABLES="glibc.malloc.tcache_count=7")  # glibc's default count: no change
    assert default > 5 * 1000, default  # 5 rounds of 40 MiB: at least 5,000 fresh 4 KiB pages
    assert reused < default / 20, (reused, default)
    assert users_own > default / 2, (users_own, default)
