"""Kinks and ties: the gradient where an op has no derivative, and which element wins among equals.

The drawn inputs of the other tests (tests/helpers.sample) keep away from kinks and
ties so that finite differences stay honest; here every input sits exactly on one.
The expected numbers are PyTorch's (torch 2.x), written out by hand so the tests
need no torch:

    relu'(0) = 0;  abs'(0) = 0;  clamp passes the gradient where lo <= x <= hi (both ends included);
    maximum/minimum split it evenly between tied operands;  max()/min() of a whole tensor
    share it evenly among tied elements;  max(dim)/min(dim)/argmax/argmin pick the first index;
    max_pool2d gives it to the first maximum of each window in row-major order, never to
    padding, and a NaN in a window is its maximum.

Every kernel backend (reference, Numba, CuPy when present) must pick the same element
on inputs full of ties: zeros, small integers, the output of a relu, -inf, NaN.
"""

import numpy as np
import pytest

import tinysd
import tinysd.nn as nn
import tinysd.nn.functional as F
from kernels import load
from tinysd import backend

DTYPES = [np.float32, np.float64]
UPSTREAM = np.array([2.0, 3.0, 5.0])  # distinct, so a gradient sent to the wrong element shows


def grad_of(fn, x, dtype, device, upstream=UPSTREAM):
    t = tinysd.tensor(np.asarray(x, dtype), requires_grad=True, device=device)
    y = fn(t)
    y.backward(tinysd.tensor(np.asarray(upstream, dtype).reshape(y.shape), device=device))
    assert t.grad.dtype == dtype
    return t.grad.numpy().tolist()


# x = [-1, 0, 1]: the kink sits on the middle element (or on a clamp bound).
KINKS = {
    "relu": (lambda t: t.relu(), [0.0, 0.0, 1.0]),
    "F.relu": (F.relu, [0.0, 0.0, 1.0]),
    "nn.ReLU": (lambda t: nn.ReLU()(t), [0.0, 0.0, 1.0]),
    "abs": (lambda t: t.abs(), [-1.0, 0.0, 1.0]),
    "clamp(0, 1)": (lambda t: t.clamp(0.0, 1.0), [0.0, 1.0, 1.0]),
    "clamp(min=0)": (lambda t: t.clamp(min=0.0), [0.0, 1.0, 1.0]),
    "clamp(max=0)": (lambda t: t.clamp(max=0.0), [1.0, 1.0, 0.0]),
    "clamp(-1, 1)": (lambda t: t.clamp(-1.0, 1.0), [1.0, 1.0, 1.0]),
    "clamp(0, 0)": (lambda t: t.clamp(0.0, 0.0), [0.0, 1.0, 0.0]),
    "clamp(1, 0)": (lambda t: t.clamp(1.0, 0.0), [0.0, 0.0, 0.0]),  # lo > hi: every output is hi
    "l1_loss": (lambda t: F.l1_loss(t, tinysd.zeros_like(t), reduction="none"), [-1.0, 0.0, 1.0]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(KINKS))
def test_gradient_at_the_kink_follows_pytorch(name, dtype, device):
    fn, slope = KINKS[name]
    assert grad_of(fn, [-1.0, 0.0, 1.0], dtype, device) == (np.array(slope) * UPSTREAM).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
def test_clamp_forward_on_its_bounds(dtype, device):
    x = tinysd.tensor(np.array([-1.0, 0.0, 1.0], dtype), device=device)
    assert x.clamp(0.0, 0.0).tolist() == [0.0, 0.0, 0.0]
    assert x.clamp(1.0, 0.0).tolist() == [0.0, 0.0, 0.0]  # PyTorch: min(max(x, lo), hi)


@pytest.mark.parametrize("dtype", DTYPES)
def test_maximum_and_minimum_split_ties_evenly_even_when_broadcast(dtype, device):
    a = tinysd.tensor(np.array([1.0, 2.0, 3.0], dtype), requires_grad=True, device=device)
    b = tinysd.tensor(np.array(2.0, dtype), requires_grad=True, device=device)
    g = tinysd.tensor(UPSTREAM.astype(dtype), device=device)
    tinysd.maximum(a, b).backward(g)
    assert a.grad.tolist() == [0.0, 1.5, 5.0] and b.grad.item() == 2.0 + 1.5
    a.grad = b.grad = None
    tinysd.minimum(a, b).backward(g)
    assert a.grad.tolist() == [2.0, 1.5, 0.0] and b.grad.item() == 1.5 + 5.0
    a.grad = b.grad = None
    tinysd.maximum(b, a).backward(g)  # the same with the operands swapped
    assert a.grad.tolist() == [0.0, 1.5, 5.0] and b.grad.item() == 2.0 + 1.5


TIED = [[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 0.0, 2.0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_and_min_along_a_dim_pick_the_first_of_tied_elements(dtype, device):
    x = tinysd.tensor(np.array(TIED, dtype), requires_grad=True, device=device)
    values, idx = x.max(dim=1)
    assert values.tolist() == [3.0, 2.0] and idx.tolist() == [1, 0]
    values.backward(tinysd.tensor(np.array([2.0, 3.0], dtype), device=device))
    assert x.grad.tolist() == [[0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]
    x.grad = None
    values, idx = x.min(dim=1, keepdim=True)
    assert values.tolist() == [[0.0], [0.0]] and idx.tolist() == [[3], [2]]
    values.backward(tinysd.tensor(np.array([[2.0], [3.0]], dtype), device=device))
    assert x.grad.tolist() == [[0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 3.0, 0.0]]
    x.grad = None
    values, idx = x.max(dim=0)
    assert idx.tolist() == [1, 0, 0, 1]
    values.backward(tinysd.tensor(np.array([2.0, 3.0, 5.0, 7.0], dtype), device=device))
    assert x.grad.tolist() == [[0.0, 3.0, 5.0, 0.0], [2.0, 0.0, 0.0, 7.0]]


def test_argmax_and_argmin_pick_the_first_of_tied_elements(device):
    for dtype in (np.float32, np.float64, np.int64):
        x = tinysd.tensor(np.array(TIED, dtype), device=device)
        assert x.argmax().item() == 1 and x.argmin().item() == 3  # over the flattened tensor
        assert x.argmax(dim=1).tolist() == [1, 0] and x.argmin(dim=1).tolist() == [3, 2]
        zeros = tinysd.zeros(3, 4, dtype=dtype, device=device)
        assert zeros.argmax(dim=0).tolist() == [0] * 4 and zeros.argmin(dim=1).tolist() == [0] * 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_and_min_of_everything_share_the_gradient_among_ties(dtype, device):
    x = tinysd.tensor(np.array(TIED, dtype), requires_grad=True, device=device)
    x.max().backward(tinysd.tensor(np.array(4.0, dtype), device=device))
    assert x.grad.tolist() == [[0.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    x.grad = None
    x.min().backward(tinysd.tensor(np.array(4.0, dtype), device=device))
    assert x.grad.tolist() == [[0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 2.0, 0.0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_gradient_on_an_all_zero_input_follows_pytorch(dtype, device):
    # PyTorch: F.max_pool2d(torch.zeros(1, 1, 4, 4), 2, 1, padding=1) sends each window's
    # gradient to its first real element; the counts below are its x.grad for a sum.
    x = tinysd.zeros(1, 1, 4, 4, dtype=dtype, requires_grad=True, device=device)
    F.max_pool2d(x, 2, 1, padding=1).sum().backward()
    expected = [[4, 2, 2, 2], [2, 1, 1, 1], [2, 1, 1, 1], [2, 1, 1, 1]]
    assert x.grad.numpy()[0, 0].tolist() == expected
    y = nn.MaxPool2d(2)(tinysd.tensor(np.array([[[[1.0, np.nan], [3.0, 2.0]]]], dtype), device=device))
    assert np.isnan(y.item())  # NaN propagates, as in PyTorch


# ---- every backend picks the element the specification picks -------------------------------
def _available(name):
    if name == "cupy_gpu":
        return backend.cuda_is_available() and load("cupy_gpu") is not None
    return load(name) is not None


def max_pool_spec(x, dy, kernel, stride, padding):
    """Loop-level specification: (y, dx) with dx[first maximum of each window] += dy.

    The first maximum in row-major window order over real (unpadded) positions; the
    first NaN, if the window holds one."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho, wo = dy.shape[2:]
    y, dx = np.zeros(dy.shape, x.dtype), np.zeros(x.shape, x.dtype)
    for i in range(n):
        for j in range(c):
            for a in range(ho):
                for b in range(wo):
                    best = None
                    for r in range(a * sh - ph, a * sh - ph + kh):
                        for s in range(b * sw - pw, b * sw - pw + kw):
                            if not (0 <= r < h and 0 <= s < w):
                                continue
                            v = x[i, j, r, s]
                            if best is None or v > x[i, j][best] or (np.isnan(v) and not np.isnan(x[i, j][best])):
                                best = (r, s)
                    y[i, j, a, b] = x[i, j][best]
                    dx[i, j][best] += dy[i, j, a, b]
    return y, dx


def tied_inputs(rng, shape):
    integers = rng.integers(0, 3, shape).astype(float)
    with_nan = integers.copy()
    with_nan.flat[rng.choice(with_nan.size, 3, replace=False)] = np.nan
    with_inf = np.where(integers > 0, -np.inf, integers)
    return {"zeros": np.zeros(shape), "integers": integers, "relu": np.maximum(rng.standard_normal(shape), 0),
            "-inf": np.full(shape, -np.inf), "some -inf": with_inf, "nan": with_nan}


POOLS = [((2, 2), (2, 2), (0, 0)), ((2, 2), (1, 1), (1, 1)), ((3, 3), (1, 1), (1, 1)), ((3, 2), (2, 1), (1, 0)),
         ((3, 3), (2, 2), (1, 1))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["reference", "numba_cpu", "cupy_gpu"])
def test_every_backend_max_pool_picks_the_specified_element_among_ties(name, dtype):
    if not _available(name):
        pytest.skip(f"{name} unavailable (CuPy, a GPU or numba absent)")
    k = load(name)
    device = "cuda" if name == "cupy_gpu" else "cpu"
    rng = np.random.default_rng(0)
    for kernel, stride, padding in POOLS:
        for what, x in tied_inputs(rng, (2, 2, 5, 6)).items():
            x = x.astype(dtype)
            y, argmax = k.max_pool2d(backend.to_device(x, device), kernel, stride, padding)
            dy = rng.integers(1, 50, y.shape).astype(dtype)  # distinct enough that a wrong pick shows
            dx = k.max_pool2d_backward(backend.to_device(dy, device), argmax, x.shape, kernel, stride, padding)
            y_spec, dx_spec = max_pool_spec(x, dy, kernel, stride, padding)
            where = f"{name} max_pool2d on {what}, kernel {kernel}, stride {stride}, padding {padding}"
            np.testing.assert_array_equal(backend.to_device(y, "cpu"), y_spec, err_msg=where)
            np.testing.assert_array_equal(backend.to_device(dx, "cpu"), dx_spec, err_msg=where)
