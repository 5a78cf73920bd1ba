"""Every primitive op of tinysd/ops.py: forward against NumPy, backward against finite differences.

hypothesis draws the shapes (broadcasting, size-1 and 0-d cases), the dims
(negative ones too) and the memory layout of the inputs; `check_op` (see
tests/helpers.py) does the three checks: values in float32 and float64,
float32 gradients stay float32, and a float64 gradcheck.
"""

import math
import operator

import numpy as np
import pytest
from conftest import DEVICES
from helpers import LAYOUTS, check_op, sample
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinysd
from tinysd.gradcheck import gradcheck

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4)
nonscalar_shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4)
seeds = st.integers(0, 2**16)
layouts = st.sampled_from(LAYOUTS)
devices = pytest.mark.parametrize("device", DEVICES)


def a_dim(ndim, extra=0):
    """A dim of a tensor with `ndim` dims, negative or not (`extra` widens it, for unsqueeze/stack)."""
    return st.integers(-ndim - extra, ndim - 1 + extra)


def np_sigmoid(a):
    return 1 / (1 + np.exp(-a))


def np_log_softmax(a, axis):
    shifted = a - a.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


# ---- elementwise -------------------------------------------------------------------------
# name: (NumPy reference, ours, indices of inputs that must be positive)
UNARY = {
    "neg": (np.negative, operator.neg, ()),
    "exp": (np.exp, tinysd.exp, ()),
    "log": (np.log, tinysd.log, (0,)),
    "sqrt": (np.sqrt, tinysd.sqrt, (0,)),
    "abs": (np.abs, tinysd.abs, ()),
    "tanh": (np.tanh, tinysd.tanh, ()),
    "sigmoid": (np_sigmoid, tinysd.sigmoid, ()),
    "relu": (lambda a: np.maximum(a, 0), tinysd.relu, ()),
}

BINARY = {
    "add": (np.add, operator.add, ()),
    "sub": (np.subtract, operator.sub, ()),
    "mul": (np.multiply, operator.mul, ()),
    "div": (np.divide, operator.truediv, ()),
    "pow": (np.power, operator.pow, (0,)),
    "maximum": (np.maximum, tinysd.maximum, ()),
    "minimum": (np.minimum, tinysd.minimum, ()),
}

# A Python scalar (or a NumPy array) on either side: the same expression works on arrays and tensors.
WITH_CONSTANTS = {
    "2.5 + x": lambda x: 2.5 + x,
    "x - 2": lambda x: x - 2,
    "2 - x": lambda x: 2 - x,
    "x * -1.5": lambda x: x * -1.5,
    "3 / x": lambda x: 3 / x,
    "x / 4": lambda x: x / 4,
    "x ** 2": lambda x: x**2,
    "x ** -1.5": lambda x: x**-1.5,
    "2 ** x": lambda x: 2**x,
    "array + x": lambda x: np.linspace(-1, 1, 4, dtype=x.dtype) + x,
    "array * x": lambda x: np.linspace(-1, 1, 4, dtype=x.dtype) * x,
}


@devices
@pytest.mark.parametrize("name", UNARY)
@given(shape=shapes, seed=seeds, layout=layouts)
def test_unary(name, device, shape, seed, layout):
    numpy_fn, our_fn, positive = UNARY[name]
    check_op([shape], numpy_fn, our_fn, seed=seed, positive=positive, layout=layout, device=device)


@devices
@pytest.mark.parametrize("name", BINARY)
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=4), seed=seeds, layout=layouts)
def test_binary_with_broadcasting(name, device, shapes, seed, layout):
    numpy_fn, our_fn, positive = BINARY[name]
    check_op(shapes.input_shapes, numpy_fn, our_fn, seed=seed, positive=positive, layout=layout, device=device)


@pytest.mark.parametrize("expression", WITH_CONSTANTS)
@given(shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4).map(lambda s: s + (4,)), seed=seeds)
def test_python_scalars_and_arrays_on_either_side(expression, shape, seed):
    fn = WITH_CONSTANTS[expression]
    check_op([shape], fn, fn, seed=seed, positive=(0,))


def test_elementwise_edge_values():
    x = tinysd.tensor([-np.inf, -2.0, 0.0, 3.0, np.inf])
    assert tinysd.relu(x).tolist() == [0.0, 0.0, 0.0, 3.0, np.inf]  # not nan, not -0.0
    with np.errstate(over="raise"):  # sigmoid never computes exp of a large positive number
        assert tinysd.sigmoid(tinysd.tensor([-1e4, 0.0, 1e4])).tolist() == [0.0, 0.5, 1.0]


@given(shape=shapes, seed=seeds, layout=layouts, data=st.data())
def test_clamp(shape, seed, layout, data):
    x = sample(np.random.default_rng(seed), [shape])[0]
    # bounds halfway between neighbouring values, so no element sits on a kink
    v = np.sort(np.concatenate([[-3.0], x.ravel(), [3.0]]))
    i, j = sorted(data.draw(st.lists(st.integers(0, v.size - 2), min_size=2, max_size=2)))
    lo, hi = float(v[i] + v[i + 1]) / 2, float(v[j] + v[j + 1]) / 2
    bounds = data.draw(st.sampled_from([(lo, hi), (lo, None), (None, hi)]))
    check_op([shape], lambda a: np.clip(a, *bounds), lambda t: t.clamp(*bounds), arrays=[x], layout=layout)


def test_maximum_splits_the_gradient_on_ties_and_clamp_needs_a_bound():
    a = tinysd.tensor([1.0, 2.0, 3.0], requires_grad=True)
    b = tinysd.tensor([2.0, 2.0, 2.0], requires_grad=True)
    tinysd.maximum(a, b).sum().backward()
    assert a.grad.tolist() == [0.0, 0.5, 1.0] and b.grad.tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="clamp"):
        tinysd.clamp(a)
    f32 = tinysd.tensor([0.0, 1.0, 2.0])
    assert tinysd.clamp(f32, np.float64(0.5), np.array(1.5)).dtype == np.float32  # NumPy-scalar bounds are numbers


def test_cast_and_to_dtype():
    x = tinysd.tensor(np.array([1.5, -2.25], np.float32), requires_grad=True)
    y = x.to(np.float64)
    assert y.dtype == np.float64 and y.requires_grad and x.to("float32") is x
    (y * tinysd.tensor(np.array([3.0, 4.0]))).sum().backward()
    assert x.grad.dtype == np.float32 and x.grad.tolist() == [3.0, 4.0]
    assert x.double().dtype == np.float64 and x.double().float().dtype == np.float32
    ints = x.long()  # an integer result carries no gradient
    assert ints.dtype == np.int64 and ints.tolist() == [1, -2] and not ints.requires_grad
    check_op([(2, 3)], lambda a: a.astype(np.float32).astype(a.dtype), lambda t: t.float().to(t.dtype), grad=False)


def test_dim_ops_on_a_0d_tensor_treat_it_as_one_element():
    """PyTorch accepts dim 0 or -1 on a 0-d tensor: sum/mean keep it, max gives index 0, softmax 1."""
    x = tinysd.tensor(3.0, dtype=np.float64, requires_grad=True)
    values, index = x.max(0)
    assert x.sum(0).item() == x.mean(-1).item() == values.item() == 3.0 and index.item() == 0
    assert x.sum(0, keepdim=True).shape == () and x.min(-1)[0].shape == ()
    assert tinysd.softmax(x, 0).item() == 1.0 and tinysd.log_softmax(x, -1).item() == 0.0
    (2 * x.sum(0) + values + 5 * tinysd.softmax(x, 0)).backward()
    assert x.grad.item() == 3.0
    for call in (lambda: x.sum(1), lambda: x.max(-2), lambda: tinysd.softmax(x, 1)):
        with pytest.raises(IndexError, match="out of range for a tensor with 0 dims"):
            call()


def test_integers_mixed_with_floats_promote_as_in_pytorch():
    """An integer tensor meeting a float takes the float's dtype (float32 for a Python float),
    and integer / integer is float32; NumPy alone would give float64 in each case."""
    ints = tinysd.arange(4)
    f32, f64 = tinysd.ones(4), tinysd.ones(4, dtype=np.float64)
    cases = {
        "ints * 0.5": (ints * 0.5, np.float32, [0.0, 0.5, 1.0, 1.5]),
        "0.5 + ints": (0.5 + ints, np.float32, [0.5, 1.5, 2.5, 3.5]),
        "ints / 2": (ints / 2, np.float32, [0.0, 0.5, 1.0, 1.5]),
        "ints ** 0.5": (ints**0.5, np.float32, [0.0, 1.0, 2**0.5, 3**0.5]),
        "ints + f32": (ints + f32, np.float32, [1.0, 2.0, 3.0, 4.0]),
        "ints + f64": (ints + f64, np.float64, [1.0, 2.0, 3.0, 4.0]),
        "where(ints > 1, ints, 0.5)": (tinysd.where(ints > 1, ints, 0.5), np.float32, [0.5, 0.5, 2.0, 3.0]),
        "ints + 1": (ints + 1, np.int64, [1, 2, 3, 4]),
        "ints - 1": (ints - 1, np.int64, [-1, 0, 1, 2]),
        "f32 + f64": (f32 + f64, np.float64, [2.0] * 4),
        "f32 * 2": (f32 * 2, np.float32, [2.0] * 4),
    }
    for name, (got, dtype, values) in cases.items():
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got.numpy(), values, rtol=1e-6, err_msg=name)
    x = tinysd.tensor([1.0, 2.0], requires_grad=True)
    (x * tinysd.tensor([3, 4])).sum().backward()  # the integer side carries no gradient; x's is float32
    assert x.grad.dtype == np.float32 and x.grad.tolist() == [3.0, 4.0]


def test_comparisons_give_bool_tensors_without_gradient():
    x = tinysd.tensor([1.0, 2.0, 3.0], requires_grad=True)
    assert (x > 2).tolist() == [False, False, True] and (x <= 2).tolist() == [True, True, False]
    assert (x == 2).tolist() == [False, True, False] and (x != 2).dtype == np.bool_
    assert not (x >= 1).requires_grad


# ---- reductions --------------------------------------------------------------------------
def _max_values(fn):
    """max/min return (values, indices) when given a dim, as in PyTorch: keep the values."""
    return lambda x, dim, keepdim: fn(x) if dim is None else fn(x, dim, keepdim)[0]


# name: (NumPy reference, ours, smallest size of a reduced dim)
REDUCTIONS = {
    "sum": (np.sum, tinysd.sum, 1),
    "mean": (np.mean, tinysd.mean, 1),
    "var": (lambda a, axis, keepdims: np.var(a, axis=axis, keepdims=keepdims, ddof=1), tinysd.var, 2),
    "max": (np.max, _max_values(tinysd.max), 1),
    "min": (np.min, _max_values(tinysd.min), 1),
}


@pytest.mark.parametrize("name", REDUCTIONS)
@given(data=st.data(), seed=seeds, layout=layouts)
def test_reduction(name, data, seed, layout):
    numpy_fn, our_fn, min_side = REDUCTIONS[name]
    min_dims = 0 if min_side == 1 else 1  # 0-d tensors too, except for var (n - 1 would be 0)
    shape = data.draw(hnp.array_shapes(min_dims=min_dims, max_dims=4, min_side=min_side, max_side=4))
    dims = [st.none()]
    if shape:
        dims.append(a_dim(len(shape)))
        if name in ("sum", "mean", "var"):  # several dims at once
            dims.append(st.lists(a_dim(len(shape)), min_size=1, unique_by=lambda d: d % len(shape)).map(tuple))
    dim = data.draw(st.one_of(dims), label="dim")
    keepdim = data.draw(st.booleans(), label="keepdim") and (dim is not None or name in ("sum", "mean", "var"))
    check_op([shape], lambda a: numpy_fn(a, axis=dim, keepdims=keepdim), lambda x: our_fn(x, dim, keepdim=keepdim),
             seed=seed, layout=layout)


@pytest.mark.parametrize("largest", [True, False])
@given(shape=nonscalar_shapes, seed=seeds, keepdim=st.booleans(), data=st.data())
def test_max_min_along_a_dim_return_values_and_indices(largest, shape, seed, keepdim, data):
    dim = data.draw(a_dim(len(shape)))
    a = sample(np.random.default_rng(seed), [shape])[0]
    x = tinysd.tensor(a, requires_grad=True)
    values, indices = (tinysd.max if largest else tinysd.min)(x, dim, keepdim)
    expected = (np.argmax if largest else np.argmin)(a, axis=dim, keepdims=keepdim)
    assert indices.dtype == np.int64 and not indices.requires_grad
    np.testing.assert_array_equal(indices.numpy(), expected)
    np.testing.assert_array_equal(values.numpy(), (np.max if largest else np.min)(a, axis=dim, keepdims=keepdim))


def test_max_gradient_on_ties_follows_pytorch():
    x = tinysd.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]], requires_grad=True)
    x.max().backward()  # a full reduction shares the gradient among tied elements
    assert x.grad.tolist() == [[0.0, 0.5, 0.5], [0.0, 0.0, 0.0]]
    x.grad = None
    x.max(dim=1)[0].sum().backward()  # along a dim, it goes to the index returned
    assert x.grad.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_var_is_unbiased_by_default():
    a = np.array([[1.0, 2.0, 4.0], [0.0, 3.0, 9.0]])
    x = tinysd.tensor(a)
    np.testing.assert_allclose(x.var().item(), np.var(a, ddof=1))
    np.testing.assert_allclose(x.var(dim=1, unbiased=False).numpy(), np.var(a, axis=1))
    np.testing.assert_allclose(x.var(dim=0, correction=0).numpy(), np.var(a, axis=0))
    np.testing.assert_allclose(x.std(dim=1).numpy(), np.std(a, axis=1, ddof=1))


@given(shape=nonscalar_shapes, seed=seeds, keepdim=st.booleans(), data=st.data())
def test_argmax_argmin(shape, seed, keepdim, data):
    dim = data.draw(st.none() | a_dim(len(shape)))
    a = sample(np.random.default_rng(seed), [shape])[0]
    x = tinysd.tensor(a, requires_grad=True)
    for ours, ref in ((tinysd.argmax, np.argmax), (tinysd.argmin, np.argmin)):
        got = ours(x, dim, keepdim=keepdim and dim is not None)
        assert got.dtype == np.int64 and not got.requires_grad and got._ctx is None
        np.testing.assert_array_equal(got.numpy(), ref(a, axis=dim, keepdims=keepdim and dim is not None))


# ---- movement ------------------------------------------------------------------------------
@given(shape=shapes, seed=seeds, layout=layouts, data=st.data())
def test_reshape_and_view(shape, seed, layout, data):
    target = list(reversed(shape))
    if target:  # let one size be inferred
        target[data.draw(st.integers(0, len(target) - 1))] = -1
    check_op([shape], lambda a: a.reshape(target), lambda x: x.reshape(*target), seed=seed, layout=layout)
    check_op([shape], lambda a: a.reshape(target), lambda x: x.view(tuple(target)), seed=seed, grad=False)


@given(shape=nonscalar_shapes, seed=seeds, layout=layouts, data=st.data())
def test_transpose_permute_and_T(shape, seed, layout, data):
    d0, d1 = data.draw(a_dim(len(shape))), data.draw(a_dim(len(shape)))
    perm = data.draw(st.permutations(range(len(shape))))
    perm = [d - len(shape) if data.draw(st.booleans()) else d for d in perm]  # some negative
    check_op([shape], lambda a: np.swapaxes(a, d0, d1), lambda x: x.transpose(d0, d1), seed=seed, layout=layout)
    check_op([shape], lambda a: np.transpose(a, perm), lambda x: x.permute(*perm), seed=seed, layout=layout)
    check_op([shape], lambda a: a.T, lambda x: x.T, seed=seed, grad=False)


@given(shape=shapes, seed=seeds, data=st.data())
def test_flatten(shape, seed, data):
    n = max(len(shape), 1)
    start, end = sorted([data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))])
    if data.draw(st.booleans()):
        start, end = start - n, end - n
    s, e = start % n, end % n
    expected = shape[:s] + (math.prod(shape[s : e + 1]),) + shape[e + 1 :] if shape else (1,)
    check_op([shape], lambda a: a.reshape(expected), lambda x: x.flatten(start, end), seed=seed)


def test_flatten_and_reshape_of_empty_tensors():
    x = tinysd.zeros(0, 3, 4)
    assert x.flatten(1).shape == (0, 12) and x.flatten().shape == (0,)
    assert x.reshape(-1, 6).shape == (0, 6)


@given(shape=shapes, seed=seeds, data=st.data())
def test_unsqueeze(shape, seed, data):
    dim = data.draw(a_dim(len(shape), extra=1))
    check_op([shape], lambda a: np.expand_dims(a, dim), lambda x: x.unsqueeze(dim), seed=seed)


@given(shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=2), seed=seeds, data=st.data())
def test_squeeze(shape, seed, data):
    dim = data.draw(st.none() | a_dim(len(shape))) if shape else None
    squeezable = dim is None or shape[dim] == 1
    check_op([shape], lambda a: np.squeeze(a, dim) if squeezable else a, lambda x: x.squeeze(dim), seed=seed)


@given(shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=2), seed=seeds, layout=layouts,
       data=st.data())
def test_expand(shape, seed, layout, data):
    lead = data.draw(st.lists(st.integers(1, 3), max_size=2))
    sizes = [data.draw(st.integers(1, 3)) if s == 1 else data.draw(st.sampled_from([s, -1])) for s in shape]
    target = tuple(lead + sizes)
    full = tuple(lead) + tuple(s if t == -1 else t for s, t in zip(shape, sizes))
    check_op([shape], lambda a: np.broadcast_to(a, full), lambda x: x.expand(*target), seed=seed, layout=layout)


@given(shape=shapes, seed=seeds, layout=layouts, data=st.data())
def test_getitem_basic_indices(shape, seed, layout, data):
    """ints (negative too), slices (with steps), None and Ellipsis."""
    index = data.draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True), label="index")
    check_op([shape], lambda a: a[index], lambda x: x[index], seed=seed, layout=layout)


@given(shape=nonscalar_shapes, seed=seeds, data=st.data())
def test_getitem_integer_arrays(shape, seed, data):
    """Repeated indices are common here: their gradients must add up."""
    index = data.draw(hnp.integer_array_indices(shape, result_shape=hnp.array_shapes(max_dims=2, max_side=5)))
    check_op([shape], lambda a: a[index], lambda x: x[index], seed=seed)
    check_op([shape], lambda a: a[index[0]], lambda x: x[tinysd.tensor(index[0])], seed=seed)


def test_getitem_repeated_indices_accumulate():
    x = tinysd.tensor([10.0, 20.0, 30.0], requires_grad=True)
    x[[0, 0, 2, 0]].sum().backward()
    assert x.grad.tolist() == [3.0, 0.0, 1.0]
    m = tinysd.tensor(np.arange(12.0).reshape(3, 4), requires_grad=True)
    (m[np.array([1, 1]), 1:] * 2).sum().backward()  # an array mixed with a slice
    assert m.grad.tolist() == [[0, 0, 0, 0], [0, 4, 4, 4], [0, 0, 0, 0]]
    m.grad = None
    m[m > 8].sum().backward()  # a boolean mask
    assert m.grad.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]]


def _weighted_cat(pieces, dim, cat):
    """Join pieces back, each scaled differently, so a gradient routed to the wrong piece shows."""
    return cat([p * (i + 1) for i, p in enumerate(pieces)], dim)


@given(shape=nonscalar_shapes, seed=seeds, layout=layouts, data=st.data())
def test_cat(shape, seed, layout, data):
    dim = data.draw(a_dim(len(shape)))
    lengths = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    shapes_ = [shape[: dim % len(shape)] + (n,) + shape[dim % len(shape) + 1 :] for n in lengths]
    check_op(shapes_, lambda *a: np.concatenate(a, dim), lambda *x: tinysd.cat(x, dim), seed=seed, layout=layout)


@given(shape=shapes, seed=seeds, data=st.data())
def test_stack(shape, seed, data):
    dim = data.draw(a_dim(len(shape), extra=1))
    count = data.draw(st.integers(1, 3))
    check_op([shape] * count, lambda *a: np.stack(a, dim), lambda *x: tinysd.stack(x, dim), seed=seed)


@given(shape=nonscalar_shapes, seed=seeds, chunks=st.integers(1, 5), data=st.data())
def test_chunk(shape, seed, chunks, data):
    dim = data.draw(a_dim(len(shape)))
    n = shape[dim]
    step = -(-n // chunks)  # PyTorch: pieces of ceil(n / chunks), the last one smaller
    pieces = lambda a: np.split(a, list(range(step, n, step)), dim)  # noqa: E731
    check_op([shape], lambda a: _weighted_cat(pieces(a), dim, np.concatenate),
             lambda x: _weighted_cat(x.chunk(chunks, dim), dim, tinysd.cat), seed=seed)
    assert len(tinysd.zeros(*shape).chunk(chunks, dim)) == len(pieces(np.zeros(shape)))


def test_chunk_sizes_match_pytorch():
    """The examples of PyTorch's documentation: it may return fewer pieces than asked."""
    sizes = lambda n: [len(p) for p in tinysd.arange(n).chunk(6)]  # noqa: E731
    assert sizes(11) == [2, 2, 2, 2, 2, 1]
    assert sizes(12) == [2] * 6
    assert sizes(13) == [3, 3, 3, 3, 1]


@given(shape=nonscalar_shapes, seed=seeds, data=st.data())
def test_split(shape, seed, data):
    dim = data.draw(a_dim(len(shape)))
    n = shape[dim]
    if data.draw(st.booleans(), label="sections"):
        cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3)))
        sizes = list(np.diff([0, *cuts, n]))
        split_arg, bounds = [int(s) for s in sizes], cuts
    else:
        split_arg = data.draw(st.integers(1, n))
        bounds = list(range(split_arg, n, split_arg))
    check_op([shape], lambda a: _weighted_cat(np.split(a, bounds, dim), dim, np.concatenate),
             lambda x: _weighted_cat(x.split(split_arg, dim), dim, tinysd.cat), seed=seed)


@given(shape=nonscalar_shapes, seed=seeds, layout=layouts, data=st.data())
def test_pad_constant(shape, seed, layout, data):
    pairs = data.draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), max_size=len(shape)))
    value = data.draw(st.sampled_from([0.0, -1.5]))
    widths = [(0, 0)] * (len(shape) - len(pairs)) + pairs[::-1]  # PyTorch lists the last dim first
    flat = [w for pair in pairs for w in pair]
    check_op([shape], lambda a: np.pad(a, widths, constant_values=value),
             lambda x: tinysd.pad(x, flat, value), seed=seed, layout=layout)


@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=4, max_side=4), seed=seeds)
def test_where(shapes, seed):
    cond_shape, a_shape, b_shape = shapes.input_shapes
    cond = np.random.default_rng(seed).random(cond_shape) < 0.5
    check_op([a_shape, b_shape], lambda a, b: np.where(cond, a, b), lambda a, b: tinysd.where(cond, a, b),
             seed=seed)
    check_op([a_shape], lambda a: np.where(cond, a, 0.5), lambda a: tinysd.where(tinysd.tensor(cond), a, 0.5),
             seed=seed)


# ---- matrix product and softmax --------------------------------------------------------------
@devices
@given(shapes=hnp.mutually_broadcastable_shapes(signature=np.matmul.signature, max_dims=2, max_side=4),
       seed=seeds, layout=layouts)
def test_matmul_batched_broadcasting_and_vectors(device, shapes, seed, layout):
    """Batch dims broadcast; a 1-D operand is a row (left) or a column (right) vector."""
    check_op(shapes.input_shapes, np.matmul, operator.matmul, seed=seed, layout=layout, device=device)


@devices
@pytest.mark.parametrize("log", [False, True])
@given(shape=nonscalar_shapes, seed=seeds, layout=layouts, data=st.data())
def test_softmax_and_log_softmax(log, device, shape, seed, layout, data):
    dim = data.draw(a_dim(len(shape)))
    ref = (lambda a: np_log_softmax(a, dim)) if log else (lambda a: np.exp(np_log_softmax(a, dim)))
    ours = (lambda x: x.log_softmax(dim)) if log else (lambda x: x.softmax(dim))
    check_op([shape], ref, ours, seed=seed, layout=layout, device=device)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_is_stable_at_large_logits(dtype):
    logits = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4 - 1], [-1e4, -1e4, -1e4]], dtype)
    x = tinysd.tensor(logits, requires_grad=True)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p, logp = x.softmax(-1), x.log_softmax(-1)
        (p * logp).sum().backward()
    e = math.exp(-1)
    expected = [[1, 0, 0], [1 / (2 + e), 1 / (2 + e), e / (2 + e)], [1 / 3, 1 / 3, 1 / 3]]
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(logp.numpy()[0], [0, -1e4, -2e4], rtol=1e-6)
    np.testing.assert_allclose(logp.numpy()[2], np.log([1 / 3] * 3), rtol=1e-6)
    assert np.isfinite(x.grad.numpy()).all()


def test_softmax_gradient_at_large_logits():
    x = tinysd.tensor(np.array([[1e4, 1e4 + 0.5, 1e4 - 0.3], [-1e4, -1e4 + 1, -1e4 + 0.2]]), requires_grad=True)
    assert gradcheck(lambda t: t.log_softmax(1), [x]) and gradcheck(lambda t: t.softmax(1), [x])


# ---- bad input: a clear error naming the op and the shapes --------------------------------
def _t(*shape):
    return tinysd.zeros(*shape)


BAD_INPUT = {
    "matmul": (lambda: _t(3, 4) @ _t(5, 6), ValueError, ["matmul", "(3, 4)", "(5, 6)"]),
    "matmul batch": (lambda: _t(2, 3, 4) @ _t(3, 4, 5), ValueError, ["matmul", "(2, 3, 4)", "(3, 4, 5)"]),
    "matmul 0-d": (lambda: tinysd.matmul(_t(), _t(3)), ValueError, ["matmul", "()", "(3,)"]),
    "add": (lambda: _t(2, 3) + _t(4), ValueError, ["add", "(2, 3)", "(4,)"]),
    "mul": (lambda: _t(2, 3) * _t(3, 2), ValueError, ["mul", "(2, 3)", "(3, 2)"]),
    "maximum": (lambda: tinysd.maximum(_t(2), _t(3)), ValueError, ["maximum", "(2,)", "(3,)"]),
    "where": (lambda: tinysd.where(np.ones(4, bool), _t(3), _t(3)), ValueError, ["where", "(4,)", "(3,)"]),
    "reshape": (lambda: _t(2, 3).reshape(4, 2), ValueError, ["reshape", "(2, 3)", "(4, 2)"]),
    "permute": (lambda: _t(2, 3).permute(0, 0), ValueError, ["permute", "(2, 3)"]),
    "expand": (lambda: _t(2, 3).expand(4, 3), ValueError, ["expand", "(2, 3)", "(4, 3)"]),
    "cat": (lambda: tinysd.cat([_t(2, 3), _t(2, 4)], 0), ValueError, ["cat", "(2, 3)", "(2, 4)"]),
    "cat 0-d": (lambda: tinysd.cat([_t(), _t()]), ValueError, ["cat", "()", "stack"]),
    "stack": (lambda: tinysd.stack([_t(2), _t(3)]), ValueError, ["stack", "(2,)", "(3,)"]),
    "split": (lambda: _t(5).split([2, 2]), ValueError, ["split", "[2, 2]", "(5,)"]),
    "pad": (lambda: tinysd.pad(_t(2), (1, 1, 1, 1)), ValueError, ["pad", "(1, 1, 1, 1)"]),
    "dim": (lambda: _t(2, 3).sum(dim=2), IndexError, ["sum", "dim 2", "2 dims"]),
    "getitem": (lambda: _t(2, 3)[5], IndexError, ["getitem", "(2, 3)"]),
    "max of empty": (lambda: _t(0, 3).max(), ValueError, ["max", "(0, 3)"]),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_names_the_op_and_shapes(case):
    make, error, words = BAD_INPUT[case]
    with pytest.raises(error) as info:
        make()
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"
