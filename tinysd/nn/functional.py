"""Neural-network functions: convolutions, pooling, norms, attention, activations, losses.

PyTorch's names and signatures (`import tinysd.nn.functional as F`). Two kinds
of function live here:

* compositions of the primitive ops in tinysd.ops (linear, the losses, ...):
  their gradients come for free from the ops they are built of;
* Functions whose forward and backward call a hot kernel through
  `kernels.for_array(x)` (conv, pooling, norms, attention, SiLU, GELU): the
  kernel module (NumPy reference, Numba or CuPy) is picked by the array's type.
  Their math is written once, in kernels/reference.py, the readable specification
  every backend is tested against: each Function's docstring names its functions
  there (run with TINYSD_KERNELS=reference to step through them).

Images are NCHW. Notation in docstrings: g = dL/dy, the gradient arriving at
the output y.
"""

import math

import numpy as np

import kernels
import kernels.reference

from .. import backend, ops
from ..tensor import KERNEL_DTYPES, Function, Tensor, default_generator, no_grad

# ---- argument checks shared by several functions ----------


def as_pair(value, name="value", op="as_pair"):
    """An int or a pair of ints -> an (h, w) pair of Python ints (kernel sizes, strides, paddings, ...)."""
    if isinstance(value, (int, np.integer)):
        return (int(value), int(value))
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    return (int(pair[0]), int(pair[1]))


def _window_args(op, **pairs):
    """Normalise stride/padding/dilation-like arguments; strides and dilations must be >= 1."""
    out = {name: as_pair(v, name, op) for name, v in pairs.items()}
    for name, (h, w) in out.items():
        low = 0 if "padding" in name else 1
        if h < low or w < low:
            raise ValueError(f"{op}: {name} must be >= {low}, got {(h, w)}")
    return out


def _check_float(op, **tensors):
    """Every named tensor is a floating-point Tensor of one dtype."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype.kind != "f":
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype} (shape {t.shape})")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        described = ", ".join(f"{name} {t.dtype}" for name, t in tensors.items())
        raise ValueError(f"{op}: inputs must share one dtype, got {described}")


def _check_ndim(op, name, t, ndim):
    if t.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {t.shape}")


def _check_window_fits(op, x_shape, kernel, padding, dilation=(1, 1)):
    """The (dilated) window must fit inside the padded input."""
    span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    padded = tuple(n + 2 * p for n, p in zip(x_shape[2:], padding))
    if span[0] > padded[0] or span[1] > padded[1]:
        raise ValueError(
            f"{op}: kernel {kernel[0]}x{kernel[1]} (dilation {dilation}, spanning {span[0]}x{span[1]}) "
            f"is larger than the padded input {padded[0]}x{padded[1]} (input {x_shape}, padding {padding})"
        )


def check_groups(op, groups, channels, which):
    """The one check of a convolution's `groups` against a channel count (nn.Conv2d calls it too)."""
    if groups < 1 or channels % groups:
        raise ValueError(f"{op}: groups={groups} must be >= 1 and divide the {channels} {which} channels")


def _bias_tuple(op, bias, channels, like):
    """() without bias, (bias,) with one of shape (channels,)."""
    if bias is None:
        return ()
    _check_float(op, input=like, bias=bias)
    if bias.shape != (channels,):
        raise ValueError(f"{op}: bias must have shape ({channels},), got {bias.shape}")
    return (bias,)


def _add_channel_bias(y, bias):
    """y[n, c, i, j] += b[c] (in place on a fresh kernel output)."""
    if bias:
        y += bias[0].reshape(1, -1, 1, 1)
    return y


def _channel_bias_grad(g, needs):
    """db[c] = sum over n, i, j of g[n, c, i, j]: the bias was used at every position."""
    if not needs or not needs[0]:
        return (None,) if needs else ()
    n, c, positions = g.shape[0], g.shape[1], math.prod(g.shape[2:])
    per_sample = g.reshape(n * c, positions) @ backend.array_module(g).ones(positions, g.dtype)  # sum over i, j
    return (_column_sums(per_sample.reshape(n, c)),)


def _column_sums(m):
    """The sum of the rows of a matrix m (rows, cols) -> (cols,), as the product ones @ m:
    BLAS sums the rows of a gradient about 4x faster than m.sum(axis=0)."""
    return backend.array_module(m).ones(m.shape[0], m.dtype) @ m


def _affine(op, weight, bias, shape, like):
    """() when there is no affine transform, else (weight, bias) as Tensors of `shape`.

    A lone weight gets a zero bias, a lone bias a unit weight (constants, no gradient).
    """
    if weight is None and bias is None:
        return ()
    xp = backend.array_module(like.data)
    if weight is None:
        weight = Tensor(xp.ones(shape, dtype=like.dtype))
    if bias is None:
        bias = Tensor(xp.zeros(shape, dtype=like.dtype))
    _check_float(op, input=like, weight=weight, bias=bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != tuple(shape):
            raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {t.shape}")
    return (weight, bias)


# ---- linear layers and convolutions ----------


class LinearFunction(Function):
    """y = x W^T + b on the rows of x (M, in) (the leading dims flattened), one node in the graph:

        dx = g W,   dW = g^T x,   db = sum of g over the rows

    Each is a single 2-D GEMM (or sum) over all M rows, and the bias is added in place
    to the product: no separate matmul, transpose, add and reshape nodes.
    See kernels.reference.linear, linear_grad_input, linear_grad_weight.
    """

    def forward(self, x, w, *bias):
        x2 = x.reshape(-1, x.shape[-1])
        self.save_for_backward(x2, w)
        self.x_shape = x.shape
        y = kernels.for_array(x2).linear(x2, w, bias[0] if bias else None)
        return y.reshape(*x.shape[:-1], w.shape[0])

    def backward(self, g):
        x2, w = self.saved
        k = kernels.for_array(g)
        g2 = g.reshape(-1, w.shape[0])
        dx = k.linear_grad_input(g2, w).reshape(self.x_shape) if self.needs_input_grad[0] else None
        dw = k.linear_grad_weight(g2, x2) if self.needs_input_grad[1] else None
        return (dx, dw) + ((_column_sums(g2) if self.needs_input_grad[2] else None,) if len(self.inputs) > 2 else ())


def linear(x, weight, bias=None):
    """y = x W^T + b, for x (..., in), W (out, in), b (out,) -> y (..., out).

    The leading dims are flattened first, so the weight gradient is one
    (out, in) product g^T x rather than a batch of them summed afterwards.
    """
    if weight.ndim != 2:
        raise ValueError(f"linear: weight must be 2-D (out, in), got shape {weight.shape}")
    if x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: input of shape {x.shape} has {x.shape[-1] if x.ndim else 0} features (last dim), "
            f"but weight of shape {weight.shape} expects {weight.shape[1]}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear: bias must have shape ({weight.shape[0]},), got {bias.shape}")
    return LinearFunction.apply(x, weight, *(() if bias is None else (bias,)))


class Conv2dFunction(Function):
    """y = conv2d(x, w) (+ b), a cross-correlation, linear in x and in w: both gradients are again
    correlations. See kernels.reference.conv2d, conv2d_grad_input, conv2d_grad_weight."""

    kernel_dtypes = KERNEL_DTYPES

    def forward(self, x, w, *bias, stride, padding, dilation, groups):
        self.save_for_backward(x, w)
        self.geometry = (stride, padding, dilation, groups)
        return kernels.for_array(x).conv2d(x, w, stride, padding, dilation, groups, *bias)

    def backward(self, g):
        x, w = self.saved
        k = kernels.for_array(g)
        dx = k.conv2d_grad_input(g, w, x.shape, *self.geometry) if self.needs_input_grad[0] else None
        dw = k.conv2d_grad_weight(g, x, w.shape, *self.geometry) if self.needs_input_grad[1] else None
        return (dx, dw) + _channel_bias_grad(g, self.needs_input_grad[2:])


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation) with zero padding.

    x (N, C, H, W), weight (O, C // groups, KH, KW), bias (O,) -> (N, O, HO, WO),
    HO as kernels.reference.conv_output_size gives it.
    """
    geo, bias = _check_conv2d_args(x, weight, bias, stride, padding, dilation, groups)
    return Conv2dFunction.apply(x, weight, *bias, **geo, groups=groups)


def _check_conv2d_args(x, weight, bias, stride, padding, dilation, groups):
    """Check conv2d's arguments: the geometry as (h, w) pairs, and bias as a tuple of 0 or 1 tensor."""
    op = "conv2d"
    _check_float(op, input=x, weight=weight)
    _check_ndim(op, "input", x, 4)
    _check_ndim(op, "weight", weight, 4)
    geo = _window_args(op, stride=stride, padding=padding, dilation=dilation)
    out_ch, in_per_group, kh, kw = weight.shape
    check_groups(op, groups, out_ch, "output")
    if x.shape[1] != in_per_group * groups:
        raise ValueError(
            f"{op}: input {x.shape} has {x.shape[1]} channels, but weight {weight.shape} with groups={groups} "
            f"expects {in_per_group} * {groups} = {in_per_group * groups}"
        )
    _check_window_fits(op, x.shape, (kh, kw), geo["padding"], geo["dilation"])
    return geo, _bias_tuple(op, bias, out_ch, x)


class ConvTranspose2dFunction(Function):
    """y = conv_transpose2d(x, w) (+ b): the adjoint of a convolution.

    Write conv2d with weight w as a linear map of its input, conv2d(u, w) = A_w u,
    from images of y's shape to images of x's shape. Then

        y = conv_transpose2d(x, w) = A_w^T x

    (see kernels.reference.conv_transpose2d: the computation of conv2d_grad_input).
    Backward, with g = dL/dy:

        dx = A_w g = conv2d(g, w)
            since the gradient of a linear map is its transpose, (A_w^T)^T = A_w;
        dw:  L depends on w through <g, A_w^T x> = <A_w g, x> = <conv2d(g, w), x>,
             i.e. through a convolution whose *input* is g and whose output receives
             the upstream gradient x, so dw = conv2d_grad_weight(x, g) (roles swapped).

    The weight layout (C_in, C_out // groups, KH, KW) is exactly that of the conv
    from C_out to C_in channels, so w is used as is.
    """

    kernel_dtypes = KERNEL_DTYPES

    def forward(self, x, w, *bias, stride, padding, output_padding, dilation, groups):
        self.save_for_backward(x, w)
        self.geometry = (stride, padding, dilation, groups)
        y = kernels.for_array(x).conv_transpose2d(x, w, stride, padding, output_padding, dilation, groups)
        return _add_channel_bias(y, bias)

    def backward(self, g):
        x, w = self.saved
        k = kernels.for_array(g)
        dx = k.conv2d(g, w, *self.geometry) if self.needs_input_grad[0] else None
        dw = k.conv2d_grad_weight(x, g, w.shape, *self.geometry) if self.needs_input_grad[1] else None
        return (dx, dw) + _channel_bias_grad(g, self.needs_input_grad[2:])


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Transposed convolution ("deconvolution"), PyTorch semantics.

    x (N, C_in, H, W), weight (C_in, C_out // groups, KH, KW), bias (C_out,) ->
    (N, C_out, HO, WO), HO as kernels.reference.conv_transpose2d_shape gives it.
    output_padding (< stride) picks among the output sizes a stride-s conv maps to H.
    """
    geo, bias = _check_conv_transpose2d_args(x, weight, bias, stride, padding, output_padding, dilation, groups)
    return ConvTranspose2dFunction.apply(x, weight, *bias, **geo, groups=groups)


def _check_conv_transpose2d_args(x, weight, bias, stride, padding, output_padding, dilation, groups):
    """Check conv_transpose2d's arguments: the geometry as (h, w) pairs, and bias as a tuple of 0 or 1 tensor."""
    op = "conv_transpose2d"
    _check_float(op, input=x, weight=weight)
    _check_ndim(op, "input", x, 4)
    _check_ndim(op, "weight", weight, 4)
    geo = _window_args(op, stride=stride, padding=padding, output_padding=output_padding, dilation=dilation)
    in_ch, out_per_group = weight.shape[:2]
    check_groups(op, groups, in_ch, "input")
    if x.shape[1] != in_ch:
        raise ValueError(f"{op}: input {x.shape} has {x.shape[1]} channels, but weight {weight.shape} expects {in_ch}")
    stride, out_pad = geo["stride"], geo["output_padding"]
    if out_pad[0] >= stride[0] or out_pad[1] >= stride[1]:
        raise ValueError(f"{op}: output_padding {out_pad} must be smaller than stride {stride}")
    # the output size (and its error when empty) from the reference kernel's one helper
    kernels.reference.conv_transpose2d_shape(x.shape, weight.shape, **geo, groups=groups)
    return geo, _bias_tuple(op, bias, out_per_group * groups, x)


# ---- pooling and upsampling ----------


def _pool_args(op, x, kernel_size, stride, padding):
    _check_float(op, input=x)
    _check_ndim(op, "input", x, 4)
    geo = _window_args(op, kernel=kernel_size, stride=kernel_size if stride is None else stride, padding=padding)
    k, p = geo["kernel"], geo["padding"]
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"{op}: padding {p} must be at most half the kernel size {k}")
    _check_window_fits(op, x.shape, k, p)
    return geo


class MaxPool2dFunction(Function):
    """y = max over each window; g flows to the winning element (the first maximum, never padding,
    a NaN if there is one, as in PyTorch). See kernels.reference.max_pool2d, max_pool2d_backward."""

    kernel_dtypes = KERNEL_DTYPES

    def forward(self, x, kernel, stride, padding):
        self.kernels = kernels.for_array(x)  # the argmax format is private to one backend: keep it
        y, argmax = self.kernels.max_pool2d(x, kernel, stride, padding)
        self.save_for_backward(argmax)
        self.x_shape, self.geometry = x.shape, (kernel, stride, padding)
        return y

    def backward(self, g):
        return self.kernels.max_pool2d_backward(g, self.saved[0], self.x_shape, *self.geometry)


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max over (kh, kw) windows; stride defaults to kernel_size. x (N, C, H, W) -> (N, C, HO, WO)."""
    return MaxPool2dFunction.apply(x, **_pool_args("max_pool2d", x, kernel_size, stride, padding))


class AvgPool2dFunction(Function):
    """y = mean over each window, padding counted as zeros (count_include_pad=True).
    See kernels.reference.avg_pool2d, avg_pool2d_backward."""

    kernel_dtypes = KERNEL_DTYPES

    def forward(self, x, kernel, stride, padding):
        self.x_shape, self.geometry = x.shape, (kernel, stride, padding)
        return kernels.for_array(x).avg_pool2d(x, kernel, stride, padding)

    def backward(self, g):
        return kernels.for_array(g).avg_pool2d_backward(g, self.x_shape, *self.geometry)


def avg_pool2d(x, kernel_size, stride=None, padding=0):
    """Mean over (kh, kw) windows; stride defaults to kernel_size. x (N, C, H, W) -> (N, C, HO, WO)."""
    return AvgPool2dFunction.apply(x, **_pool_args("avg_pool2d", x, kernel_size, stride, padding))


class UpsampleNearest2dFunction(Function):
    """Each pixel repeated sh x sw times. See kernels.reference.upsample_nearest2d, upsample_nearest2d_backward."""

    kernel_dtypes = KERNEL_DTYPES

    def forward(self, x, scale):
        self.scale = scale
        return kernels.for_array(x).upsample_nearest2d(x, scale)

    def backward(self, g):
        return kernels.for_array(g).upsample_nearest2d_backward(g, self.scale)


def interpolate(x, scale_factor=2, mode="nearest"):
    """Upsample (N, C, H, W) by integer factors -> (N, C, H sh, W sw).

    mode "nearest" repeats each pixel; "bilinear" (PyTorch's align_corners=False) blends
    the two nearest input pixels along each axis, see _linear_weights.
    """
    op = "interpolate"
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"{op}: mode must be 'nearest' or 'bilinear', got {mode!r}")
    _check_float(op, input=x)
    _check_ndim(op, "input", x, 4)
    factors = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
    if len(factors) != 2 or not all(float(f) == int(f) and int(f) >= 1 for f in factors):
        raise ValueError(f"{op}: scale_factor must be a positive integer or a pair of them, got {scale_factor!r}")
    sh, sw = int(factors[0]), int(factors[1])
    if mode == "nearest":
        return UpsampleNearest2dFunction.apply(x, scale=(sh, sw))
    rows = Tensor(_linear_weights(x.shape[2], sh, x.data))  # (H sh, H)
    cols = Tensor(_linear_weights(x.shape[3], sw, x.data))  # (W sw, W)
    return rows @ x @ cols.T  # a linear map of x: autograd gives rows^T g cols


def _linear_weights(size, scale, like):
    """The (size * scale, size) matrix of 1-D linear interpolation, align_corners=False:
    output i samples the input at s = (i + 0.5) / scale - 0.5 (clamped at 0), mixing
    pixels floor(s) and floor(s) + 1 (clamped at the end) with weights 1 - t and t, t = s - floor(s)."""
    xp = backend.array_module(like)
    s = np.maximum((np.arange(size * scale) + 0.5) / scale - 0.5, 0.0)
    low = np.floor(s).astype(int)
    high, t = np.minimum(low + 1, size - 1), s - low
    weights = np.zeros((size * scale, size))
    np.add.at(weights, (np.arange(size * scale), low), 1 - t)
    np.add.at(weights, (np.arange(size * scale), high), t)
    return xp.asarray(weights.astype(like.dtype))


def pad(x, pad, mode="constant", value=0.0):
    """Constant padding; `pad` lists (before, after) pairs starting from the last dim."""
    if mode != "constant":
        raise ValueError(f"pad: only mode='constant' is supported, got {mode!r}")
    return ops.pad(x, pad, 0.0 if value is None else value)


# ---- normalisation ----------


class GroupNormFunction(Function):
    """Normalise each group of C / G channels of each sample over its channels and positions,
    then scale and shift per channel (and, with_silu, apply SiLU: one pass over memory instead of
    two each way, and the normalised values are not kept for backward).
    See kernels.reference.group_norm, group_norm_backward."""

    kernel_dtypes = KERNEL_DTYPES

    def forward(self, x, *affine, num_groups, eps, with_silu):
        w, b = affine if affine else (None, None)
        y, mean, rstd = kernels.for_array(x).group_norm(x, num_groups, w, b, eps, with_silu)
        self.save_for_backward(x, mean, rstd, w, b if with_silu else None)  # (silu' needs y, so b)
        self.num_groups, self.with_silu = num_groups, with_silu
        return y

    def backward(self, g):
        x, mean, rstd, w, b = self.saved
        dx, dw, db = kernels.for_array(g).group_norm_backward(g, x, mean, rstd, w, self.num_groups, b, self.with_silu)
        return dx if w is None else (dx, dw, db)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, with_silu=False):
    """Group normalisation of x (N, C, *spatial) with per-channel affine weight, bias (C,);
    with_silu=True: silu(group_norm(x)) as one op (a ResNet block's norm and activation)."""
    op = "group_norm"
    _check_float(op, input=x)
    if x.ndim < 2:
        raise ValueError(f"{op}: input must be (N, C, ...), got shape {x.shape}")
    channels = x.shape[1]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"{op}: num_groups={num_groups} must divide the {channels} channels of input {x.shape}")
    affine = _affine(op, weight, bias, (channels,), x)
    if x.size == 0:  # an empty batch: an empty result, as PyTorch gives (the kernel needs rows)
        return _empty_result(x, affine)
    return GroupNormFunction.apply(x, *affine, num_groups=num_groups, eps=eps, with_silu=bool(with_silu))


def _empty_result(x, per_channel):
    """x's empty shape, still in the graph of x and of the per-channel parameters (zero gradients)."""
    out = x * 0.0
    for p in per_channel:
        out = out + p.reshape(1, -1, *[1] * (x.ndim - 2)) * 0.0
    return out


class LayerNormFunction(Function):
    """Normalise over the last dims: the input is viewed as (M, D) and each row normalised.
    See kernels.reference.layer_norm, layer_norm_backward."""

    kernel_dtypes = KERNEL_DTYPES

    def forward(self, x, *affine, size, eps):
        w, b = (a.reshape(size) for a in affine) if affine else (None, None)
        rows = x.reshape(-1, size)
        y, mean, rstd = kernels.for_array(x).layer_norm(rows, w, b, eps)
        self.save_for_backward(rows, mean, rstd, w)
        self.x_shape = x.shape
        self.w_shape = affine[0].shape if affine else None
        return y.reshape(x.shape)

    def backward(self, g):
        rows, mean, rstd, w = self.saved
        dx, dw, db = kernels.for_array(g).layer_norm_backward(g.reshape(rows.shape), rows, mean, rstd, w)
        dx = dx.reshape(self.x_shape)
        return dx if w is None else (dx, dw.reshape(self.w_shape), db.reshape(self.w_shape))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer normalisation over the trailing dims `normalized_shape`; weight, bias of that shape."""
    op = "layer_norm"
    _check_float(op, input=x)
    shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
    if not shape or len(shape) > x.ndim or x.shape[x.ndim - len(shape) :] != shape:
        raise ValueError(f"{op}: input {x.shape} does not end with normalized_shape {shape}")
    affine = _affine(op, weight, bias, shape, x)
    return LayerNormFunction.apply(x, *affine, size=math.prod(shape), eps=eps)


# ---- attention ----------


class AttentionFunction(Function):
    """out = softmax(scale * q k^T + mask) v, for q (B, H, Sq, D), k (B, H, Sk, D), v (B, H, Sk, Dv).

    Fused: forward keeps only out and lse = logsumexp of the scores per query (not the
    (B, Sq, Sk) probabilities), backward recomputes them. See kernels.reference.attention,
    attention_backward.
    """

    kernel_dtypes = KERNEL_DTYPES

    def forward(self, q, k, v, mask, scale, is_causal):
        out, lse = kernels.for_array(q).attention(q, k, v, mask, scale, is_causal)
        self.save_for_backward(q, k, v, out, lse, mask)
        self.scale, self.is_causal = scale, is_causal
        return out

    def backward(self, g):
        q, k, v, out, lse, mask = self.saved
        return kernels.for_array(g).attention_backward(g, q, k, v, out, lse, mask, self.scale, self.is_causal)


def _broadcasts_to(shape, target):
    try:
        return np.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


def _additive_mask(attn_mask, batch, sq, sk, like):
    """attn_mask (bool: True = attend, or additive float), broadcastable to batch + (Sq, Sk),
    -> the kernel's additive mask of shape (1, Sq, Sk) or (B, Sq, Sk) (B: the product of the batch
    dims, in their order), or None."""
    op = "scaled_dot_product_attention"
    if attn_mask is None:
        return None
    xp = backend.array_module(like)
    mask = attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask
    where, here = backend.device_of(mask), backend.device_of(like)
    if hasattr(mask, "shape") and where != here:
        raise RuntimeError(f"{op}: attn_mask is on {where} but query is on {here}")
    mask = xp.asarray(mask)
    full = tuple(batch) + (sq, sk)
    if not _broadcasts_to(mask.shape, full):
        raise ValueError(f"{op}: attn_mask of shape {mask.shape} cannot be broadcast to (..., Sq, Sk) = {full}")
    if mask.dtype == bool:
        mask = xp.where(mask, 0.0, -xp.inf)
    mask = mask.astype(like.dtype, copy=False)
    if all(n == 1 for n in mask.shape[:-2]):  # one mask shared by the whole batch
        mask = xp.broadcast_to(mask.reshape(mask.shape[-2:]), (sq, sk))[None]
    else:
        mask = xp.broadcast_to(mask, full).reshape(-1, sq, sk)
    return xp.ascontiguousarray(mask)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """softmax(scale * Q K^T + mask) V over any leading dims: (..., Sq, D), (..., Sk, D), (..., Sk, Dv).

    scale defaults to 1 / sqrt(D). attn_mask: bool (True = may attend) or an additive
    float mask, broadcastable to (..., Sq, Sk). is_causal applies the top-left aligned
    lower-triangular mask tril(ones(Sq, Sk)) (and may be combined with attn_mask).
    dropout_p > 0 drops attention weights (inverted dropout, as PyTorch does whenever
    dropout_p > 0: pass 0 for evaluation). That runs the composed form of ops, which keeps
    the (B, Sq, Sk) weights for backward; the fused kernel, used when dropout_p == 0, does not.
    """
    batch = _check_attention_args(query, key, value, dropout_p)
    (sq, d), sk, dv = query.shape[-2:], key.shape[-2], value.shape[-1]

    entries, heads = (math.prod(batch[:-1]), batch[-1]) if len(batch) >= 2 else (math.prod(batch), 1)

    def as_heads(t):
        """(..., S, E) -> (B, H, S, E): H the last of two or more broadcast leading dims (else 1), B the
        product of the others. A (B, H, S, E) input stays as it is, however strided: the heads of a
        projection, transposed, reach the kernels as a view."""
        if t.shape[:-2] != batch:
            t = t.expand(*batch, *t.shape[-2:])
        return t.reshape(entries, heads, *t.shape[-2:])

    q, k, v = as_heads(query), as_heads(key), as_heads(value)
    mask = _additive_mask(attn_mask, batch, sq, sk, query.data)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if dropout_p:
        items = [t.reshape(-1, *t.shape[-2:]) for t in (q, k, v)]  # (B * H, S, E)
        out = _attention_with_dropout(*items, mask, scale, bool(is_causal), dropout_p)
    else:
        out = AttentionFunction.apply(q, k, v, mask=mask, scale=scale, is_causal=bool(is_causal))
    return out.reshape(*batch, sq, dv)


def _check_attention_args(query, key, value, dropout_p):
    """Check scaled_dot_product_attention's arguments; the broadcast leading (batch) dims."""
    op = "scaled_dot_product_attention"
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    _check_float(op, query=query, key=key, value=value)
    if min(query.ndim, key.ndim, value.ndim) < 2:
        raise ValueError(f"{op}: query, key, value must be (..., S, D), got {query.shape}, {key.shape}, {value.shape}")
    (d, dk), (sk, sv) = (query.shape[-1], key.shape[-1]), (key.shape[-2], value.shape[-2])
    if dk != d:
        raise ValueError(f"{op}: query {query.shape} and key {key.shape} must have the same head dim D ({d} vs {dk})")
    if sv != sk:
        raise ValueError(f"{op}: key {key.shape} and value {value.shape} must have the same length ({sk} vs {sv})")
    try:
        return np.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except ValueError:
        raise ValueError(
            f"{op}: leading dims of query {query.shape}, key {key.shape}, value {value.shape} cannot be broadcast"
        ) from None


def _attention_with_dropout(q, k, v, mask, scale, is_causal, p):
    """dropout(softmax(scale q k^T + mask), p) v from differentiable ops, on (B, S, E) tensors.

    Masked keys get a large finite negative score instead of -inf (exp gives exactly 0 either
    way), and a query that sees no key gets output 0, as in the fused kernel, not nan."""
    xp = backend.array_module(q.data)
    total = kernels.load("reference").attention_bias(mask, q.shape[1], k.shape[1], is_causal, q.data)
    visible = (total > -xp.inf).any(axis=-1, keepdims=True).astype(q.dtype)
    finite = xp.where(total > -xp.inf, total, -0.5 * xp.finfo(q.dtype).max).astype(q.dtype)
    weights = ops.softmax((q @ k.transpose(1, 2)) * scale + Tensor(finite), -1) * Tensor(visible)
    return dropout(weights, p) @ v


# ---- activations ----------


def relu(x):
    return ops.relu(x)


def sigmoid(x):
    return ops.sigmoid(x)


def tanh(x):
    return ops.tanh(x)


def softmax(x, dim):
    return ops.softmax(x, dim)


def log_softmax(x, dim):
    return ops.log_softmax(x, dim)


class SiLUFunction(Function):
    """y = x sigmoid(x). See kernels.reference.silu, silu_backward."""

    kernel_dtypes = KERNEL_DTYPES

    def forward(self, x):
        self.save_for_backward(x)
        return kernels.for_array(x).silu(x)

    def backward(self, g):
        return kernels.for_array(g).silu_backward(g, self.saved[0])


def silu(x):
    """x * sigmoid(x) (also called swish)."""
    _check_float("silu", input=x)
    return SiLUFunction.apply(x)


class GELUFunction(Function):
    """y = x Phi(x) (Phi the standard normal CDF), or its tanh approximation.
    See kernels.reference.gelu, gelu_backward."""

    kernel_dtypes = KERNEL_DTYPES

    def forward(self, x, approximate):
        self.save_for_backward(x)
        self.approximate = approximate
        return kernels.for_array(x).gelu(x, approximate)

    def backward(self, g):
        return kernels.for_array(g).gelu_backward(g, self.saved[0], self.approximate)


def gelu(x, approximate="none"):
    """x Phi(x) with approximate="none" (erf), or 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    _check_float("gelu", input=x)
    return GELUFunction.apply(x, approximate=approximate)


class GEGLUFunction(Function):
    """y = a * gelu(b) for x = [a, b], the last dim split in halves (GEGLU, Shazeer 2020):

        da = g * gelu(b),   db = gelu_backward(g * a, b)   (kernels.reference.geglu_backward)

    One node and one kernel each way (kernels.reference.geglu): the halves are read where
    they lie in x, and dx is written half by half into one array. Only x is saved.
    """

    def forward(self, x, approximate):
        self.save_for_backward(x)
        self.approximate = approximate
        return kernels.for_array(x).geglu(x, approximate)

    def backward(self, g):
        (x,) = self.saved
        return kernels.for_array(g).geglu_backward(g, x, self.approximate)


def geglu(x, approximate="none"):
    """a * gelu(b) where a, b are the two halves of x's last dim: (..., 2 D) -> (..., D)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    _check_float("geglu", input=x)
    if x.ndim == 0 or x.shape[-1] % 2:
        raise ValueError(f"geglu: the last dim of input {x.shape} must have an even size (two halves)")
    return GEGLUFunction.apply(x, approximate=approximate)


def _uniform(shape, like):
    """Uniform [0, 1) samples on the device of `like`, from tinysd's seeded generators."""
    if backend.is_cupy_array(like):
        return backend.cupy_or_none().random.random(shape)
    return default_generator().random(shape)


def dropout(x, p=0.5, training=True):
    """Inverted dropout: zero each element with probability p and scale the rest by 1 / (1 - p),
    so the expected value is unchanged and evaluation needs no rescaling. Identity when
    not training or p == 0."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    keep = _uniform(x.shape, x.data) >= p
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    return x * Tensor((keep * scale).astype(x.dtype))


def embedding(input_ids, weight):
    """Rows of `weight` (num_embeddings, dim) picked by integer ids of any shape -> ids.shape + (dim,).

    The gradient of a row used several times is the sum over its uses (GetItem adds them).
    """
    ids = input_ids.data if isinstance(input_ids, Tensor) else backend.array_module(weight.data).asarray(input_ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"embedding: ids must be integers, got {ids.dtype} (shape {ids.shape})")
    if weight.ndim != 2:
        raise ValueError(f"embedding: weight must be (num_embeddings, dim), got shape {weight.shape}")
    low, high = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
    if low < 0 or high >= weight.shape[0]:
        raise ValueError(
            f"embedding: ids must be in [0, {weight.shape[0]}) for weight {weight.shape}, got values in [{low}, {high}]"
        )
    return weight[ids]


# ---- losses ----------


def _reduce(loss, reduction, op):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _same_shape_target(op, input, target):
    target = ops.as_tensor(target, input)
    if target.shape != input.shape:
        raise ValueError(f"{op}: input {input.shape} and target {target.shape} must have the same shape")
    return target


def mse_loss(input, target, reduction="mean"):
    """(input - target)^2, reduced."""
    diff = input - _same_shape_target("mse_loss", input, target)
    return _reduce(diff * diff, reduction, "mse_loss")


def l1_loss(input, target, reduction="mean"):
    """|input - target|, reduced."""
    return _reduce((input - _same_shape_target("l1_loss", input, target)).abs(), reduction, "l1_loss")


def _target_distribution(input, target, label_smoothing):
    """The distribution q over classes (dim 1) that cross-entropy compares with.

    Integer targets (N, d1, ...) become one-hot rows; float targets of the input's
    shape are class probabilities already. Label smoothing mixes in the uniform
    distribution: q = (1 - eps) q + eps / C.
    """
    op = "cross_entropy"
    classes = input.shape[1]
    xp = backend.array_module(input.data)
    data = target.data if isinstance(target, Tensor) else xp.asarray(target)
    if data.dtype.kind == "f":
        if data.shape != input.shape:
            raise ValueError(f"{op}: probability targets must have the input's shape {input.shape}, got {data.shape}")
        q = target if isinstance(target, Tensor) else Tensor(data.astype(input.dtype))
    elif data.dtype.kind in "iu":
        expected = input.shape[:1] + input.shape[2:]
        if data.shape != expected:
            raise ValueError(
                f"{op}: class-index targets for input {input.shape} must have shape {expected}, got {data.shape}"
            )
        low, high = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if low < 0 or high >= classes:
            raise ValueError(f"{op}: targets must be class indices in [0, {classes}), got values in [{low}, {high}]")
        class_ids = xp.arange(classes).reshape((1, classes) + (1,) * (input.ndim - 2))
        q = Tensor((xp.expand_dims(data, 1) == class_ids).astype(input.dtype))
    else:
        raise ValueError(f"{op}: target must hold class indices (int) or probabilities (float), got {data.dtype}")
    if label_smoothing:
        q = q * (1.0 - label_smoothing) + label_smoothing / classes
    return q


def cross_entropy(input, target, reduction="mean", label_smoothing=0.0):
    """-sum_c q_c log softmax(input)_c per sample, q the target distribution.

    input (N, C) or (N, C, d1, ...) logits; target (N,) / (N, d1, ...) class indices, or
    class probabilities of the input's shape. log_softmax keeps it stable for large logits.
    """
    op = "cross_entropy"
    _check_float(op, input=input)
    if input.ndim < 2:
        raise ValueError(f"{op}: input must be (N, C, ...) logits, got shape {input.shape}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    q = _target_distribution(input, target, label_smoothing)
    return _reduce(-(q * log_softmax(input, 1)).sum(1), reduction, op)


def binary_cross_entropy_with_logits(input, target, reduction="mean"):
    """-(t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))), stable for any x.

    This is a two-class cross-entropy: the classes "0" and "1" have logits 0 and x
    (softmax([0, x]) = [1 - sigmoid(x), sigmoid(x)]) and the target is (1 - t, t).
    """
    t = _same_shape_target("binary_cross_entropy_with_logits", input, target)
    logits = ops.stack([Tensor(backend.array_module(input.data).zeros_like(input.data)), input], -1)
    q = ops.stack([1.0 - t, t], -1)
    return _reduce(-(q * log_softmax(logits, -1)).sum(-1), reduction, "binary_cross_entropy_with_logits")


def gaussian_kl(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) = 0.5 sum(mean^2 + exp(logvar) - 1 - logvar),
    summed over the non-batch dims and averaged over the batch (dim 0)."""
    if mean.shape != logvar.shape or mean.ndim == 0:
        raise ValueError(f"gaussian_kl: mean {mean.shape} and logvar {logvar.shape} must share one (N, ...) shape")
    per_element = 0.5 * (mean * mean + logvar.exp() - 1.0 - logvar)
    return per_element.reshape(mean.shape[0], -1).sum(1).mean()


def normalize(x, p=2.0, dim=1, eps=1e-12):
    """x / max(||x||_2, eps) along `dim` (PyTorch's F.normalize; only p=2): the one L2 normalisation."""
    if p != 2:
        raise ValueError(f"normalize: only p=2 is supported, got p={p}")
    return x / ((x * x).sum(dim, keepdim=True).clamp(min=eps * eps)).sqrt()


def contrastive_loss(image_embeds, text_embeds, logit_scale, positives=None):
    """CLIP's symmetric InfoNCE loss for N matching (image, text) pairs.

    Embeddings are L2-normalised, logits = exp(logit_scale) * img @ txt^T (N, N), and
    loss = (CE(logits, targets) + CE(logits^T, targets^T)) / 2. The targets are the
    diagonal (pair i matches pair i), or with `positives` (N, N) bool, each row's
    target is uniform over its positives (e.g. every image of the same digit).
    """
    op = "contrastive_loss"
    _check_float(op, image_embeds=image_embeds, text_embeds=text_embeds)
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"{op}: image_embeds {image_embeds.shape} and text_embeds {text_embeds.shape} must both be (N, E)"
        )
    n = image_embeds.shape[0]
    logit_scale = ops.as_tensor(logit_scale, image_embeds)
    logits = logit_scale.exp() * (normalize(image_embeds, dim=-1) @ normalize(text_embeds, dim=-1).T)
    xp = backend.array_module(image_embeds.data)
    if positives is None:
        targets = xp.arange(n)
        return (cross_entropy(logits, targets) + cross_entropy(logits.T, targets)) / 2
    pos = xp.asarray(positives.data if isinstance(positives, Tensor) else positives).astype(bool)
    if pos.shape != (n, n):
        raise ValueError(f"{op}: positives must be an ({n}, {n}) bool matrix, got shape {pos.shape}")
    if not (pos.any(axis=0).all() and pos.any(axis=1).all()):
        raise ValueError(f"{op}: every row and column of positives needs at least one True")
    rows = pos / pos.sum(axis=1, keepdims=True)
    cols = pos.T / pos.T.sum(axis=1, keepdims=True)
    return (cross_entropy(logits, rows.astype(logits.dtype)) + cross_entropy(logits.T, cols.astype(logits.dtype))) / 2


def perceptual_loss(input, target, features, weights=None):
    """Compare images by what a fixed network sees in them rather than pixel by pixel:

        L = sum_i w_i * mean((phi_i(input) - phi_i(target))^2)

    `features(x)` returns the feature maps phi_1(x), phi_2(x), ... of a trained network
    (e.g. DigitClassifier.feature_maps); `weights` (default all 1) one w_i per map. Pixel
    MSE is satisfied by a blurry average of the plausible images; matching features
    rewards strokes and edges where the network expects them. The target's features are
    computed without a graph; gradients flow through the network into `input`, and into
    the network's parameters too unless they are frozen (`net.requires_grad_(False)`).
    """
    op = "perceptual_loss"
    _check_float(op, input=input)
    target = _same_shape_target(op, input, target)
    mine = list(features(input))
    with no_grad():
        theirs = list(features(target))
    weights = [1.0] * len(mine) if weights is None else list(weights)
    if not mine or len(weights) != len(mine) or len(theirs) != len(mine):
        raise ValueError(f"{op}: features returned {len(mine)} maps for input and {len(theirs)} for target, "
                         f"with {len(weights)} weights: need at least one map and one weight per map")
    return sum(w * mse_loss(a, b) for w, a, b in zip(weights, mine, theirs))

__all__ = [
    "linear", "conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "interpolate", "pad",
    "group_norm", "layer_norm", "scaled_dot_product_attention", "relu", "sigmoid", "tanh", "softmax",
    "log_softmax", "silu", "gelu", "geglu", "dropout", "embedding", "mse_loss", "l1_loss", "cross_entropy",
    "binary_cross_entropy_with_logits", "gaussian_kl", "normalize", "contrastive_loss", "perceptual_loss",
]  # fmt: skip
