"""Tensor, Function and reverse-mode automatic differentiation.

A Tensor wraps an array (NumPy on the CPU, CuPy on a GPU). Every operation on
Tensors is a Function: `forward` computes the result from raw arrays, and
`backward` turns the gradient of the loss with respect to the result, dL/dy,
into the gradients with respect to the inputs, dL/dx_i (a vector-Jacobian
product). Applying a Function records it on its output, so the outputs form a
graph pointing back to the inputs.

`loss.backward()` walks that graph from the loss back to the leaves in reverse
topological order (found iteratively, so a graph 10,000 ops deep is fine),
adding up gradients where a tensor was used more than once (chain rule:
dL/dx = sum over uses of dL/dy_k * dy_k/dx).

Version counters (as in PyTorch): every in-place change of a tensor (x[i] = v,
zero_(), x += y outside a graph, an optimizer step, load_state_dict) adds one
to its `_version`; tensors sharing memory (detach(), views such as reshape)
share the counter. A Function notes the versions of the tensors whose arrays
it saved for backward, and backward raises, naming the op, when one changed
since: the gradient would silently use the new values.
"""

import contextlib

import numpy as np

from . import backend

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Inside this block, operations record no graph (inference, optimizer steps)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


@contextlib.contextmanager
def enable_grad():
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, True
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


class Function:
    """One differentiable operation.

    Subclasses implement `forward(*arrays, **options) -> array` and
    `backward(grad) -> gradient array per tensor input (or None)`.
    `self.needs_input_grad[i]` tells backward which gradients are wanted, so it
    can skip the rest. Each gradient has its input's shape: an op that
    broadcasts its inputs sums the gradient back with `ops.unbroadcast`.
    """

    kernel_dtypes = None  # ops whose kernels run only in some dtypes list them (checked in apply)

    def __init__(self, *inputs):
        self.inputs = inputs
        self.needs_input_grad = tuple(t.requires_grad for t in inputs)
        self.saved = ()
        self.freed = False

    def save_for_backward(self, *arrays):
        self.saved = arrays

    def forward(self, *arrays, **options):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    @property
    def name(self):
        return _op_name(type(self))

    @classmethod
    def apply(cls, *inputs, **options):
        """Run the op on Tensor inputs (non-Tensor options go by keyword) and record it."""
        if len(inputs) > 1:  # (one input is on one device)
            check_same_device(_op_name(cls), inputs)
        if cls.kernel_dtypes is not None:
            _check_kernel_dtypes(cls, inputs)
        fn = cls(*inputs)
        out = Tensor(fn.forward(*(t.data for t in inputs), **options))
        if _grad_enabled and any(fn.needs_input_grad):
            out.requires_grad = True
            out._ctx = fn
            fn.inputs = tuple(_graph_input(t) for t in inputs)
        if inputs and getattr(out.data, "base", None) is not None:
            _share_version_with_viewed_input(out, inputs)
        if out._ctx is not None and fn.saved:
            fn.saved_versions = _versions_of_saved(fn.saved, inputs, out)
        return out


class _GraphInput:
    """What the graph keeps of an input that is not a leaf requiring grad: the op that made it
    (None for a constant), its shape and dtype; never its values.

    An op's backward reads only what its forward saved, so an intermediate result that no op
    saved (a convolution's output, once the ReLU after it has run) is freed as soon as the
    model's code lets go of it, as in PyTorch, instead of living until backward: measured on
    the classifier of examples/mnist_digits.py at batch 128, a training step's peak memory
    went from 54 to 33 MiB, the UNet's from 267 to 189 MiB (benchmarks/bench_models.py). Leaves that
    require grad stay themselves: their .grad is set."""

    __slots__ = ("_ctx", "requires_grad", "shape", "dtype")

    def __init__(self, t):
        self._ctx, self.requires_grad, self.shape, self.dtype = t._ctx, t.requires_grad, t.shape, t.dtype


def _graph_input(t):
    return t if t._ctx is None and t.requires_grad else _GraphInput(t)


def _node_key(node):
    """One key per tensor of the graph: its op (the same for every _GraphInput of it), or the leaf itself."""
    return id(node._ctx) if node._ctx is not None else id(node)


def _op_name(cls):
    """The op's name in error messages: Conv2dFunction says Conv2d (its Module's and the lesson's name)."""
    return cls.__name__.removesuffix("Function")


def _versions_of_saved(saved, inputs, out):
    """(version counter, version now, which tensor: input i or output (-1), its shape) for each input
    or output whose memory an array saved for backward views: backward checks the counters did not
    move. (Most saved arrays are an input's own array: found without following .base.)"""
    tensors = (*inputs, out)
    watched = []
    for array in saved:
        found = next((i for i, t in enumerate(tensors) if t.data is array), None)
        if found is None:
            owner = _memory_owner(array)
            found = next((i for i, t in enumerate(tensors) if _memory_owner(t.data) is owner), None)
        if found is not None:
            t = tensors[found]
            watched.append((t._version, t._version[0], found if found < len(inputs) else -1, t.shape))
    return tuple(watched)


def _share_version_with_viewed_input(out, inputs):
    """A view (reshape, transpose, basic indexing) changes with the tensor it views: one counter for both."""
    owner = _memory_owner(out.data)
    for t in inputs:
        if owner is _memory_owner(t.data):
            out._version = t._version
            return


def _check_saved_versions(fn):
    """Raise if a tensor `fn` saved for backward was changed in place after it was saved."""
    for counter, version, index, shape in getattr(fn, "saved_versions", ()):
        if counter[0] != version:
            which = "output" if index < 0 else f"input {index}"
            raise RuntimeError(
                f"backward: {fn.name} saved its {which} of shape {shape} for its backward, and it was changed in "
                f"place since (version {version} then, {counter[0]} now: x[...] = v, zero_(), x += y, an optimizer "
                f"step or load_state_dict). Its gradient would be wrong; change a copy instead, or run backward first."
            )


KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # what the Numba and CuPy kernels are built for


def _check_kernel_dtypes(cls, inputs):
    if any(t.dtype not in cls.kernel_dtypes for t in inputs):
        described = ", ".join(f"{t.dtype} {tuple(t.shape)}" for t in inputs)
        raise TypeError(
            f"{_op_name(cls)}: its kernels run in {' or '.join(map(str, cls.kernel_dtypes))}, got {described}; "
            f"convert first, e.g. x.float()"
        )


def check_same_device(op_name, tensors):
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        described = ", ".join(f"{tuple(t.shape)} on {t.device}" for t in tensors)
        raise RuntimeError(f"{op_name}: all inputs must be on one device, got {described}")


def _as_array(data, dtype, device):
    """Turn data into an array on `device`.

    Arrays keep their dtype; Python floats and lists of them become float32
    and Python ints int64, as in PyTorch.
    """
    xp = backend.xp_for_device(device)
    if isinstance(data, Tensor):
        data = data.data
    keep_dtype = isinstance(data, (np.ndarray, np.generic)) or backend.is_cupy_array(data)
    if backend.is_cupy_array(data) and xp is np:
        data = data.get()
    arr = xp.asarray(data)
    if dtype is not None:
        return arr.astype(np.dtype(dtype), copy=False)
    if not keep_dtype and arr.dtype == np.float64:
        return arr.astype(np.float32)
    return arr


def _memory_owner(a):
    """The array (or buffer) whose memory `a` views: follow .base to its end."""
    while getattr(a, "base", None) is not None:
        a = a.base
    return a


def _upstream_grad(out, grad):
    """The gradient backward starts from: dL/d(out), checked (1 for a one-element out by default)."""
    if not out.requires_grad:
        raise RuntimeError(
            f"backward: tensor of shape {out.shape} does not require grad "
            "(no input of its graph has requires_grad=True, or it was built under no_grad)"
        )
    xp = backend.array_module(out.data)
    if grad is None:
        if out.size != 1:
            raise RuntimeError(
                f"backward: grad can be implicit only for a one-element output, "
                f"this one has shape {out.shape}; pass grad= of that shape"
            )
        grad = xp.ones(out.shape, dtype=out.dtype)
    else:
        grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=out.dtype)
        if tuple(grad.shape) != out.shape:
            raise ValueError(f"backward: grad of shape {tuple(grad.shape)} does not match output {out.shape}")
    return grad


def _check_grad_shape(fn, i, parent, pg):
    """Raise unless the gradient `fn` returned for input i has that input's shape."""
    if pg.shape != parent.shape:
        raise RuntimeError(
            f"backward: {fn.name} returned a gradient of shape {tuple(pg.shape)} for its input {i} of shape "
            f"{parent.shape}; a backward returns each gradient in its input's shape (ops.unbroadcast)"
        )


def _check_can_go_back(fn, node):
    """Raise if `fn`'s saved arrays are gone (freed by an earlier backward) or changed in place since."""
    if fn.freed:
        raise RuntimeError(
            f"backward: the graph through {fn.name} (output shape {node.shape}) was already freed "
            "by an earlier backward(); pass retain_graph=True to the first call to go through it twice"
        )
    _check_saved_versions(fn)


def _free(fn):
    """Drop what `fn` saved for backward and its links to its inputs, so that memory is released as
    backward goes (a training step's peak memory), unless retain_graph=True asked to keep it."""
    fn.saved, fn.inputs, fn.freed = (), (), True


def _leaf_grad(g, dtype, given):
    """The array to store as a leaf's new .grad: g itself when no one else can see its memory, else a copy.

    `given` holds the ids of memory owners that others already see: the caller's upstream
    gradient and every array stored as a .grad so far. Copy when g's memory is one of them
    (add's backward hands the same g to both inputs; reshape's backward a view of the
    caller's array), and when g is a broadcast (zero strides, or a read-only view). Backward
    functions never write into arrays they are given, so a fresh array, or a view of one,
    can become a .grad as it is: no pass over a big gradient just to copy it.
    """
    owner = _memory_owner(g)
    shared = id(owner) in given or not getattr(g.flags, "writeable", True) or (g.size > 1 and 0 in g.strides)
    if shared or g.dtype != dtype:
        return g.astype(dtype)
    given.add(id(owner))
    return g


class Tensor:
    """An n-dimensional array that remembers how it was computed."""

    __array_priority__ = 1000  # so ndarray + Tensor calls Tensor.__radd__

    def __init__(self, data, requires_grad=False):
        # NumPy reductions return scalars (np.float64), not 0-d arrays: keep arrays throughout.
        self.data = np.asarray(data) if isinstance(data, np.generic) else data
        self.grad = None
        self._ctx = None  # the Function that produced this tensor, None for leaves
        self._version = [0]  # in-place changes so far, in a list so views and detach() can share it
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    # ---- basic properties -------------------------------------------------
    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        """Number of elements (an attribute, as NumPy has it; `numel()` is PyTorch's)."""
        return int(self.data.size)

    def numel(self):
        return int(self.data.size)

    def dim(self):
        return self.data.ndim

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    @property
    def device(self):
        return backend.device_of(self.data)

    @property
    def is_leaf(self):
        return self._ctx is None

    def requires_grad_(self, flag=True):
        if flag and self.dtype.kind != "f":
            raise RuntimeError(
                f"only floating-point tensors can require gradients, got dtype {self.dtype} "
                f"for a tensor of shape {self.shape}"
            )
        self.requires_grad = flag
        return self

    # ---- conversion ----------------------------------------------------------
    def numpy(self):
        """The values as a NumPy array (copied from the GPU if needed)."""
        return self.data.get() if backend.is_cupy_array(self.data) else self.data

    def item(self):
        if self.size != 1:
            raise ValueError(f"item(): tensor of shape {self.shape} has {self.size} elements, not 1")
        return self.numpy().reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self):
        """The same values (the same memory, so the same version counter), cut off from the graph."""
        out = Tensor(self.data)
        out._version = self._version
        return out

    def bump_version_(self):
        """Record an in-place change of the data (code that writes `.data` directly calls this)."""
        self._version[0] += 1
        return self

    def to(self, target):
        """`to("cuda")`, `to("cpu")` or `to(dtype)`: differentiable, like every op."""
        if isinstance(target, str) and not _looks_like_dtype(target):
            return ops.to_device(self, target)
        return ops.cast(self, target)

    def cpu(self):
        return self.to("cpu")

    def cuda(self):
        return self.to("cuda")

    def float(self):
        return ops.cast(self, np.float32)

    def double(self):
        return ops.cast(self, np.float64)

    def long(self):
        return ops.cast(self, np.int64)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = ", device='cuda'" if self.device == "cuda" else ""
        body = np.array2string(self.numpy(), separator=", ", threshold=50, precision=4)
        return f"tensor({body}, dtype={self.dtype}{dev}{grad})"

    def __bool__(self):
        if self.size != 1:
            raise RuntimeError(f"the truth value of a tensor of shape {self.shape} is ambiguous")
        return bool(self.item())

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    __hash__ = object.__hash__

    # ---- autograd ---------------------------------------------------------------
    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) * grad into `.grad` of every leaf that requires it.

        `grad` defaults to 1 for a one-element tensor; any other output needs an
        explicit upstream gradient of its own shape. The graph is freed
        afterwards unless `retain_graph=True`.

        The loop is the chain rule (as micrograd's): visit the nodes outputs first; each
        op turns dL/d(output) into dL/d(input) for every input (its backward, a
        vector-Jacobian product); a tensor used several times sums those contributions.
        """
        grad = _upstream_grad(self, grad)
        grads = {_node_key(self): grad}  # dL/d(node) summed so far, for nodes not yet reached
        given = {id(_memory_owner(grad))}  # memory the caller or a leaf's .grad already holds
        for node in _topological_order(self):  # outputs before inputs
            g = grads.pop(_node_key(node), None)
            if g is None:
                continue
            fn = node._ctx
            if fn is None:  # a leaf: add dL/d(leaf) to its .grad
                node.grad = Tensor(_leaf_grad(g, node.dtype, given) if node.grad is None else node.grad.data + g)
                continue
            _check_can_go_back(fn, node)
            in_grads = fn.backward(g)  # vector-Jacobian products: dL/d(input) for each input
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            for i, (parent, pg, needed) in enumerate(zip(fn.inputs, in_grads, fn.needs_input_grad)):
                if needed and pg is not None:  # chain rule: a tensor used several times sums its uses
                    _check_grad_shape(fn, i, parent, pg)
                    key = _node_key(parent)
                    grads[key] = grads[key] + pg if key in grads else pg
            if not retain_graph:
                _free(fn)

    # ---- operators (each calls one function of tinysd.ops) ------------------
    def __add__(self, other):
        return ops.add(self, other)

    def __radd__(self, other):
        return ops.add(other, self)

    def __sub__(self, other):
        return ops.sub(self, other)

    def __rsub__(self, other):
        return ops.sub(other, self)

    def __mul__(self, other):
        return ops.mul(self, other)

    def __rmul__(self, other):
        return ops.mul(other, self)

    def __truediv__(self, other):
        return ops.div(self, other)

    def __rtruediv__(self, other):
        return ops.div(other, self)

    def __pow__(self, other):
        return ops.pow(self, other)

    def __rpow__(self, other):
        return ops.pow(other, self)

    def __matmul__(self, other):
        return ops.matmul(self, other)

    def __rmatmul__(self, other):
        return ops.matmul(other, self)

    def __neg__(self):
        return ops.neg(self)

    def __getitem__(self, index):
        return ops.getitem(self, index)

    def __setitem__(self, index, value):
        if self.requires_grad and _grad_enabled:
            raise RuntimeError("in-place assignment to a tensor that requires grad; wrap it in no_grad()")
        self.data[raw_index(index)] = value.data if isinstance(value, Tensor) else value
        self._version[0] += 1

    # x += y: in place when no graph is being recorded through x (under no_grad, or when neither
    # side requires grad), as PyTorch does; otherwise out of place (x names a new tensor).
    def __iadd__(self, other):
        return self._in_place("+=", ops.add, other)

    def __isub__(self, other):
        return self._in_place("-=", ops.sub, other)

    def __imul__(self, other):
        return self._in_place("*=", ops.mul, other)

    def __itruediv__(self, other):
        return self._in_place("/=", ops.div, other)

    def _in_place(self, symbol, op, other):
        records = _grad_enabled and (self.requires_grad or getattr(other, "requires_grad", False))
        if records:
            if self.is_leaf and self.requires_grad:
                raise RuntimeError(f"x {symbol} y: x is a leaf tensor that requires grad (a parameter); "
                                   f"change it in place only inside no_grad()")
            return op(self, other)
        result = op(self, other).data  # the same op, so the same broadcasting and dtype rules
        if result.shape != self.shape or result.dtype != self.dtype:
            raise RuntimeError(
                f"x {symbol} y: the result has shape {tuple(result.shape)} and dtype {result.dtype}, "
                f"x has {self.shape} and {self.dtype}; in place, the result must keep x's"
            )
        self.data[...] = result
        self._version[0] += 1
        return self

    def __lt__(self, other):
        return ops.compare(self, other, "less")

    def __le__(self, other):
        return ops.compare(self, other, "less_equal")

    def __gt__(self, other):
        return ops.compare(self, other, "greater")

    def __ge__(self, other):
        return ops.compare(self, other, "greater_equal")

    def __eq__(self, other):
        return ops.compare(self, other, "equal")

    def __ne__(self, other):
        return ops.compare(self, other, "not_equal")

    # ---- methods with PyTorch's names ----------------------------------------
    def add(self, other):
        return ops.add(self, other)

    def sub(self, other):
        return ops.sub(self, other)

    def mul(self, other):
        return ops.mul(self, other)

    def div(self, other):
        return ops.div(self, other)

    def matmul(self, other):
        return ops.matmul(self, other)

    def neg(self):
        return ops.neg(self)

    def exp(self):
        return ops.exp(self)

    def log(self):
        return ops.log(self)

    def sqrt(self):
        return ops.sqrt(self)

    def rsqrt(self):
        return ops.pow(self, -0.5)

    def abs(self):
        return ops.abs(self)

    def tanh(self):
        return ops.tanh(self)

    def sigmoid(self):
        return ops.sigmoid(self)

    def relu(self):
        return ops.relu(self)

    def maximum(self, other):
        return ops.maximum(self, other)

    def minimum(self, other):
        return ops.minimum(self, other)

    def clamp(self, min=None, max=None):
        return ops.clamp(self, min, max)

    clip = clamp

    def sum(self, dim=None, keepdim=False):
        return ops.sum(self, dim, keepdim)

    def mean(self, dim=None, keepdim=False):
        return ops.mean(self, dim, keepdim)

    def var(self, dim=None, unbiased=True, keepdim=False, correction=None):
        return ops.var(self, dim, unbiased, keepdim, correction)

    def std(self, dim=None, unbiased=True, keepdim=False, correction=None):
        return ops.sqrt(ops.var(self, dim, unbiased, keepdim, correction))

    def max(self, dim=None, keepdim=False):
        return ops.max(self, dim, keepdim)

    def min(self, dim=None, keepdim=False):
        return ops.min(self, dim, keepdim)

    def argmax(self, dim=None, keepdim=False):
        return ops.argmax(self, dim, keepdim)

    def argmin(self, dim=None, keepdim=False):
        return ops.argmin(self, dim, keepdim)

    def reshape(self, *shape):
        return ops.reshape(self, *shape)

    def view(self, *shape):
        return ops.reshape(self, *shape)

    def transpose(self, dim0, dim1):
        return ops.transpose(self, dim0, dim1)

    @property
    def T(self):
        return ops.permute(self, *reversed(range(self.ndim)))

    def permute(self, *dims):
        return ops.permute(self, *dims)

    def flatten(self, start_dim=0, end_dim=-1):
        return ops.flatten(self, start_dim, end_dim)

    def unsqueeze(self, dim):
        return ops.unsqueeze(self, dim)

    def squeeze(self, dim=None):
        return ops.squeeze(self, dim)

    def expand(self, *sizes):
        return ops.expand(self, *sizes)

    def expand_as(self, other):
        return ops.expand(self, *other.shape)

    def chunk(self, chunks, dim=0):
        return ops.chunk(self, chunks, dim)

    def split(self, split_size_or_sections, dim=0):
        return ops.split(self, split_size_or_sections, dim)

    def softmax(self, dim):
        return ops.softmax(self, dim)

    def log_softmax(self, dim):
        return ops.log_softmax(self, dim)

    def contiguous(self):
        return self

    def zero_(self):
        self.data[...] = 0
        self._version[0] += 1
        return self


def _looks_like_dtype(name):
    try:
        np.dtype(name)
        return True
    except TypeError:
        return False


def raw_index(index):
    """Replace Tensors inside an index by their arrays."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index


def _topological_order(root):
    """Nodes that lead to `root` and need gradients, outputs before inputs.

    Iterative depth-first search (post-order, then reversed): a recursive one
    would overflow Python's stack on deep graphs.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
            continue
        if _node_key(node) in visited:
            continue
        visited.add(_node_key(node))
        stack.append((node, True))
        if node._ctx is not None:
            for parent in node._ctx.inputs:
                if parent.requires_grad and _node_key(parent) not in visited:
                    stack.append((parent, False))
    order.reverse()
    return order


# ---- creation ------------------------------------------------------------------
def tensor(data, dtype=None, requires_grad=False, device="cpu"):
    """A new leaf tensor from a Python scalar, a list, or an array.

    Python floats default to float32 (as in PyTorch); NumPy arrays keep their dtype.
    """
    return Tensor(_as_array(data, dtype, device), requires_grad=requires_grad)


def _make(fill, shape, dtype, requires_grad, device):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    xp = backend.xp_for_device(device)
    data = fill(xp, tuple(int(s) for s in shape), np.dtype(dtype or np.float32))
    return Tensor(data, requires_grad=requires_grad)


def zeros(*shape, dtype=None, requires_grad=False, device="cpu"):
    return _make(lambda xp, s, d: xp.zeros(s, d), shape, dtype, requires_grad, device)


def ones(*shape, dtype=None, requires_grad=False, device="cpu"):
    return _make(lambda xp, s, d: xp.ones(s, d), shape, dtype, requires_grad, device)


def full(shape, fill_value, dtype=None, requires_grad=False, device="cpu"):
    return _make(lambda xp, s, d: xp.full(s, fill_value, d), (shape,), dtype, requires_grad, device)


def randn(*shape, dtype=None, requires_grad=False, device="cpu", generator=None):
    """Standard normal samples; `generator` is a numpy.random.Generator (default: the global one)."""
    rng = generator or default_generator()
    return _make(
        lambda xp, s, d: xp.asarray(rng.standard_normal(s).astype(d)), shape, dtype, requires_grad, device
    )


def rand(*shape, dtype=None, requires_grad=False, device="cpu", generator=None):
    rng = generator or default_generator()
    return _make(lambda xp, s, d: xp.asarray(rng.random(s).astype(d)), shape, dtype, requires_grad, device)


def randint(low, high, shape, device="cpu", generator=None):
    rng = generator or default_generator()
    xp = backend.xp_for_device(device)
    return Tensor(xp.asarray(rng.integers(low, high, size=shape, dtype=np.int64)))


def arange(start, end=None, step=1, dtype=None, device="cpu"):
    if end is None:
        start, end = 0, start
    xp = backend.xp_for_device(device)
    data = xp.arange(start, end, step)
    if dtype is not None:
        data = data.astype(np.dtype(dtype))
    elif data.dtype.kind == "f":
        data = data.astype(np.float32)
    return Tensor(data)


def _like(fn, t, **kw):
    kw.setdefault("dtype", t.dtype)
    kw.setdefault("device", t.device)
    return fn(*t.shape, **kw)


def zeros_like(t, **kw):
    return _like(zeros, t, **kw)


def ones_like(t, **kw):
    return _like(ones, t, **kw)


def randn_like(t, **kw):
    return _like(randn, t, **kw)


def full_like(t, fill_value, dtype=None, device=None):
    return full(t.shape, fill_value, dtype=dtype or t.dtype, device=device or t.device)


_generator = np.random.default_rng()


def manual_seed(seed):
    """Seed the global generator used by randn/rand/randint and parameter initialisation."""
    global _generator
    _generator = np.random.default_rng(seed)
    cp = backend.cupy_or_none()
    if cp is not None and backend.cuda_is_available():
        cp.random.seed(seed)
    return _generator


def default_generator():
    return _generator


from . import ops  # noqa: E402  (ops needs Tensor and Function defined above)
