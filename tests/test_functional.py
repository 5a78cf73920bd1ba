"""tinysd.nn.functional: forward values against plain NumPy formulas, float64 gradient
checks on hypothesis-drawn shapes (run once with the default kernels and once with
TINYSD_KERNELS=reference), conv/conv-transpose adjointness, and bad-input errors."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

import tinysd
import tinysd.nn.functional as F
from tinysd.gradcheck import gradcheck

sdpa = F.scaled_dot_product_attention

# The `kernel_backend` fixture is function-scoped but only sets an environment
# variable that stays valid for every example hypothesis draws.
with_fixture = settings(
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture]
)
# The kernel-backed ops have the most geometry to explore (and are cheap at these sizes).
more_examples = settings(with_fixture, max_examples=3 * settings.default.max_examples)
seeds = st.integers(0, 2**16)


@pytest.fixture(params=["default", "reference"])
def kernel_backend(request, monkeypatch):
    """Run a test with the default kernels (Numba when importable) and with the NumPy reference."""
    if request.param == "reference":
        monkeypatch.setenv("TINYSD_KERNELS", "reference")
    else:
        monkeypatch.delenv("TINYSD_KERNELS", raising=False)
    return request.param


def check_grad(fn, inputs, kernel_backend):
    """Full Jacobian with the NumPy reference kernels; one random direction per example with the
    default ones. The gradient math is the same Function either way, and the thousands of tiny
    calls of a full check would mostly time each parallel Numba kernel's thread start-up."""
    return gradcheck(fn, inputs, mode="auto" if kernel_backend == "reference" else "directional")


def rand(rng, *shape, grad=True):
    return tinysd.tensor(rng.standard_normal(shape), requires_grad=grad)


def close(tensor, expected, tol=1e-10):
    np.testing.assert_allclose(tensor.numpy(), expected, rtol=tol, atol=tol)


# ---- plain NumPy versions: loops and textbook formulas ----------


def conv2d_loop(x, w, stride, padding, dilation, groups):
    """y[n, o, i, j] = sum over the group's channels and the window of xpad * w[o]."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    o, cg, kh, kw = w.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (xpad.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xpad.shape[3] - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((x.shape[0], o, ho, wo))
    for oc in range(o):
        g = oc // (o // groups)
        for i in range(ho):
            for j in range(wo):
                window = xpad[:, g * cg : (g + 1) * cg, i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                              j * sw : j * sw + dw * (kw - 1) + 1 : dw]  # fmt: skip
                y[:, oc, i, j] = (window * w[oc]).sum(axis=(1, 2, 3))
    return y


def conv_transpose2d_loop(x, w, stride, padding, output_padding, dilation, groups):
    """Scatter: every x[n, c, i, j] adds x * w[c] onto the window at (i*s, j*s), then crop the padding."""
    (sh, sw), (ph, pw), (oph, opw), (dh, dw) = stride, padding, output_padding, dilation
    n, c_in, h, wd = x.shape
    _, cog, kh, kw = w.shape
    full = np.zeros((n, cog * groups, (h - 1) * sh + dh * (kh - 1) + 1 + oph, (wd - 1) * sw + dw * (kw - 1) + 1 + opw))
    for c in range(c_in):
        g = c // (c_in // groups)
        for i in range(h):
            for j in range(wd):
                full[:, g * cog : (g + 1) * cog, i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                     j * sw : j * sw + dw * (kw - 1) + 1 : dw] += x[:, c, i, j, None, None, None] * w[c]  # fmt: skip
    return full[:, :, ph : full.shape[2] - ph, pw : full.shape[3] - pw]


def pool_loop(x, kernel, stride, padding, reduce, pad_value):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    ho, wo = (xpad.shape[2] - kh) // sh + 1, (xpad.shape[3] - kw) // sw + 1
    y = np.zeros(x.shape[:2] + (ho, wo))
    for i in range(ho):
        for j in range(wo):
            y[:, :, i, j] = reduce(xpad[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw], axis=(2, 3))
    return y


def softmax_np(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax_np(s, axis):
    m = s.max(axis=axis, keepdims=True)
    return s - m - np.log(np.exp(s - m).sum(axis=axis, keepdims=True))


def attention_np(q, k, v, mask, is_causal, scale):
    s = scale * q @ np.swapaxes(k, -1, -2)
    if mask is not None:
        s = s + (np.where(mask, 0.0, -np.inf) if mask.dtype == bool else mask)
    if is_causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
    return softmax_np(s) @ v


def normalize_np(x, axes, eps=1e-5):
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)


def cross_entropy_np(logits, target, smoothing):
    """PyTorch's formula: -((1 - eps) logp[target] + eps / C * sum_c logp[c]), averaged."""
    logp = log_softmax_np(logits, 1)
    picked = np.take_along_axis(logp, target[:, None], axis=1)[:, 0]
    return -((1 - smoothing) * picked + smoothing / logits.shape[1] * logp.sum(axis=1)).mean()


erf_np = np.vectorize(math.erf)


# ---- convolutions ----------


@st.composite
def conv_cases(draw):
    """A conv geometry and its shapes: x (N, C, H, W) -> y (N, O, HO, WO) with weight (O, C/g, KH, KW).

    output_padding is what a conv_transpose2d from y needs to land back on x's size.
    """
    groups = draw(st.integers(1, 2))
    c, o = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    size = tuple(draw(st.integers(max(1, s - 2 * p), 6)) for s, p in zip(spans, padding))
    out = tuple((n + 2 * p - s) // st_ + 1 for n, p, s, st_ in zip(size, padding, spans, stride))
    output_padding = tuple((n + 2 * p - s) % st_ for n, p, s, st_ in zip(size, padding, spans, stride))
    n = draw(st.integers(1, 2))
    return dict(
        x_shape=(n, c, *size), y_shape=(n, o, *out), w_shape=(o, c // groups, *kernel), groups=groups,
        stride=stride, padding=padding, dilation=dilation, output_padding=output_padding,
        bias=draw(st.booleans()), seed=draw(seeds),
    )  # fmt: skip


def conv_options(case):
    return {key: case[key] for key in ("stride", "padding", "dilation", "groups")}


@more_examples
@given(case=conv_cases())
def test_conv2d_matches_loop_and_gradcheck(kernel_backend, case):
    rng = np.random.default_rng(case["seed"])
    x, w = rand(rng, *case["x_shape"]), rand(rng, *case["w_shape"])
    b = rand(rng, case["w_shape"][0]) if case["bias"] else None
    expected = conv2d_loop(x.numpy(), w.numpy(), case["stride"], case["padding"], case["dilation"], case["groups"])
    if b is not None:
        expected = expected + b.numpy()[:, None, None]
    close(F.conv2d(x, w, b, **conv_options(case)), expected)
    inputs = [x, w] + ([b] if b is not None else [])
    assert check_grad(lambda *a: F.conv2d(*a, **conv_options(case)), inputs, kernel_backend)


@more_examples
@given(case=conv_cases())
def test_conv_transpose2d_matches_loop_and_gradcheck(kernel_backend, case):
    """The conv from case's x to y, transposed: from y's shape back to x's."""
    rng = np.random.default_rng(case["seed"])
    x, w = rand(rng, *case["y_shape"]), rand(rng, *case["w_shape"])  # w (C_in=O, C_out/g, KH, KW)
    b = rand(rng, case["x_shape"][1]) if case["bias"] else None
    options = dict(conv_options(case), output_padding=case["output_padding"])
    expected = conv_transpose2d_loop(x.numpy(), w.numpy(), case["stride"], case["padding"],
                                     case["output_padding"], case["dilation"], case["groups"])  # fmt: skip
    if b is not None:
        expected = expected + b.numpy()[:, None, None]
    y = F.conv_transpose2d(x, w, b, **options)
    assert y.shape == case["x_shape"]
    close(y, expected)
    inputs = [x, w] + ([b] if b is not None else [])
    assert check_grad(lambda *a: F.conv_transpose2d(*a, **options), inputs, kernel_backend)


@more_examples
@given(case=conv_cases())
def test_conv2d_and_conv_transpose2d_are_adjoint(kernel_backend, case):
    """<conv2d(x, w), y> == <x, conv_transpose2d(y, w)> for the same stride, padding, dilation, groups."""
    rng = np.random.default_rng(case["seed"])
    x, y, w = (rand(rng, *case[key], grad=False) for key in ("x_shape", "y_shape", "w_shape"))
    lhs = (F.conv2d(x, w, **conv_options(case)).numpy() * y.numpy()).sum()
    back = F.conv_transpose2d(y, w, output_padding=case["output_padding"], **conv_options(case))
    np.testing.assert_allclose(lhs, (x.numpy() * back.numpy()).sum(), rtol=1e-10, atol=1e-10)


def test_conv2d_known_value():
    """A 3x3 box filter on a 3x3 ramp with padding 1: each output sums its neighbourhood."""
    x = tinysd.tensor(np.arange(9.0).reshape(1, 1, 3, 3))
    y = F.conv2d(x, tinysd.ones(1, 1, 3, 3, dtype=np.float64), padding=1)
    close(y, [[[[8, 15, 12], [21, 36, 27], [20, 33, 24]]]])


# ---- pooling and upsampling ----------


@st.composite
def pool_cases(draw):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    size = tuple(draw(st.integers(max(1, k - 2 * p), 6)) for k, p in zip(kernel, padding))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), *size)
    return dict(shape=shape, kernel=kernel, stride=stride, padding=padding, seed=draw(seeds))


@more_examples
@given(case=pool_cases(), kind=st.sampled_from(["max", "avg"]))
def test_pools_match_loop_and_gradcheck(kernel_backend, case, kind):
    rng = np.random.default_rng(case["seed"])
    x = rand(rng, *case["shape"])
    pool = F.max_pool2d if kind == "max" else F.avg_pool2d
    reduce, pad_value = (np.max, -np.inf) if kind == "max" else (np.mean, 0.0)
    geometry = (case["kernel"], case["stride"], case["padding"])
    close(pool(x, *geometry), pool_loop(x.numpy(), *geometry, reduce, pad_value))
    assert check_grad(lambda t: pool(t, *geometry), [x], kernel_backend)


def test_pool_stride_defaults_to_kernel():
    x = tinysd.tensor(np.arange(16.0).reshape(1, 1, 4, 4))
    close(F.max_pool2d(x, 2), [[[[5, 7], [13, 15]]]])
    close(F.avg_pool2d(x, 2), [[[[2.5, 4.5], [10.5, 12.5]]]])


@with_fixture
@given(shape=array_shapes(min_dims=4, max_dims=4, max_side=3), sh=st.integers(1, 3), sw=st.integers(1, 3),
       seed=seeds)  # fmt: skip
def test_interpolate_nearest(kernel_backend, shape, sh, sw, seed):
    x = rand(np.random.default_rng(seed), *shape)
    rows, cols = np.arange(shape[2] * sh) // sh, np.arange(shape[3] * sw) // sw
    close(F.interpolate(x, scale_factor=(sh, sw)), x.numpy()[:, :, rows][:, :, :, cols])
    assert check_grad(lambda t: F.interpolate(t, scale_factor=(sh, sw)), [x], kernel_backend)


def bilinear_np(x, sh, sw):
    """Bilinear upsampling (align_corners=False) pixel by pixel: each output pixel samples the
    input at ((i + 0.5) / s - 0.5, (j + 0.5) / s - 0.5), clamped to the image, and blends 4 pixels."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, h * sh, w * sw))
    for i in range(h * sh):
        for j in range(w * sw):
            y, z = max((i + 0.5) / sh - 0.5, 0.0), max((j + 0.5) / sw - 0.5, 0.0)
            y0, z0 = int(y), int(z)
            y1, z1, ty, tz = min(y0 + 1, h - 1), min(z0 + 1, w - 1), y - y0, z - z0
            out[:, :, i, j] = ((1 - ty) * ((1 - tz) * x[:, :, y0, z0] + tz * x[:, :, y0, z1])
                               + ty * ((1 - tz) * x[:, :, y1, z0] + tz * x[:, :, y1, z1]))
    return out


@given(shape=array_shapes(min_dims=4, max_dims=4, max_side=3), sh=st.integers(1, 3), sw=st.integers(1, 3),
       seed=seeds)  # fmt: skip
def test_interpolate_bilinear(shape, sh, sw, seed):
    x = rand(np.random.default_rng(seed), *shape)
    close(F.interpolate(x, scale_factor=(sh, sw), mode="bilinear"), bilinear_np(x.numpy(), sh, sw))
    assert gradcheck(lambda t: F.interpolate(t, scale_factor=(sh, sw), mode="bilinear"), [x])
    row = tinysd.tensor(np.array([[[[0.0, 1.0]]]], np.float32))  # PyTorch gives [0, 0.25, 0.75, 1]
    up = F.interpolate(row, scale_factor=(1, 2), mode="bilinear")
    assert up.dtype == np.float32 and up.numpy().tolist() == [[[[0.0, 0.25, 0.75, 1.0]]]]


def test_interpolate_accepts_float_integer_scale():
    x = tinysd.tensor(np.arange(4.0).reshape(1, 1, 2, 2))
    close(F.interpolate(x, scale_factor=2.0), np.arange(4.0).reshape(2, 2).repeat(2, 0).repeat(2, 1)[None, None])


# ---- normalisation ----------


@with_fixture
@given(n=st.integers(1, 2), groups=st.integers(1, 3), per_group=st.integers(1, 2),
       spatial=array_shapes(min_dims=0, max_dims=2, max_side=3),
       affine=st.sampled_from(["both", "weight", "bias", "none"]), with_silu=st.booleans(), seed=seeds)  # fmt: skip
def test_group_norm(kernel_backend, n, groups, per_group, spatial, affine, with_silu, seed):
    rng = np.random.default_rng(seed)
    c = groups * per_group
    x = rand(rng, n, c, *spatial)
    w = rand(rng, c) if affine in ("both", "weight") else None
    b = rand(rng, c) if affine in ("both", "bias") else None
    expected = normalize_np(x.numpy().reshape(n, groups, -1), 2).reshape(x.shape)
    channel = (1, c) + (1,) * len(spatial)
    if w is not None:
        expected = expected * w.numpy().reshape(channel)
    if b is not None:
        expected = expected + b.numpy().reshape(channel)
    if with_silu:
        expected = expected / (1 + np.exp(-expected))
    close(F.group_norm(x, groups, w, b, with_silu=with_silu), expected, tol=1e-8)
    inputs = [t for t in (x, w, b) if t is not None]
    present = [name for name, v in (("weight", w), ("bias", b)) if v is not None]
    assert check_grad(lambda x, *p: F.group_norm(x, groups, **dict(zip(present, p)), with_silu=with_silu), inputs,
                      kernel_backend)


@with_fixture
@given(lead=array_shapes(min_dims=0, max_dims=2, max_side=3),
       normalized=array_shapes(min_dims=1, max_dims=2, max_side=4), affine=st.booleans(), seed=seeds)  # fmt: skip
def test_layer_norm(kernel_backend, lead, normalized, affine, seed):
    assume(math.prod(normalized) > 1)
    rng = np.random.default_rng(seed)
    x = rand(rng, *lead, *normalized)
    params = [rand(rng, *normalized), rand(rng, *normalized)] if affine else []
    axes = tuple(range(len(lead), x.ndim))
    expected = normalize_np(x.numpy(), axes)
    if affine:
        expected = expected * params[0].numpy() + params[1].numpy()
    close(F.layer_norm(x, normalized, *params), expected, tol=1e-8)
    assert check_grad(lambda x, *p: F.layer_norm(x, normalized, *p), [x, *params], kernel_backend)


# ---- attention ----------


@st.composite
def attention_cases(draw):
    batch = draw(array_shapes(min_dims=0, max_dims=2, max_side=3))
    sq, sk, d, dv = (draw(st.integers(1, 5)) for _ in range(4))
    mask = draw(st.sampled_from(["none", "bool", "float", "batched_bool"]))
    return dict(batch=batch, sq=sq, sk=sk, d=d, dv=dv, mask=mask, is_causal=draw(st.booleans()),
                scale=draw(st.sampled_from([None, 0.5])), seed=draw(seeds))  # fmt: skip


def make_mask(rng, case):
    """A mask of the drawn kind; key 0 is always allowed so no query is left without keys."""
    if case["mask"] == "none":
        return None
    shape = (case["sq"], case["sk"]) if case["mask"] != "batched_bool" else case["batch"] + (1, case["sk"])
    if case["mask"] == "float":
        return rng.standard_normal(shape)
    mask = rng.random(shape) < 0.7
    mask[..., 0] = True
    return mask


@more_examples
@given(case=attention_cases())
def test_attention_matches_softmax_and_gradcheck(kernel_backend, case):
    rng = np.random.default_rng(case["seed"])
    b, sq, sk = case["batch"], case["sq"], case["sk"]
    q, k, v = rand(rng, *b, sq, case["d"]), rand(rng, *b, sk, case["d"]), rand(rng, *b, sk, case["dv"])
    mask = make_mask(rng, case)
    options = dict(attn_mask=mask, is_causal=case["is_causal"], scale=case["scale"])
    scale = case["scale"] or 1 / math.sqrt(case["d"])
    expected = attention_np(q.numpy(), k.numpy(), v.numpy(), mask, case["is_causal"], scale)
    close(sdpa(q, k, v, **options), expected, tol=1e-9)
    assert check_grad(lambda q, k, v: sdpa(q, k, v, **options), [q, k, v], kernel_backend)


def test_attention_broadcasts_leading_dims():
    """One key/value set shared by every batch element, a mask tensor, and a (B, 1, 1, Sk) padding mask."""
    rng = np.random.default_rng(0)
    q, k, v = rand(rng, 2, 3, 4, 5), rand(rng, 1, 3, 6, 5), rand(rng, 3, 6, 2)
    mask = np.ones((2, 1, 1, 6), dtype=bool)
    mask[0, ..., 4:] = False
    expected = attention_np(q.numpy(), k.numpy(), v.numpy(), mask, False, 1 / math.sqrt(5))
    close(sdpa(q, k, v, attn_mask=tinysd.tensor(mask)), expected, tol=1e-9)
    assert gradcheck(lambda q, k, v: sdpa(q, k, v, attn_mask=mask), [q, k, v])


@given(case=attention_cases())
def test_attention_with_dropout(case):
    """dropout_p > 0 runs the composed form: with a vanishing p it is the fused result (masks,
    causal, fully masked rows -> 0), with a fixed seed it passes a gradient check, and averaged
    over seeds it keeps the expected output (inverted dropout)."""
    rng = np.random.default_rng(case["seed"])
    b, sq, sk = case["batch"], case["sq"], case["sk"]
    q, k, v = rand(rng, *b, sq, case["d"]), rand(rng, *b, sk, case["d"]), rand(rng, *b, sk, case["dv"])
    options = dict(attn_mask=make_mask(rng, case), is_causal=case["is_causal"], scale=case["scale"])
    fused = sdpa(q, k, v, **options).numpy()
    close(sdpa(q, k, v, dropout_p=1e-12, **options), fused, tol=1e-9)

    def dropped(q, k, v, seed=0):
        tinysd.manual_seed(seed)
        return sdpa(q, k, v, dropout_p=0.3, **options)

    assert gradcheck(dropped, [q, k, v])
    mean = np.mean([dropped(q, k, v, seed).numpy() for seed in range(300)], axis=0)
    np.testing.assert_allclose(mean, fused, atol=0.25 * max(1.0, np.abs(fused).max()))


# ---- activations ----------

small_shapes = array_shapes(min_dims=1, max_dims=3, max_side=4)
activations = {
    "relu": (F.relu, lambda x: np.maximum(x, 0)),
    "sigmoid": (F.sigmoid, lambda x: 1 / (1 + np.exp(-x))),
    "tanh": (F.tanh, np.tanh),
    "silu": (F.silu, lambda x: x / (1 + np.exp(-x))),
    "gelu": (F.gelu, lambda x: 0.5 * x * (1 + erf_np(x / math.sqrt(2)))),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"),
                  lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    "softmax": (lambda x: F.softmax(x, -1), softmax_np),
    "log_softmax": (lambda x: F.log_softmax(x, 0), lambda x: log_softmax_np(x, 0)),
}  # fmt: skip


@with_fixture
@given(name=st.sampled_from(sorted(activations)), shape=small_shapes, seed=seeds)
def test_activations(kernel_backend, name, shape, seed):
    fn, formula = activations[name]
    x = rand(np.random.default_rng(seed), *shape)
    close(fn(x), formula(x.numpy()), tol=1e-12)
    assert check_grad(fn, [x], kernel_backend)


@with_fixture
@given(lead=array_shapes(min_dims=0, max_dims=2, max_side=3), half=st.integers(1, 3),
       approximate=st.sampled_from(["none", "tanh"]), seed=seeds)  # fmt: skip
def test_geglu_is_value_times_gelu_of_gate(kernel_backend, lead, half, approximate, seed):
    x = rand(np.random.default_rng(seed), *lead, 2 * half)
    value, gate = x.numpy()[..., :half], x.numpy()[..., half:]
    close(F.geglu(x, approximate), value * F.gelu(tinysd.tensor(gate), approximate).numpy(), tol=1e-12)
    assert check_grad(lambda t: F.geglu(t, approximate), [x], kernel_backend)


float32_cases = {
    "conv2d": (lambda x, w: F.conv2d(x, w, w[:, 0, 0, 0] * 0 + 1, stride=2, padding=1), [(2, 3, 6, 6), (3, 3, 3, 3)]),
    "conv_transpose2d": (lambda x, w: F.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1),
                         [(2, 3, 6, 6), (3, 2, 3, 3)]),
    "max_pool2d": (lambda x: F.max_pool2d(x, 3, 2, 1), [(2, 3, 6, 6)]),
    "avg_pool2d": (lambda x: F.avg_pool2d(x, 2), [(2, 3, 6, 6)]),
    "interpolate": (F.interpolate, [(2, 3, 3, 3)]),
    "group_norm": (lambda x, w, b: F.group_norm(x, 3, w, b), [(2, 6, 3, 3), (6,), (6,)]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, 5, w, b), [(2, 3, 5), (5,), (5,)]),
    "attention": (lambda q, k, v: sdpa(q, k, v, is_causal=True), [(2, 4, 3), (2, 4, 3), (2, 4, 2)]),
    "silu": (F.silu, [(3, 4)]),
    "gelu": (F.gelu, [(3, 4)]),
    "geglu": (F.geglu, [(3, 8)]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(float32_cases))
def test_float32_in_float32_out(kernel_backend, device, name):
    """Outputs and gradients stay float32 and agree with the float64 computation (on each device)."""
    fn, shapes = float32_cases[name]
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(s) for s in shapes]
    results = {}
    for dtype in (np.float32, np.float64):
        inputs = [tinysd.tensor(v, dtype=dtype, requires_grad=True, device=device) for v in values]
        y = fn(*inputs)
        y.backward(tinysd.tensor(np.linspace(-1, 1, y.size).reshape(y.shape), dtype=dtype, device=device))
        assert y.dtype == dtype and all(t.grad.dtype == dtype for t in inputs)
        results[dtype] = [y.numpy()] + [t.grad.numpy() for t in inputs]
    for low, high in zip(results[np.float32], results[np.float64]):
        np.testing.assert_allclose(low, high, rtol=1e-4, atol=1e-4)


# ---- linear, dropout, embedding, pad ----------


@given(lead=array_shapes(min_dims=0, max_dims=2, max_side=3), n_in=st.integers(1, 4), n_out=st.integers(1, 4),
       bias=st.booleans(), seed=seeds)  # fmt: skip
def test_linear(lead, n_in, n_out, bias, seed):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, *lead, n_in), rand(rng, n_out, n_in)
    params = [w, rand(rng, n_out)] if bias else [w]
    expected = x.numpy() @ w.numpy().T + (params[1].numpy() if bias else 0)
    close(F.linear(x, *params), expected)
    assert gradcheck(F.linear, [x, *params])


def test_dropout_train_and_eval():
    tinysd.manual_seed(0)
    x = tinysd.ones(10_000, dtype=np.float64, requires_grad=True)
    y = F.dropout(x, p=0.3)
    kept = y.numpy() != 0
    assert abs(kept.mean() - 0.7) < 0.02
    np.testing.assert_allclose(y.numpy()[kept], 1 / 0.7)  # inverted dropout keeps the expectation
    y.backward(tinysd.ones(10_000, dtype=np.float64))
    np.testing.assert_allclose(x.grad.numpy(), y.numpy())  # the gradient passes where kept, scaled
    assert F.dropout(x, 0.3, training=False) is x and F.dropout(x, 0.0) is x
    assert not F.dropout(x, 1.0).numpy().any()
    tinysd.manual_seed(5)
    first = F.dropout(x, 0.5).numpy()
    tinysd.manual_seed(5)
    np.testing.assert_array_equal(first, F.dropout(x, 0.5).numpy())


@given(ids=st.lists(st.integers(0, 4), min_size=1, max_size=6), dim=st.integers(1, 3), seed=seeds)
def test_embedding_accumulates_repeated_ids(ids, dim, seed):
    w = rand(np.random.default_rng(seed), 5, dim)
    ids = np.array(ids).reshape(1, -1)
    close(F.embedding(tinysd.tensor(ids), w), w.numpy()[ids])
    F.embedding(ids, w).sum().backward()
    counts = np.bincount(ids.ravel(), minlength=5)
    close(w.grad, np.repeat(counts[:, None], dim, axis=1).astype(float))
    assert gradcheck(lambda w: F.embedding(ids, w), [w])


def test_pad_constant():
    x = tinysd.tensor(np.ones((1, 2, 2)), requires_grad=True)
    y = F.pad(x, (1, 0, 0, 2), value=5.0)
    assert y.shape == (1, 4, 3)
    close(y[0, :, 0], [5, 5, 5, 5])
    assert gradcheck(lambda t: F.pad(t, (1, 0, 0, 2)), [x])


# ---- losses ----------


@given(shape=small_shapes, reduction=st.sampled_from(["mean", "sum", "none"]), seed=seeds)
def test_mse_and_l1(shape, reduction, seed):
    rng = np.random.default_rng(seed)
    x, t = rand(rng, *shape), rand(rng, *shape)
    reduce = {"mean": np.mean, "sum": np.sum, "none": lambda a: a}[reduction]
    diff = x.numpy() - t.numpy()
    close(F.mse_loss(x, t, reduction), reduce(diff**2))
    close(F.l1_loss(x, t, reduction), reduce(np.abs(diff)))
    assert gradcheck(lambda a, b: F.mse_loss(a, b, reduction), [x, t])
    assert gradcheck(lambda a, b: F.l1_loss(a, b, reduction), [x, t])


@given(n=st.integers(1, 4), c=st.integers(1, 5), extra=array_shapes(min_dims=0, max_dims=1, max_side=3),
       smoothing=st.sampled_from([0.0, 0.1, 0.5]), seed=seeds)  # fmt: skip
def test_cross_entropy(n, c, extra, smoothing, seed):
    rng = np.random.default_rng(seed)
    logits = rand(rng, n, c, *extra)
    target = rng.integers(0, c, size=(n, *extra))
    close(F.cross_entropy(logits, tinysd.tensor(target), label_smoothing=smoothing),
          cross_entropy_np(logits.numpy(), target, smoothing))  # fmt: skip
    assert gradcheck(lambda x: F.cross_entropy(x, target, label_smoothing=smoothing), [logits])
    probs = softmax_np(rng.standard_normal((n, *extra, c))).swapaxes(1, -1)  # class probabilities along dim 1
    soft = -(probs * log_softmax_np(logits.numpy(), 1)).sum(axis=1)
    close(F.cross_entropy(logits, probs, reduction="none"), soft)


def test_cross_entropy_known_value_and_large_logits():
    close(F.cross_entropy(tinysd.tensor([[1.0, 2.0, 3.0]], dtype=np.float64), [2]), 0.40760596444438013)
    big = tinysd.tensor([[1e4, 0.0], [0.0, 1e4]], dtype=np.float64, requires_grad=True)
    loss = F.cross_entropy(big, np.array([1, 1]))
    close(loss, 5e3)  # the first row is off by 1e4, the second is right: mean 5e3, no overflow
    loss.backward()
    close(big.grad, [[0.5, -0.5], [0.0, 0.0]])


@given(shape=small_shapes, seed=seeds)
def test_binary_cross_entropy_with_logits(shape, seed):
    rng = np.random.default_rng(seed)
    x, t = rand(rng, *shape), tinysd.tensor(rng.random(shape), requires_grad=True)
    expected = np.logaddexp(0, x.numpy()) - t.numpy() * x.numpy()
    close(F.binary_cross_entropy_with_logits(x, t, "none"), expected)
    assert gradcheck(F.binary_cross_entropy_with_logits, [x, t])


def test_binary_cross_entropy_extremes_and_zero_logit():
    x = tinysd.tensor([-1000.0, 0.0, 1000.0], dtype=np.float64, requires_grad=True)
    t = np.array([1.0, 0.25, 0.0])
    close(F.binary_cross_entropy_with_logits(x, t, "none"), [1000.0, math.log(2), 1000.0])
    F.binary_cross_entropy_with_logits(x, t, "sum").backward()
    close(x.grad, [-1.0, 0.25, 1.0])  # sigmoid(x) - t, also at exactly x = 0


@given(shape=array_shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds)
def test_gaussian_kl(shape, seed):
    rng = np.random.default_rng(seed)
    mean, logvar = rand(rng, *shape), rand(rng, *shape)
    m, lv = mean.numpy(), logvar.numpy()
    per_sample = 0.5 * (m**2 + np.exp(lv) - 1 - lv).reshape(shape[0], -1).sum(axis=1)
    close(F.gaussian_kl(mean, logvar), per_sample.mean())
    assert gradcheck(F.gaussian_kl, [mean, logvar])
    close(F.gaussian_kl(tinysd.zeros(*shape), tinysd.zeros(*shape)), 0.0)  # N(0, I) against itself


def test_normalize_divides_by_the_l2_norm_along_dim_and_guards_zero_vectors():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    close(F.normalize(tinysd.tensor(x), dim=-1), [[0.6, 0.8], [0.0, 0.0]])
    close(F.normalize(tinysd.tensor(x), dim=0), x / np.array([[3.0, 4.0]]))
    assert gradcheck(lambda t: F.normalize(t, dim=1), [tinysd.tensor(np.random.default_rng(0).standard_normal((3, 4)), requires_grad=True)])
    with pytest.raises(ValueError, match="normalize: only p=2"):
        F.normalize(tinysd.tensor(x), p=1)


def contrastive_np(a, b, log_scale, positives):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = np.exp(log_scale) * a @ b.T

    def soft_ce(z, p):
        return -(p / p.sum(axis=1, keepdims=True) * log_softmax_np(z, 1)).sum(axis=1).mean()

    return (soft_ce(logits, positives) + soft_ce(logits.T, positives.T)) / 2


@given(n=st.integers(1, 4), e=st.integers(1, 4), with_positives=st.booleans(), seed=seeds)
def test_contrastive_loss(n, e, with_positives, seed):
    rng = np.random.default_rng(seed)
    img, txt = rand(rng, n, e), rand(rng, n, e)
    log_scale = tinysd.tensor(np.array(0.5), requires_grad=True)
    positives = np.eye(n, dtype=bool)
    if with_positives:
        labels = rng.integers(0, 2, n)
        positives = labels[:, None] == labels[None, :]
    arg = positives if with_positives else None
    close(F.contrastive_loss(img, txt, log_scale, arg), contrastive_np(img.numpy(), txt.numpy(), 0.5, positives))
    assert gradcheck(lambda a, b, s: F.contrastive_loss(a, b, s, arg), [img, txt, log_scale])


@given(n=st.integers(1, 3), c=st.integers(1, 2), size=st.integers(2, 5), seed=seeds)
def test_perceptual_loss(n, c, size, seed):
    """sum_i w_i mse(phi_i(x), phi_i(y)) for a small fixed feature network; zero against itself."""
    rng = np.random.default_rng(seed)
    w1, w2 = rand(rng, 3, c, 3, 3), rand(rng, 2, 3, 1, 1)

    def features(t):
        first = F.relu(F.conv2d(t, w1, padding=1))
        return [first, F.conv2d(first, w2)]

    x, y = rand(rng, n, c, size, size), rand(rng, n, c, size, size)
    (x1, x2), (y1, y2) = features(x), features(y)
    expected = 0.5 * F.mse_loss(x1, y1).item() + 2.0 * F.mse_loss(x2, y2).item()
    close(F.perceptual_loss(x, y, features, weights=[0.5, 2.0]), expected)
    close(F.perceptual_loss(y, y, features), 0.0)
    assert gradcheck(lambda a: F.perceptual_loss(a, y, features), [x])
    F.perceptual_loss(x, y, features).backward()
    assert y.grad is None  # the target's features are computed without a graph

# ---- bad input ----------


def z(*shape, dtype=np.float64):
    return tinysd.zeros(*shape, dtype=dtype)


bad_inputs = [
    (lambda: F.conv2d(z(1, 3, 5, 5), z(4, 2, 3, 3)), r"conv2d: input \(1, 3, 5, 5\) has 3 channels, but weight "
     r"\(4, 2, 3, 3\) with groups=1 expects 2"),
    (lambda: F.conv2d(z(1, 4, 5, 5), z(3, 2, 3, 3), groups=2), r"conv2d: groups=2 must .* divide the 3 output"),
    (lambda: F.conv2d(z(1, 1, 2, 2), z(1, 1, 3, 3)), r"conv2d: kernel 3x3 .* larger than the padded input 2x2"),
    (lambda: F.conv2d(z(1, 1, 4, 4), z(1, 1, 3, 3), dilation=2), r"spanning 5x5\) is larger than the padded input 4x4"),
    (lambda: F.conv2d(z(1, 1, 4, 4), z(1, 1, 3, 3), stride=0), r"conv2d: stride must be >= 1"),
    (lambda: F.conv2d(z(1, 1, 4, 4), z(1, 1, 3, 3, dtype=np.float32)), r"conv2d: inputs must share one dtype"),
    (lambda: F.conv2d(z(1, 4, 4), z(1, 1, 3, 3)), r"conv2d: input must be 4-D, got shape \(1, 4, 4\)"),
    (lambda: F.conv2d(z(1, 1, 4, 4), z(2, 1, 3, 3), z(3)), r"conv2d: bias must have shape \(2,\), got \(3,\)"),
    (lambda: F.conv_transpose2d(z(1, 3, 4, 4), z(2, 1, 3, 3)), r"conv_transpose2d: input \(1, 3, 4, 4\) has 3 "
     r"channels, but weight \(2, 1, 3, 3\) expects 2"),
    (lambda: F.conv_transpose2d(z(1, 2, 4, 4), z(2, 1, 3, 3), stride=2, output_padding=2),
     r"conv_transpose2d: output_padding \(2, 2\) must be smaller than stride \(2, 2\)"),
    (lambda: F.conv_transpose2d(z(1, 1, 1, 1), z(1, 1, 1, 1), padding=1), r"gives an empty output \(-1, -1\)"),
    (lambda: F.max_pool2d(z(1, 1, 4, 4), 2, padding=2), r"max_pool2d: padding \(2, 2\) must be at most half"),
    (lambda: F.avg_pool2d(z(1, 1, 1, 1), 4), r"avg_pool2d: kernel 4x4 .* larger than the padded input 1x1"),
    (lambda: F.interpolate(z(1, 1, 2, 2), 2, mode="bicubic"), r"interpolate: mode must be 'nearest' or 'bilinear'"),
    (lambda: F.interpolate(z(1, 1, 2, 2), 1.5), r"interpolate: scale_factor must be a positive integer"),
    (lambda: F.group_norm(z(2, 4, 3), 3), r"group_norm: num_groups=3 must divide the 4 channels of input \(2, 4, 3\)"),
    (lambda: F.group_norm(z(2, 4, 3), 2, z(3)), r"group_norm: weight must have shape \(4,\), got \(3,\)"),
    (lambda: F.layer_norm(z(2, 3, 4), (3,)), r"layer_norm: input \(2, 3, 4\) does not end with normalized_shape"),
    (lambda: sdpa(z(2, 4, 8), z(2, 5, 6), z(2, 5, 6)),
     r"query \(2, 4, 8\) and key \(2, 5, 6\) must have the same head dim D \(8 vs 6\)"),
    (lambda: sdpa(z(2, 4, 8), z(2, 5, 8), z(2, 6, 8)),
     r"key \(2, 5, 8\) and value \(2, 6, 8\) must have the same length \(5 vs 6\)"),
    (lambda: sdpa(z(2, 4, 8), z(3, 5, 8), z(3, 5, 8)), r"leading dims .* cannot be broadcast"),
    (lambda: sdpa(z(2, 4, 8), z(2, 5, 8), z(2, 5, 8), attn_mask=np.ones((4, 4), bool)),
     r"attn_mask of shape \(4, 4\) cannot be broadcast to \(\.\.\., Sq, Sk\) = \(2, 4, 5\)"),
    (lambda: sdpa(z(1, 2, 2), z(1, 2, 2), z(1, 2, 2), dropout_p=1.0), r"dropout_p must be in \[0, 1\), got 1.0"),
    (lambda: F.cross_entropy(z(3, 4), np.array([0, 4, 1])),
     r"cross_entropy: targets must be class indices in \[0, 4\), got values in \[0, 4\]"),
    (lambda: F.cross_entropy(z(3, 4), np.array([0, -1, 1])), r"got values in \[-1, 1\]"),
    (lambda: F.cross_entropy(z(3, 4), np.array([0, 1])), r"input \(3, 4\) must have shape \(3,\), got \(2,\)"),
    (lambda: F.cross_entropy(z(3, 4), np.zeros(3, bool)), r"cross_entropy: target must hold class indices .* got bool"),
    (lambda: F.cross_entropy(z(3, 4), np.zeros((3, 5))), r"probability targets must have the input's shape \(3, 4\)"),
    (lambda: F.cross_entropy(z(3, 4), np.array([0, 1, 2]), reduction="avg"), r"cross_entropy: reduction must be"),
    (lambda: F.mse_loss(z(3, 4), z(4, 3)), r"mse_loss: input \(3, 4\) and target \(4, 3\) must have the same shape"),
    (lambda: F.linear(z(2, 3), z(4, 5)), r"linear: input of shape \(2, 3\) has 3 features .* weight of shape \(4, 5\) "
     r"expects 5"),
    (lambda: F.embedding(np.array([0, 5]), z(5, 2)), r"embedding: ids must be in \[0, 5\) .* got values in \[0, 5\]"),
    (lambda: F.embedding(np.array([0.0]), z(5, 2)), r"embedding: ids must be integers, got float64"),
    (lambda: F.dropout(z(3), p=1.5), r"dropout: p must be in \[0, 1\]"),
    (lambda: F.gelu(z(3), approximate="fast"), r"gelu: approximate must be 'none' or 'tanh'"),
    (lambda: F.geglu(z(2, 3)), r"geglu: the last dim of input \(2, 3\) must have an even size"),
    (lambda: F.pad(z(3), (1, 1), mode="reflect"), r"pad: only mode='constant'"),
    (lambda: F.contrastive_loss(z(3, 4), z(2, 4), 0.0), r"contrastive_loss: image_embeds \(3, 4\) and text_embeds"),
    (lambda: F.contrastive_loss(z(2, 4), z(2, 4), 0.0, np.array([[1, 0], [1, 0]], bool)), r"every row and column"),
    (lambda: F.perceptual_loss(z(2, 4), z(2, 4), lambda t: [t, t], weights=[1.0]), r"perceptual_loss: .* 2 maps .* 1 "
     r"weights"),
    (lambda: F.perceptual_loss(z(2, 4), z(2, 3), lambda t: [t]), r"perceptual_loss: input \(2, 4\) and target"),
]  # fmt: skip


@pytest.mark.parametrize("call, message", bad_inputs)
def test_bad_input_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
