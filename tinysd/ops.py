"""Primitive differentiable operations.

Each op is a Function with its forward and backward written on raw arrays
(NumPy or CuPy: `xp` is whichever module the data belongs to), plus a small
public function with PyTorch's name and signature. Ops that are compositions
of primitives (mean, var, stack, chunk, ...) need no backward of their own.

Notation in docstrings: g = dL/dy, the gradient flowing into the op's output.
"""

import builtins
import math

import numpy as np

import kernels
import kernels.reference

from . import backend
from .tensor import KERNEL_DTYPES, Function, Tensor, is_grad_enabled, raw_index


def as_tensor(x, like):
    """Wrap a Python scalar or array as a Tensor matching `like`'s dtype and device."""
    if isinstance(x, Tensor):
        return x
    xp = backend.array_module(like.data)
    if backend.is_cupy_array(x) or isinstance(x, np.ndarray):
        return Tensor(xp.asarray(x))
    dtype = like.dtype if like.dtype.kind == "f" else None
    return Tensor(xp.asarray(x, dtype=dtype))


def _promote(a, b):
    """Both operands as Tensors of one dtype, with PyTorch's rule for mixing integers and floats: the
    integer side becomes the float side's dtype (float32 when the float is a Python number),
    where NumPy would pick float64. Other mixes follow NumPy (float32 with float64 gives float64)."""
    a_number, b_number = not isinstance(a, Tensor), not isinstance(b, Tensor)
    if a_number:
        a = as_tensor(a, b)
    if b_number:
        b = as_tensor(b, a)
    kinds = a.dtype.kind + b.dtype.kind
    if "f" in kinds and kinds != "ff":  # one integer (or bool) side, one float side
        floating, number = (a, a_number) if a.dtype.kind == "f" else (b, b_number)
        dtype = np.float32 if number else floating.dtype
        a, b = _as_float(a, dtype), _as_float(b, dtype)
    return a, b


def _as_float(t, dtype):
    """t as floats of `dtype`: t is an integer (or bool) tensor or a wrapped Python number, which carry
    no gradient, or already of `dtype` (returned as is)."""
    return t if t.dtype == dtype else Tensor(t.data.astype(dtype))


def _dim(dim, ndim, op):
    """Normalise a possibly negative dim, with a clear error when out of range."""
    if not -builtins.max(ndim, 1) <= dim < builtins.max(ndim, 1):
        raise IndexError(f"{op}: dim {dim} out of range for a tensor with {ndim} dims")
    return dim % builtins.max(ndim, 1)


def _dims(dim, ndim, op):
    """Reduction axes; a 0-d tensor accepts dim 0 or -1 (as in PyTorch) and reduces over nothing."""
    if dim is None:
        return None
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    axes = tuple(_dim(d, ndim, op) for d in dims)
    return () if ndim == 0 else axes


def _as_vector(fn, x, dim, op):
    """fn(x.reshape(1), 0) for a 0-d x (one element along its only dim), back to shape ()."""
    _dim(dim, 0, op)
    out = fn(x.reshape(1), 0)
    return tuple(t.reshape(()) for t in out) if isinstance(out, tuple) else out.reshape(())


def _check_broadcast(op, a, b):
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast together") from None


def unbroadcast(grad, shape):
    """Sum a broadcast gradient back down to `shape`: the adjoint of broadcasting.

    If x of shape (3, 1) was broadcast to (2, 3, 4), each x element was used
    2*4 times, so dL/dx sums dL/dy over the broadcast axes.
    """
    if grad.shape == shape:
        return grad
    shape = tuple(shape)
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1
    )
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def unbroadcast_to_inputs(fn, da, db):
    """The gradients of a binary op's inputs a and b, each summed back to its input's shape
    (None where not wanted)."""
    (a, b), (need_a, need_b) = fn.inputs, fn.needs_input_grad
    return (
        unbroadcast(da, a.shape) if need_a and da is not None else None,
        unbroadcast(db, b.shape) if need_b and db is not None else None,
    )


# ---- elementwise arithmetic (inputs broadcast: backward unbroadcasts) ----------------
class Add(Function):
    """y = a + b;  da = g,  db = g."""

    def forward(self, a, b):
        return a + b

    def backward(self, g):
        return unbroadcast_to_inputs(self, g, g)


class Sub(Function):
    """y = a - b;  da = g,  db = -g."""

    def forward(self, a, b):
        return a - b

    def backward(self, g):
        return unbroadcast_to_inputs(self, g, -g if self.needs_input_grad[1] else None)


class Mul(Function):
    """y = a * b;  da = g * b,  db = g * a."""

    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a * b

    def backward(self, g):
        a, b = self.saved
        return unbroadcast_to_inputs(
            self, g * b if self.needs_input_grad[0] else None, g * a if self.needs_input_grad[1] else None
        )


class Div(Function):
    """y = a / b;  da = g / b,  db = -g * a / b^2."""

    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a / b

    def backward(self, g):
        a, b = self.saved
        da = g / b if self.needs_input_grad[0] else None
        db = -g * a / (b * b) if self.needs_input_grad[1] else None
        return unbroadcast_to_inputs(self, da, db)


class Pow(Function):
    """y = a ** b;  da = g * b * a^(b-1),  db = g * y * log(a)."""

    def forward(self, a, b):
        y = a**b
        self.save_for_backward(a, b, y)
        return y

    def backward(self, g):
        a, b, y = self.saved
        xp = backend.array_module(g)
        da = g * b * a ** (b - 1) if self.needs_input_grad[0] else None
        db = None
        if self.needs_input_grad[1]:
            with np.errstate(divide="ignore", invalid="ignore"):
                db = g * y * xp.log(xp.where(a > 0, a, 1))
        return unbroadcast_to_inputs(self, da, db)


def _binary(cls, a, b):
    a, b = _promote(a, b)
    _check_broadcast(cls.__name__.lower(), a, b)
    return cls.apply(a, b)


def add(a, b):
    return _binary(Add, a, b)


def sub(a, b):
    return _binary(Sub, a, b)


def mul(a, b):
    return _binary(Mul, a, b)


def div(a, b):
    """True division; two integer operands give float32, as in PyTorch (NumPy: float64)."""
    a, b = _promote(a, b)
    if a.dtype.kind in "biu" and b.dtype.kind in "biu":
        a, b = _as_float(a, np.float32), _as_float(b, np.float32)
    return _binary(Div, a, b)


def pow(a, b):
    return _binary(Pow, a, b)


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, g):
        return -g


def neg(x):
    return Neg.apply(x)


# ---- elementwise functions -------------------------------------------------------
class Exp(Function):
    """y = e^x;  dx = g * y (saves the output: it *is* the derivative)."""

    def forward(self, x):
        y = backend.array_module(x).exp(x)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        return g * self.saved[0]


class Log(Function):
    """y = ln x;  dx = g / x."""

    def forward(self, x):
        self.save_for_backward(x)
        return backend.array_module(x).log(x)

    def backward(self, g):
        return g / self.saved[0]


class Sqrt(Function):
    """y = sqrt(x);  dx = g / (2 y)."""

    def forward(self, x):
        y = backend.array_module(x).sqrt(x)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        return g / (2 * self.saved[0])


class Abs(Function):
    """y = |x|;  dx = g * sign(x) (0 at x = 0, as in PyTorch)."""

    def forward(self, x):
        self.save_for_backward(x)
        return backend.array_module(x).abs(x)

    def backward(self, g):
        return g * backend.array_module(g).sign(self.saved[0])


class Tanh(Function):
    """y = tanh x;  dx = g * (1 - y^2)."""

    def forward(self, x):
        y = backend.array_module(x).tanh(x)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        y = self.saved[0]
        return g * (1 - y * y)


class Sigmoid(Function):
    """y = 1 / (1 + e^-x) (see kernels.reference.sigmoid: no overflow);  dx = g * y * (1 - y)."""

    def forward(self, x):
        y = kernels.reference.sigmoid(x)  # plain xp code: NumPy and CuPy arrays alike
        self.save_for_backward(y)
        return y

    def backward(self, g):
        y = self.saved[0]
        return g * y * (1 - y)


class Relu(Function):
    """y = max(x, 0);  dx = g where x > 0 (0 at the kink x = 0, as in PyTorch)."""

    def forward(self, x):
        y = backend.array_module(x).maximum(x, 0)  # not x * (x > 0): -inf * 0 is nan
        self.save_for_backward(y)
        return y

    def backward(self, g):
        return g * (self.saved[0] > 0)


def exp(x):
    return Exp.apply(x)


def log(x):
    return Log.apply(x)


def sqrt(x):
    return Sqrt.apply(x)


def abs(x):
    return Abs.apply(x)


def tanh(x):
    return Tanh.apply(x)


def sigmoid(x):
    return Sigmoid.apply(x)


def relu(x):
    return Relu.apply(x)


class Maximum(Function):
    """Elementwise max; on ties the gradient is split evenly, as in PyTorch."""

    def forward(self, a, b, take_larger):
        xp = backend.array_module(a)
        self.save_for_backward(a, b)
        self.take_larger = take_larger
        return xp.maximum(a, b) if take_larger else xp.minimum(a, b)

    def backward(self, g):
        a, b = self.saved
        a_wins = (a > b) if self.take_larger else (a < b)
        share_a = (a_wins + 0.5 * (a == b)).astype(g.dtype)  # 0.5 * bool would be float64
        da = g * share_a if self.needs_input_grad[0] else None
        db = g * (1 - share_a) if self.needs_input_grad[1] else None
        return unbroadcast_to_inputs(self, da, db)


def maximum(a, b):
    a, b = _promote(a, b)
    _check_broadcast("maximum", a, b)
    return Maximum.apply(a, b, take_larger=True)


def minimum(a, b):
    a, b = _promote(a, b)
    _check_broadcast("minimum", a, b)
    return Maximum.apply(a, b, take_larger=False)


class Clamp(Function):
    """y = min(max(x, lo), hi);  dx = g where lo <= x <= hi (both bounds included, as in PyTorch)."""

    def forward(self, x, lo, hi):
        xp = backend.array_module(x)
        self.save_for_backward(x)
        self.lo, self.hi = lo, hi
        return xp.clip(x, lo, hi)

    def backward(self, g):
        x = self.saved[0]
        inside = backend.array_module(x).ones(x.shape, dtype=bool)
        if self.lo is not None:
            inside &= x >= self.lo
        if self.hi is not None:
            inside &= x <= self.hi
        return g * inside


def clamp(x, min=None, max=None):
    """Limit x to [min, max] (either may be None). NumPy scalar bounds count as Python numbers,
    so a float32 tensor stays float32 (NumPy alone would promote with a float64 bound)."""
    if min is None and max is None:
        raise ValueError("clamp: at least one of min and max must be given")
    as_number = lambda b: b.item() if isinstance(b, (np.generic, np.ndarray)) and np.ndim(b) == 0 else b  # noqa: E731
    return Clamp.apply(x, lo=as_number(min), hi=as_number(max))


class Cast(Function):
    """Change dtype; the gradient is cast back to the input's dtype."""

    def forward(self, x, dtype):
        self.in_dtype = x.dtype
        return x.astype(dtype)

    def backward(self, g):
        return g.astype(self.in_dtype)


def cast(x, dtype):
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    if dtype.kind != "f":  # integer results carry no gradient
        return Tensor(x.data.astype(dtype))
    return Cast.apply(x, dtype=dtype)


class ToDevice(Function):
    def forward(self, x, device):
        self.source = backend.device_of(x)
        return backend.to_device(x, device)

    def backward(self, g):
        return backend.to_device(g, self.source)


def to_device(x, device):
    device = backend.normalize_device(device)
    if device == x.device:
        return x
    if x.requires_grad:
        return ToDevice.apply(x, device=device)
    return Tensor(backend.to_device(x.data, device))


def compare(a, b, how):
    """Elementwise comparison (no gradient): a bool tensor."""
    a, b = _promote(a, b)
    _check_broadcast(how, a, b)
    return Tensor(getattr(backend.array_module(a.data), how)(a.data, b.data))


# ---- reductions ------------------------------------------------------------------
class Sum(Function):
    """y = sum of x over `axes`;  dx = g broadcast back over those axes."""

    def forward(self, x, axes, keepdim):
        self.in_shape, self.axes, self.keepdim = x.shape, axes, keepdim
        return x.sum(axis=axes, keepdims=keepdim)

    def backward(self, g):
        xp = backend.array_module(g)
        if not self.keepdim and self.axes is not None:
            g = xp.expand_dims(g, self.axes)
        return xp.broadcast_to(g, self.in_shape)


def sum(x, dim=None, keepdim=False):
    return Sum.apply(x, axes=_dims(dim, x.ndim, "sum"), keepdim=keepdim)


def _count(x, dim):
    axes = _dims(dim, x.ndim, "mean")
    return x.size if axes is None else math.prod(x.shape[a] for a in axes)


def mean(x, dim=None, keepdim=False):
    """Sum divided by the number of elements reduced."""
    return sum(x, dim, keepdim) / _count(x, dim)


def var(x, dim=None, unbiased=True, keepdim=False, correction=None):
    """sum((x - mean)^2) / (n - correction); correction is 1 (unbiased) by default, as in PyTorch."""
    if correction is None:
        correction = 1 if unbiased else 0
    centered = x - mean(x, dim, keepdim=True)
    return sum(centered * centered, dim, keepdim) / builtins.max(_count(x, dim) - correction, 0)


class MaxAlong(Function):
    """Max (or min) along one axis: the gradient goes to the winning index, the first among ties (as in PyTorch)."""

    def forward(self, x, axis, keepdim, largest):
        xp = backend.array_module(x)
        idx = xp.expand_dims((xp.argmax if largest else xp.argmin)(x, axis=axis), axis)
        self.in_shape, self.axis, self.keepdim, self.idx = x.shape, axis, keepdim, idx
        y = xp.take_along_axis(x, idx, axis=axis)
        return y if keepdim else y.squeeze(axis)

    def backward(self, g):
        xp = backend.array_module(g)
        if not self.keepdim:
            g = xp.expand_dims(g, self.axis)
        dx = xp.zeros(self.in_shape, dtype=g.dtype)
        xp.put_along_axis(dx, self.idx, g, axis=self.axis)
        return dx


class MaxAll(Function):
    """Max (or min) of all elements: the gradient is shared evenly among ties, as in PyTorch."""

    def forward(self, x, largest):
        y = x.max() if largest else x.min()
        self.save_for_backward(x, y)
        return y

    def backward(self, g):
        x, y = self.saved
        winners = (x == y).astype(g.dtype)  # a float count: g / int64 would be float64
        return g * winners / winners.sum()


def _extreme(x, dim, keepdim, largest):
    name = "max" if largest else "min"
    if x.size == 0:
        raise ValueError(f"{name}: empty tensor of shape {x.shape}")
    if dim is None:
        return MaxAll.apply(x, largest=largest)
    if x.ndim == 0:
        return _as_vector(lambda v, d: _extreme(v, d, False, largest), x, dim, name)
    axis = _dim(dim, x.ndim, name)
    values = MaxAlong.apply(x, axis=axis, keepdim=keepdim, largest=largest)
    return values, argmax(x, dim, keepdim) if largest else argmin(x, dim, keepdim)


def max(x, dim=None, keepdim=False):
    """max(x) -> the largest value; max(x, dim) -> (values, indices), as in PyTorch."""
    return _extreme(x, dim, keepdim, largest=True)


def min(x, dim=None, keepdim=False):
    return _extreme(x, dim, keepdim, largest=False)


def _arg(x, dim, keepdim, largest):
    xp = backend.array_module(x.data)
    fn = xp.argmax if largest else xp.argmin
    if dim is None:
        return Tensor(xp.asarray(fn(x.data), dtype=np.int64))
    axis = _dim(dim, x.ndim, "argmax")
    idx = fn(x.data, axis=axis).astype(np.int64)
    return Tensor(xp.expand_dims(idx, axis) if keepdim else idx)


def argmax(x, dim=None, keepdim=False):
    """Index of the largest value, the first among ties (no gradient); over the flattened tensor when dim is None."""
    return _arg(x, dim, keepdim, largest=True)


def argmin(x, dim=None, keepdim=False):
    return _arg(x, dim, keepdim, largest=False)


# ---- movement ---------------------------------------------------------------------
class Reshape(Function):
    def forward(self, x, shape):
        self.in_shape = x.shape
        return x.reshape(shape)

    def backward(self, g):
        return g.reshape(self.in_shape)


def _shape_args(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(shape)


def reshape(x, *shape):
    shape = _shape_args(shape)
    known = math.prod(s for s in shape if s != -1)
    if shape.count(-1) > 1 or (-1 in shape and (known == 0 or x.size % known)) or (
        -1 not in shape and known != x.size
    ):
        raise ValueError(f"reshape: cannot reshape a tensor of shape {x.shape} ({x.size} elements) to {shape}")
    return Reshape.apply(x, shape=shape)


view = reshape


class Permute(Function):
    def forward(self, x, dims):
        self.dims = dims
        return x.transpose(dims)

    def backward(self, g):
        return g.transpose(np.argsort(self.dims))


def permute(x, *dims):
    dims = tuple(_dim(d, x.ndim, "permute") for d in _shape_args(dims))
    if sorted(dims) != list(range(x.ndim)):
        raise ValueError(f"permute: dims {dims} are not a permutation of the {x.ndim} dims of shape {x.shape}")
    return Permute.apply(x, dims=dims)


def transpose(x, dim0, dim1):
    dims = list(range(x.ndim))
    a, b = _dim(dim0, x.ndim, "transpose"), _dim(dim1, x.ndim, "transpose")
    dims[a], dims[b] = dims[b], dims[a]
    return permute(x, *dims)


def flatten(x, start_dim=0, end_dim=-1):
    if x.ndim == 0:
        return reshape(x, 1)
    s, e = _dim(start_dim, x.ndim, "flatten"), _dim(end_dim, x.ndim, "flatten")
    return reshape(x, *x.shape[:s], math.prod(x.shape[s : e + 1]), *x.shape[e + 1 :])


def unsqueeze(x, dim):
    d = _dim(dim, x.ndim + 1, "unsqueeze")
    return reshape(x, *x.shape[:d], 1, *x.shape[d:])


def squeeze(x, dim=None):
    if dim is None:
        return reshape(x, *(s for s in x.shape if s != 1))
    dims = _dims(dim, x.ndim, "squeeze")
    return reshape(x, *(s for i, s in enumerate(x.shape) if not (i in dims and s == 1)))


class Expand(Function):
    def forward(self, x, shape):
        return backend.array_module(x).broadcast_to(x, shape)

    def backward(self, g):
        return unbroadcast(g, self.inputs[0].shape)


def expand(x, *sizes):
    sizes = _shape_args(sizes)
    lead = len(sizes) - x.ndim
    if lead < 0:
        raise ValueError(f"expand: cannot expand shape {x.shape} to fewer dims {sizes}")
    shape = tuple(x.shape[i - lead] if s == -1 else s for i, s in enumerate(sizes))
    try:
        np.broadcast_shapes(x.shape, shape)
        if np.broadcast_shapes(x.shape, shape) != shape:
            raise ValueError
    except ValueError:
        raise ValueError(f"expand: cannot expand shape {x.shape} to {sizes}") from None
    return Expand.apply(x, shape=shape)


def broadcast_to(x, shape):
    return expand(x, *shape)


class GetItem(Function):
    """y = x[index];  dx = zeros with g added at the indexed places.

    Integer-array indices may repeat an element: `add.at` then adds every
    contribution, where plain assignment would keep only the last.
    """

    def forward(self, x, index):
        self.in_shape, self.index = x.shape, index
        return x[index]

    def backward(self, g):
        xp = backend.array_module(g)
        dx = xp.zeros(self.in_shape, dtype=g.dtype)
        if xp is np and isinstance(self.index, np.ndarray) and self.index.dtype.kind in "iu":
            _add_rows(dx, self.index, g)
        elif _has_array(self.index):
            xp.add.at(dx, self.index, g)
        else:
            dx[self.index] = g
        return dx


def _add_rows(dx, ids, g):
    """dx[ids[i]] += g[i] for every i (an embedding's gradient): the ids sorted, each run of one id summed
    by add.reduceat, written once. NumPy's add.at took 3-4x as long for 4,096 ids of 64 features."""
    if ids.size == 0:
        return
    rows = g.reshape(ids.size, -1)
    ids = ids.reshape(-1) % dx.shape[0]  # negative ids count from the end
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    dx.reshape(dx.shape[0], -1)[ids[starts]] = np.add.reduceat(rows[order], starts, axis=0)


def _has_array(index):
    parts = index if isinstance(index, tuple) else (index,)
    return any(not isinstance(p, (int, np.integer, slice, type(None), type(Ellipsis))) for p in parts)


def getitem(x, index):
    index = raw_index(index)
    if isinstance(index, list):
        index = backend.array_module(x.data).asarray(index)
    try:
        return GetItem.apply(x, index=index)
    except IndexError as e:
        raise IndexError(f"getitem: index {index!r} is invalid for shape {x.shape}: {e}") from None


class Cat(Function):
    def forward(self, *arrays, axis):
        self.axis = axis
        self.bounds = np.cumsum([a.shape[axis] for a in arrays])[:-1]
        return backend.array_module(arrays[0]).concatenate(arrays, axis=axis)

    def backward(self, g):
        return tuple(backend.array_module(g).split(g, self.bounds, axis=self.axis))


def cat(tensors, dim=0):
    """Join tensors along an existing dim."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: expected a non-empty list of tensors")
    if tensors[0].ndim == 0:
        raise ValueError("cat: zero-dimensional tensors (shape ()) cannot be joined; use stack")
    axis = _dim(dim, tensors[0].ndim, "cat")
    first = tensors[0].shape
    for t in tensors:
        if t.ndim != len(first) or t.shape[:axis] + t.shape[axis + 1 :] != first[:axis] + first[axis + 1 :]:
            shapes = [t.shape for t in tensors]
            raise ValueError(f"cat: shapes {shapes} differ outside dim {dim}")
    return Cat.apply(*tensors, axis=axis)


concatenate = cat


def stack(tensors, dim=0):
    """Join tensors along a new dim."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack: expected a non-empty list of tensors")
    if len({t.shape for t in tensors}) > 1:
        raise ValueError(f"stack: all tensors must have one shape, got {[t.shape for t in tensors]}")
    d = _dim(dim, tensors[0].ndim + 1, "stack")
    return cat([unsqueeze(t, d) for t in tensors], d)


def split(x, split_size_or_sections, dim=0):
    """Split into pieces of `split_size` (the last may be smaller) or of the listed sizes."""
    axis = _dim(dim, x.ndim, "split")
    n = x.shape[axis]
    if isinstance(split_size_or_sections, int):
        step = split_size_or_sections
        sizes = [builtins.min(step, n - i) for i in range(0, n, step)]
    else:
        sizes = list(split_size_or_sections)
        if builtins.sum(sizes) != n:
            raise ValueError(f"split: sections {sizes} do not add up to {n} (dim {dim} of shape {x.shape})")
    pieces, start = [], 0
    for size in sizes:
        index = (slice(None),) * axis + (slice(start, start + size),)
        pieces.append(getitem(x, index))
        start += size
    return tuple(pieces)


def chunk(x, chunks, dim=0):
    """Split into `chunks` pieces of equal size (the last may be smaller), as in PyTorch."""
    n = x.shape[_dim(dim, x.ndim, "chunk")]
    return split(x, builtins.max(1, -(-n // chunks)), dim)


class Where(Function):
    """y = a where cond else b;  da = g * cond,  db = g * (not cond)."""

    def forward(self, a, b, cond):
        self.cond = cond
        return backend.array_module(a).where(cond, a, b)

    def backward(self, g):
        da = g * self.cond if self.needs_input_grad[0] else None
        db = g * ~self.cond if self.needs_input_grad[1] else None
        return unbroadcast_to_inputs(self, da, db)


def where(condition, a, b):
    cond = condition.data if isinstance(condition, Tensor) else condition
    a, b = _promote(a, b)
    xp = backend.array_module(a.data)
    cond = xp.asarray(cond).astype(bool)
    try:
        np.broadcast_shapes(cond.shape, a.shape, b.shape)
    except ValueError:
        raise ValueError(f"where: shapes {cond.shape}, {a.shape}, {b.shape} cannot be broadcast") from None
    return Where.apply(a, b, cond=cond)


class Pad(Function):
    def forward(self, x, widths, value):
        self.slices = tuple(slice(lo, lo + n) for (lo, _), n in zip(widths, x.shape))
        return backend.array_module(x).pad(x, widths, constant_values=value)

    def backward(self, g):
        return g[self.slices]


def pad(x, pad, value=0.0):
    """Constant padding with PyTorch's convention: `pad` lists (before, after) pairs
    starting from the LAST dim, e.g. (1, 1, 2, 2) pads W by 1 and H by 2."""
    if len(pad) % 2 or len(pad) // 2 > x.ndim:
        raise ValueError(f"pad: padding {pad} must be (before, after) pairs for at most {x.ndim} dims")
    if builtins.min(pad, default=0) < 0:
        raise ValueError(f"pad: negative padding {pad} is not supported")
    pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)]
    widths = [(0, 0)] * (x.ndim - len(pairs)) + pairs[::-1]
    return Pad.apply(x, widths=tuple(widths), value=value)


# ---- matrix product ----------------------------------------------------------------
class MatMul(Function):
    """Batched y = a @ b (at least 2-D);  da = g @ b^T,  db = a^T @ g."""

    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a @ b

    def backward(self, g):
        a, b = self.saved
        da = g @ b.swapaxes(-1, -2) if self.needs_input_grad[0] else None
        db = a.swapaxes(-1, -2) @ g if self.needs_input_grad[1] else None
        return unbroadcast_to_inputs(self, da, db)  # batch dims may have been broadcast


def matmul(a, b):
    """Matrix product with NumPy/PyTorch semantics: batch dims broadcast; a 1-D
    operand is treated as a row (left) or column (right) vector and dropped after."""
    a, b = _promote(a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: both operands need at least 1 dim, got {a.shape} and {b.shape}")
    if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align (inner sizes differ)")
    a2 = unsqueeze(a, 0) if a.ndim == 1 else a
    b2 = unsqueeze(b, -1) if b.ndim == 1 else b
    try:
        np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch dims of {a.shape} and {b.shape} cannot be broadcast") from None
    y = MatMul.apply(a2, b2)
    if b.ndim == 1:
        y = squeeze(y, -1)
    if a.ndim == 1:
        y = squeeze(y, -2 if b.ndim > 1 else -1)
    return y


# ---- softmax ---------------------------------------------------------------------------
class Softmax(Function):
    """y_i = e^(x_i - max x) / sum_j e^(x_j - max x);  dx = y * (g - sum(g * y)).

    Subtracting the max keeps every exponent <= 0, so logits of 1e4 do not overflow.
    """

    kernel_dtypes = KERNEL_DTYPES

    def forward(self, x, axis):
        self.axis = axis
        y = kernels.for_array(x).softmax(x, axis)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        return kernels.for_array(g).softmax_backward(g, self.saved[0], self.axis)


class LogSoftmax(Function):
    """y = x - max x - log(sum e^(x - max x));  dx = g - softmax(x) * sum(g)."""

    kernel_dtypes = KERNEL_DTYPES

    def forward(self, x, axis):
        self.axis = axis
        y = kernels.for_array(x).log_softmax(x, axis)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        return kernels.for_array(g).log_softmax_backward(g, self.saved[0], self.axis)


def softmax(x, dim):
    if x.ndim == 0:
        return _as_vector(softmax, x, dim, "softmax")
    return Softmax.apply(x, axis=_dim(dim, x.ndim, "softmax"))


def log_softmax(x, dim):
    if x.ndim == 0:
        return _as_vector(log_softmax, x, dim, "log_softmax")
    return LogSoftmax.apply(x, axis=_dim(dim, x.ndim, "log_softmax"))


__all__ = [
    "add", "sub", "mul", "div", "pow", "neg", "exp", "log", "sqrt", "abs", "tanh", "sigmoid", "relu",
    "maximum", "minimum", "clamp", "cast", "to_device", "compare", "sum", "mean", "var", "max", "min",
    "argmax", "argmin", "reshape", "view", "permute", "transpose", "flatten", "unsqueeze", "squeeze",
    "expand", "broadcast_to", "getitem", "cat", "concatenate", "stack", "split", "chunk", "where", "pad",
    "matmul", "softmax", "log_softmax", "is_grad_enabled",
]  # fmt: skip
