"""Modules: layers that own their parameters, with PyTorch's names.

A Module finds its parameters by walking its attributes in definition order:
a Parameter is a parameter, a Module is a child (walked in turn), and lists,
tuples and dicts are looked into, so

    self.blocks = [Linear(2, 3), Linear(3, 4)]

gives the names "blocks.0.weight", ..., "blocks.1.bias" with no registration
call. Attributes whose names start with "_" are private and not walked. A
parameter or module reachable by two paths counts once, under the first name.
Buffers (tensors that are state but not trained, e.g. running statistics) are
declared with `register_buffer`.
"""

import collections
import math

import numpy as np

from .. import backend, ops
from ..tensor import Tensor, _as_array, _looks_like_dtype, is_grad_enabled
from . import functional as F
from . import init


class Parameter(Tensor):
    """A leaf Tensor that a Module trains (requires_grad=True by default).

    Made from an array it shares that array (as PyTorch's Parameter shares a
    tensor's storage): optimizers update it in place.
    """

    def __init__(self, data, requires_grad=True):
        if isinstance(data, Tensor):
            data = data.data
        super().__init__(_as_array(data, None, backend.device_of(data)), requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _flatten(name, value):
    """(dotted name, item) for the Modules and Parameters in a value, looking into lists, tuples and dicts."""
    if isinstance(value, (Module, Parameter)):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _flatten(_join(name, str(i)), item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(_join(name, str(key)), item)


def _check_state_dict(state):
    if not hasattr(state, "keys") or not hasattr(state, "__getitem__"):
        hint = " (a path? load it first: tinysd.io.load_file(path))" if isinstance(state, (str, bytes)) else ""
        got = type(state).__name__
        raise TypeError(f"load_state_dict: expected a dict of name -> Tensor or array, got {got}{hint}")


class Module:
    """Base class of layers and models: subclass it and define forward()."""

    training = True
    _buffers = {}  # name -> persistent; replaced per instance by register_buffer

    def __init__(self):
        self.training = True

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---- walking the attributes ----------------------------------------------
    def _attributes(self):
        """This module's public (name, value) pairs in definition order; containers override it."""
        return [(k, v) for k, v in vars(self).items() if not k.startswith("_")]

    def _direct_members(self):
        """(name, item) for each child Module, Parameter and buffer held directly by this module."""
        for name, value in self._attributes():
            if name in self._buffers:
                if value is not None:
                    yield name, value
            else:
                yield from _flatten(name, value)

    def _walk(self, prefix, seen):
        """Depth first, in definition order: (dotted name, item) for every module, parameter and buffer."""
        for name, item in self._direct_members():
            if id(item) in seen:
                continue
            seen.add(id(item))
            full = _join(prefix, name)
            yield full, item
            if isinstance(item, Module):
                yield from item._walk(full, seen)

    def named_modules(self):
        yield "", self
        for name, item in self._walk("", {id(self)}):
            if isinstance(item, Module):
                yield name, item

    def modules(self):
        return [m for _, m in self.named_modules()]

    def named_children(self):
        seen = set()
        for name, item in self._direct_members():
            if isinstance(item, Module) and id(item) not in seen:
                seen.add(id(item))
                yield name, item

    def children(self):
        return [m for _, m in self.named_children()]

    def named_parameters(self):
        for name, item in self._walk("", {id(self)}):
            if isinstance(item, Parameter):
                yield name, item

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, persistent_only=False):
        for mod_name, module in self.named_modules():
            for name, persistent in module._buffers.items():
                value = getattr(module, name, None)
                if value is not None and (persistent or not persistent_only):
                    yield _join(mod_name, name), value

    def buffers(self):
        return [b for _, b in self.named_buffers()]

    def register_buffer(self, name, value, persistent=True):
        """Keep `value` (a Tensor or array, or None) as state: moved by to(), saved by state_dict() if persistent."""
        if "_buffers" not in vars(self):
            self._buffers = {}
        if value is not None and not isinstance(value, Tensor):
            value = Tensor(_as_array(value, None, backend.device_of(value)))
        self._buffers[name] = persistent
        setattr(self, name, value)

    def requires_grad_(self, requires_grad=True):
        """Freeze (False) or unfreeze every parameter, e.g. a pretrained VAE while training a UNet."""
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # ---- state ---------------------------------------------------------------------
    def state_dict(self):
        """name -> Tensor for every parameter and persistent buffer (the same objects, not copies)."""
        state = dict(self.named_parameters())
        state.update(self.named_buffers(persistent_only=True))
        return state

    def load_state_dict(self, state, strict=True):
        """Copy values (Tensors or arrays) into this module's parameters and buffers, in place.

        Shape mismatches are always errors; missing and unexpected keys are
        errors when strict, and are returned otherwise.
        """
        _check_state_dict(state)
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        problems = []
        if strict and missing:
            problems.append(f"missing keys {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys {unexpected}")
        for key, target in own.items():
            if key in state and tuple(np.shape(_raw(state[key]))) != target.shape:
                problems.append(
                    f"size mismatch for {key}: checkpoint {tuple(np.shape(_raw(state[key])))} vs model {target.shape}"
                )
        if problems:
            raise RuntimeError("load_state_dict: " + "; ".join(problems))
        for key, target in own.items():
            if key in state:
                target.data[...] = backend.to_device(_raw(state[key]), target.device)
                target.bump_version_()
        return IncompatibleKeys(missing, unexpected)

    def train(self, mode=True):
        for module in self.modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad.data[...] = 0

    def to(self, target):
        """Move every parameter and buffer to a device, or cast the floating ones to a dtype, in place.

        The Parameter objects stay the same (only their `.data` is replaced), so an
        optimizer built before the move still holds them.
        """
        if _looks_like_dtype(target):
            dtype = np.dtype(target)
            move = (lambda a: a.astype(dtype) if a.dtype.kind == "f" else a)
        else:
            device = backend.normalize_device(target)
            move = (lambda a: backend.to_device(a, device))
        for t in self.parameters() + self.buffers():
            t.data = move(t.data)
            if t.grad is not None:
                t.grad.data = move(t.grad.data)
        return self

    def cpu(self):
        return self.to("cpu")

    def cuda(self):
        return self.to("cuda")

    def float(self):
        return self.to(np.float32)

    def double(self):
        return self.to(np.float64)

    def apply(self, fn):
        """Call fn(module) on every module, children before parents (PyTorch's order); returns self."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    # ---- printing ------------------------------------------------------------------
    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"({name}): " + repr(child).replace("\n", "\n  ") for name, child in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


def _raw(value):
    """The array inside a Tensor, or the value itself (a NumPy or CuPy array)."""
    return value.data if isinstance(value, Tensor) else value


def _pairs(op, **values):
    """Each int-or-pair argument of `op` as an (h, w) pair (F.as_pair names a bad one)."""
    return [F.as_pair(value, name, op) for name, value in values.items()]


def _empty(*shape):
    return Parameter(np.zeros(shape, dtype=np.float32))


# ---- containers ----------------------------------------------------------------------
class ModuleList(Module):
    """A list of modules, keys "0", "1", ..."""

    def __init__(self, modules=()):
        super().__init__()
        self._items = list(modules)

    def _attributes(self):
        return [(str(i), m) for i, m in enumerate(self._items)]

    def __getitem__(self, index):
        return type(self)(self._items[index]) if isinstance(index, slice) else self._items[index]

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def append(self, module):
        self._items.append(module)
        return self

    def extend(self, modules):
        self._items.extend(modules)
        return self


class Sequential(ModuleList):
    """Modules applied one after another: a ModuleList with a forward. A GroupNorm followed by a
    SiLU runs as one fused op (GroupNorm(x, with_silu=True)): the same result, one pass less."""

    def __init__(self, *modules):
        super().__init__(modules)

    def __getitem__(self, index):
        return Sequential(*self._items[index]) if isinstance(index, slice) else self._items[index]

    def forward(self, x):
        modules, i = self._items, 0
        while i < len(modules):
            if type(modules[i]) is GroupNorm and i + 1 < len(modules) and type(modules[i + 1]) is SiLU:
                x, i = modules[i](x, with_silu=True), i + 2
            else:
                x, i = modules[i](x), i + 1
        return x


class ModuleDict(Module):
    """A dict of modules, keys as given."""

    def __init__(self, modules=None):
        super().__init__()
        self._items = dict(modules or {})

    def _attributes(self):
        return [(str(k), m) for k, m in self._items.items()]

    def __getitem__(self, key):
        return self._items[key]

    def __setitem__(self, key, module):
        self._items[key] = module

    def __contains__(self, key):
        return key in self._items

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def keys(self):
        return self._items.keys()

    def values(self):
        return self._items.values()

    def items(self):
        return self._items.items()


# ---- layers with parameters ----------------------------------------------------------
def _init_like_pytorch(weight, bias, fan_in):
    """Weights kaiming_uniform_(a=sqrt(5)) and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as PyTorch."""
    init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        init.uniform_(bias, -bound, bound)


class Linear(Module):
    """y = x W^T + b, W of shape (out_features, in_features)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _empty(out_features, in_features)
        self.bias = _empty(out_features) if bias else None
        _init_like_pytorch(self.weight, self.bias, in_features)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """2-d convolution; weight (out_channels, in_channels // groups, kh, kw)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True):
        super().__init__()
        F.check_groups("Conv2d", groups, in_channels, "input")
        F.check_groups("Conv2d", groups, out_channels, "output")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = _pairs(
            "Conv2d", kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
        self.weight = _empty(out_channels, in_channels // groups, *self.kernel_size)
        self.bias = _empty(out_channels) if bias else None
        _init_like_pytorch(self.weight, self.bias, in_channels // groups * math.prod(self.kernel_size))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}" + (f", groups={self.groups}" if self.groups != 1 else "")
            + ("" if self.bias is not None else ", bias=False")
        )


class ConvTranspose2d(Module):
    """Transposed convolution (the gradient of a convolution); weight (in_channels, out_channels // groups, kh, kw)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"ConvTranspose2d: in_channels {in_channels} and out_channels {out_channels} "
                f"must be divisible by groups {groups}"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.output_padding, self.dilation = _pairs(
            "ConvTranspose2d", kernel_size=kernel_size, stride=stride, padding=padding,
            output_padding=output_padding, dilation=dilation)
        self.weight = _empty(in_channels, out_channels // groups, *self.kernel_size)
        self.bias = _empty(out_channels) if bias else None
        # PyTorch takes the fan from the weight's dim 1, here out_channels // groups
        _init_like_pytorch(self.weight, self.bias, out_channels // groups * math.prod(self.kernel_size))

    def forward(self, x):
        return F.conv_transpose2d(
            x, self.weight, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )

    extra_repr = Conv2d.extra_repr


class GroupNorm(Module):
    """Normalise each group of num_channels // num_groups channels, then scale and shift per channel."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels {num_channels} is not divisible by num_groups {num_groups}")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = Parameter(np.ones(num_channels, np.float32)) if affine else None
        self.bias = _empty(num_channels) if affine else None

    def forward(self, x, with_silu=False):
        """The normalised x; with_silu=True: silu of it, in one fused op (as ResNet blocks use it)."""
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, with_silu)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.weight is not None}"


class LayerNorm(Module):
    """Normalise over the last dims (normalized_shape), then scale and shift elementwise."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        self.normalized_shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) \
            else (normalized_shape,)
        self.eps = eps
        self.weight = Parameter(np.ones(self.normalized_shape, np.float32)) if elementwise_affine else None
        self.bias = _empty(*self.normalized_shape) if elementwise_affine else None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class Embedding(Module):
    """A lookup table: row i of weight (num_embeddings, embedding_dim) is the vector of id i; init N(0, 1)."""

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = _empty(num_embeddings, embedding_dim)
        init.normal_(self.weight)

    def forward(self, input_ids):
        return F.embedding(input_ids, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


# ---- layers without parameters -------------------------------------------------------
class Identity(Module):
    def forward(self, x):
        return x


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class SiLU(Module):
    def forward(self, x):
        return F.silu(x)


class Sigmoid(Module):
    def forward(self, x):
        return F.sigmoid(x)


class Tanh(Module):
    def forward(self, x):
        return F.tanh(x)


class GELU(Module):
    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


class Dropout(Module):
    """Zero each element with probability p while training (scaling the rest by 1/(1-p)); identity in eval."""

    def __init__(self, p=0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class Flatten(Module):
    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        return x.flatten(self.start_dim, self.end_dim)

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class Upsample(Module):
    def __init__(self, scale_factor=2, mode="nearest"):
        super().__init__()
        self.scale_factor, self.mode = scale_factor, mode

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode)

    def extra_repr(self):
        return f"scale_factor={self.scale_factor}, mode={self.mode!r}"


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(_Pool2d):
    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)


class MaxPool2d(_Pool2d):
    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)


# ---- attention -----------------------------------------------------------------------
ATTENTION_SLICE_BYTES = 256 * 2**20


def _attention_in_slices(q, k, v, mask, is_causal):
    """F.scaled_dot_product_attention on (B, heads, S, D), a few heads at a time when it runs
    without gradients and all heads' (S, S2) scores would exceed ATTENTION_SLICE_BYTES.

    Stable Diffusion at 512x512 attends among 4,096 latent pixels: one head's scores take
    64 MB in float32, all 2 x 8 heads of a guided step 1 GB. Heads are independent, so
    slices give the same numbers. (Training keeps one call: backward needs the whole graph.)
    """
    b, h, sq, _ = q.shape
    per_head = sq * k.shape[2] * q.dtype.itemsize
    if is_grad_enabled() or mask is not None or b * h * per_head <= ATTENTION_SLICE_BYTES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    step = max(1, ATTENTION_SLICE_BYTES // per_head)
    q, k, v = (t.reshape(b * h, *t.shape[2:]) for t in (q, k, v))
    parts = [F.scaled_dot_product_attention(q[i:i + step], k[i:i + step], v[i:i + step], is_causal=is_causal)
             for i in range(0, b * h, step)]
    return ops.cat(parts, dim=0).reshape(b, h, sq, v.shape[-1])


class Attention(Module):
    """Multi-head attention with diffusers' names (to_q, to_k, to_v, to_out).

    Self-attention when encoder_hidden_states is None, else cross-attention:
    queries from hidden_states (B, S, query_dim), keys and values from
    encoder_hidden_states (B, S2, cross_attention_dim). Each of the `heads`
    heads attends with dim_head features:

        head_h = softmax(Q_h K_h^T / sqrt(dim_head)) V_h,   out = concat_h(head_h) W_out^T + b_out

    attention_mask: bool (True = attend) or additive float, of shape (B, S2)
    (which keys each batch item may see), (B, S, S2), or anything that
    broadcasts to (B, heads, S, S2).
    """

    def __init__(self, query_dim, cross_attention_dim=None, heads=8, dim_head=64, dropout=0.0, bias=False,
                 out_bias=True):
        super().__init__()
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(context_dim, inner, bias=bias)
        self.to_v = Linear(context_dim, inner, bias=bias)
        self.to_out = ModuleList([Linear(inner, query_dim, bias=out_bias), Dropout(dropout)])

    def _split_heads(self, x):
        """(B, S, heads * dim_head) -> (B, heads, S, dim_head)"""
        b, s, _ = x.shape
        return x.reshape(b, s, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, is_causal=False):
        if hidden_states.ndim != 3:
            raise ValueError(f"Attention: hidden_states must be (batch, seq, dim), got shape {hidden_states.shape}")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, s, _ = hidden_states.shape
        q = self._split_heads(self.to_q(hidden_states))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        if attention_mask is not None:  # a mask carries no gradient: work on its array
            mask = _raw(attention_mask)
            if mask.ndim == 2:  # (B, S2): the same key mask for every head and query
                mask = mask[:, None, None, :]
            elif mask.ndim == 3:  # (B, S, S2): the same for every head
                mask = mask[:, None]
            attention_mask = mask
        out = _attention_in_slices(q, k, v, attention_mask, is_causal)
        out = out.transpose(1, 2).reshape(b, s, self.heads * self.dim_head)
        for layer in self.to_out:
            out = layer(out)
        return out

    def extra_repr(self):
        return f"heads={self.heads}, dim_head={self.dim_head}"


__all__ = [
    "Parameter", "Module", "Sequential", "ModuleList", "ModuleDict", "Linear", "Conv2d", "ConvTranspose2d",
    "GroupNorm", "LayerNorm", "Embedding", "Identity", "ReLU", "SiLU", "Sigmoid", "Tanh", "GELU", "Dropout",
    "Flatten", "Upsample", "AvgPool2d", "MaxPool2d", "Attention",
]
