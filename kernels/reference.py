"""Plain NumPy kernels: the readable specification of what every backend computes.

Written with `xp` (the array module of the input) so the same code also
serves as a correct, if slow, fallback for CuPy arrays. Every other backend
(numba_cpu, cupy_gpu) defines the same functions and is tested against these.

Conventions: images are NCHW; stride, padding, dilation, kernel, scale and
output_padding are (h, w) pairs of ints; outputs have the input's dtype.
"""

import math

from tinysd.backend import array_module


# ---- softmax ----------------------------------------------------------------
def softmax(x, axis):
    """y_i = exp(x_i - m) / sum_j exp(x_j - m), with m = max_j x_j (no overflow)."""
    xp = array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_backward(dy, y, axis):
    """dx = y * (dy - sum(dy * y))."""
    return y * (dy - (dy * y).sum(axis=axis, keepdims=True))


def log_softmax(x, axis):
    """y = (x - m) - log(sum exp(x - m))."""
    xp = array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def log_softmax_backward(dy, y, axis):
    """dx = dy - exp(y) * sum(dy)."""
    xp = array_module(y)
    return dy - xp.exp(y) * dy.sum(axis=axis, keepdims=True)


# ---- linear layers ------------------------------------------------------------
def linear(x, w, b):
    """y = x W^T + b on rows: x (M, in), W (out, in), b (out,) or None -> y (M, out)."""
    y = x @ w.T
    if b is not None:
        y += b
    return y


def linear_grad_input(dy, w):
    """dL/dx of linear: dx = dY W, (M, out) (out, in) -> (M, in)."""
    return dy @ w


def linear_grad_weight(dy, x):
    """dL/dW of linear: dW = dY^T x, a sum over the M rows -> (out, in)."""
    return dy.T @ x


# ---- sliding windows: im2col and its adjoint col2im --------------------------
def conv_output_size(size, kernel, stride, padding, dilation):
    """Number of window positions along one axis: (size + 2p - d (k - 1) - 1) // s + 1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def im2col(x, kernel, stride, padding, dilation, pad_value=0.0):
    """All sliding windows of x (N, C, H, W) -> cols (N, C, KH, KW, HO, WO).

    cols[n, c, i, j, a, b] = xpad[n, c, a*sh + i*dh, b*sw + j*dw], where xpad is x
    padded by (ph, pw) with `pad_value`. One strided slice per kernel offset (i, j):
    the loop runs KH*KW times, each step moves a whole (N, C, HO, WO) block.
    """
    xp = array_module(x)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    n, c, h, w = x.shape
    ho = conv_output_size(h, kh, sh, ph, dh)
    wo = conv_output_size(w, kw, sw, pw, dw)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"window {tuple(kernel)} (dilation {tuple(dilation)}) does not fit the padded input {x.shape} "
            f"with padding {tuple(padding)}"
        )
    xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    cols = xp.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dh, j * dw
            cols[:, :, i, j] = xpad[:, :, top : top + sh * (ho - 1) + 1 : sh, left : left + sw * (wo - 1) + 1 : sw]
    return cols


def col2im(cols, x_shape, stride, padding, dilation):
    """The adjoint of im2col: add every window entry back where it came from.

    dx[n, c, y, x] = sum of cols[n, c, i, j, a, b] over all (i, j, a, b) with
    a*sh + i*dh - ph = y and b*sw + j*dw - pw = x. Entries that fell on the
    padding are dropped.
    """
    xp = array_module(cols)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c, kh, kw, ho, wo = cols.shape
    _, _, h, w = x_shape
    xpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dh, j * dw
            xpad[:, :, top : top + sh * (ho - 1) + 1 : sh, left : left + sw * (wo - 1) + 1 : sw] += cols[:, :, i, j]
    return xpad[:, :, ph : ph + h, pw : pw + w]


# ---- convolution --------------------------------------------------------------
def _check_conv(op, x_shape, w_shape, groups):
    n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    if c % groups or o % groups or cg != c // groups:
        raise ValueError(
            f"{op}: input shape {tuple(x_shape)} and weight shape {tuple(w_shape)} do not match for groups={groups} "
            f"(need C % groups == 0, O % groups == 0, weight.shape[1] == C // groups)"
        )


def _grouped_cols(x, w_shape, stride, padding, dilation, groups):
    """im2col of x viewed per group: (N, G, C/G * KH * KW, HO * WO), and (HO, WO)."""
    cols = im2col(x, w_shape[2:], stride, padding, dilation)
    n, c, kh, kw, ho, wo = cols.shape
    return cols.reshape(n, groups, (c // groups) * kh * kw, ho * wo), (ho, wo)


def conv2d(x, w, stride, padding, dilation, groups, bias=None):
    """2-D cross-correlation (what deep learning calls convolution), zero padding.

    y[n, o, a, b] = sum_{c in group(o), i, j} w[o, c, i, j] * xpad[n, c, a*sh + i*dh, b*sw + j*dw] (+ bias[o])
    x (N, C, H, W), w (O, C/G, KH, KW), bias (O,) or None -> y (N, O, HO, WO). As a matrix
    product per group g: Y_g (O/G, HO*WO) = W_g (O/G, C/G*KH*KW) @ cols_g (C/G*KH*KW, HO*WO).
    """
    xp = array_module(x)
    _check_conv("conv2d", x.shape, w.shape, groups)
    cols, (ho, wo) = _grouped_cols(x, w.shape, stride, padding, dilation, groups)
    wg = w.reshape(groups, w.shape[0] // groups, -1)
    y = xp.matmul(wg[None], cols).reshape(x.shape[0], w.shape[0], ho, wo)  # (N, G, O/G, HO*WO) as NCHW
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


def conv2d_grad_input(dy, w, x_shape, stride, padding, dilation, groups):
    """dL/dx of conv2d: the adjoint of x -> conv2d(x, w).

    cols_g = W_g^T @ dY_g per group, then col2im adds each window entry back
    onto the input position it was read from.
    """
    xp = array_module(dy)
    _check_conv("conv2d_grad_input", x_shape, w.shape, groups)
    n, o, ho, wo = dy.shape
    kh, kw = w.shape[2:]
    wg = w.reshape(groups, o // groups, -1)
    dyg = dy.reshape(n, groups, o // groups, ho * wo)
    cols = xp.matmul(wg.transpose(0, 2, 1)[None], dyg)  # (N, G, C/G*KH*KW, HO*WO)
    cols = cols.reshape(n, x_shape[1], kh, kw, ho, wo)
    return col2im(cols, x_shape, stride, padding, dilation)


def conv2d_grad_weight(dy, x, w_shape, stride, padding, dilation, groups):
    """dL/dw of conv2d: dW_g = sum_n dY_g[n] @ cols_g[n]^T (per group)."""
    xp = array_module(dy)
    _check_conv("conv2d_grad_weight", x.shape, w_shape, groups)
    cols, (ho, wo) = _grouped_cols(x, w_shape, stride, padding, dilation, groups)
    n, o = dy.shape[:2]
    if dy.shape != (n, o, ho, wo):
        raise ValueError(f"conv2d_grad_weight: dy shape {dy.shape} does not match output shape {(n, o, ho, wo)}")
    dyg = dy.reshape(n, groups, o // groups, ho * wo)
    dw = xp.matmul(dyg, cols.transpose(0, 1, 3, 2)).sum(axis=0)  # (G, O/G, C/G*KH*KW)
    return dw.reshape(w_shape)


def conv_transpose2d_shape(x_shape, w_shape, stride, padding, output_padding, dilation, groups):
    """Output shape of conv_transpose2d: (N, C_out, HO, WO), HO = (H - 1) sh - 2 ph + dh (KH - 1) + oph + 1."""
    n, c_in, h, wd = x_shape
    if w_shape[0] != c_in:
        raise ValueError(f"conv_transpose2d: input shape {tuple(x_shape)} needs weight.shape[0] == {c_in}, "
                         f"got weight shape {tuple(w_shape)}")
    (kh, kw), (sh, sw), (ph, pw), (oph, opw), (dh, dw) = w_shape[2:], stride, padding, output_padding, dilation
    if not (0 <= oph < max(sh, dh) and 0 <= opw < max(sw, dw)):
        raise ValueError(f"conv_transpose2d: output_padding {tuple(output_padding)} must be smaller than "
                         f"stride {tuple(stride)} or dilation {tuple(dilation)}")
    ho = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
    wo = (wd - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"conv_transpose2d: input {tuple(x_shape)} with weight {tuple(w_shape)}, stride {tuple(stride)} "
                         f"and padding {tuple(padding)} gives an empty output ({ho}, {wo})")
    return (n, w_shape[1] * groups, ho, wo)


def conv_transpose2d(x, w, stride, padding, output_padding, dilation, groups):
    """Transposed convolution (PyTorch semantics): the adjoint of conv2d with weight w.

    x (N, C_in, H, W), w (C_in, C_out/G, KH, KW) -> y (N, C_out, HO, WO) with
    HO = (H - 1) sh - 2 ph + dh (KH - 1) + oph + 1. It is conv2d_grad_input of the
    conv2d that maps a (N, C_out, HO, WO) input to x's shape with weight w.
    """
    y_shape = conv_transpose2d_shape(x.shape, w.shape, stride, padding, output_padding, dilation, groups)
    return conv2d_grad_input(x, w, y_shape, stride, padding, dilation, groups)


# ---- pooling and upsampling ---------------------------------------------------
def max_pool2d(x, kernel, stride, padding):
    """y[n, c, a, b] = max over the window at (a*sh - ph, b*sw - pw) of size kernel (padding is -inf).

    argmax[n, c, a, b] = flat index y * W + x (into the H*W plane) of the first maximum in
    row-major window order, never a padding position; a NaN counts as the maximum (as in PyTorch).
    """
    xp = array_module(x)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    cols = im2col(x, kernel, stride, padding, (1, 1), pad_value=-xp.inf)
    ho, wo = cols.shape[-2:]
    cols = cols.reshape(n, c, kh * kw, ho, wo)
    k = cols.argmax(axis=2)  # window offset i * KW + j of the first maximum
    y = xp.take_along_axis(cols, k[:, :, None], axis=2)[:, :, 0]
    # a window whose real values are all -inf ties with its padding: take its first real element
    real = im2col(xp.ones((1, 1, h, w), x.dtype), kernel, stride, padding, (1, 1)).reshape(kh * kw, ho, wo)
    k = xp.where(y == -xp.inf, real.argmax(axis=0), k)
    rows = xp.arange(ho).reshape(ho, 1) * sh - ph + k // kw
    columns = xp.arange(wo).reshape(1, wo) * sw - pw + k % kw
    return y, (rows * w + columns).astype(xp.int64)


def max_pool2d_backward(dy, argmax, x_shape, kernel, stride, padding):
    """dx[n, c, p] = sum of dy[n, c, a, b] over the outputs whose argmax is p."""
    xp = array_module(dy)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    w = x_shape[3]
    ho, wo = dy.shape[-2:]
    # window offset (i, j) of each argmax, then col2im of dy placed at that offset
    i = argmax // w - (xp.arange(ho).reshape(ho, 1) * sh - ph)
    j = argmax % w - (xp.arange(wo).reshape(1, wo) * sw - pw)
    cols = xp.zeros(dy.shape[:2] + (kh, kw) + dy.shape[2:], dtype=dy.dtype)
    for a in range(kh):
        for b in range(kw):
            cols[:, :, a, b] = xp.where((i == a) & (j == b), dy, 0)
    return col2im(cols, x_shape, stride, padding, (1, 1))


def avg_pool2d(x, kernel, stride, padding):
    """y = mean of each KH x KW window of the zero-padded x (count_include_pad=True)."""
    cols = im2col(x, kernel, stride, padding, (1, 1))
    return cols.mean(axis=(2, 3))


def avg_pool2d_backward(dy, x_shape, kernel, stride, padding):
    """Each window element receives dy / (KH * KW)."""
    xp = array_module(dy)
    kh, kw = kernel
    cols = xp.broadcast_to((dy / (kh * kw))[:, :, None, None], dy.shape[:2] + (kh, kw) + dy.shape[2:])
    return col2im(cols, x_shape, stride, padding, (1, 1))


def upsample_nearest2d(x, scale):
    """y[n, c, i, j] = x[n, c, i // sh, j // sw]."""
    xp = array_module(x)
    sh, sw = scale
    return xp.repeat(xp.repeat(x, sh, axis=2), sw, axis=3)


def upsample_nearest2d_backward(dy, scale):
    """dx[n, c, i, j] = sum of the sh x sw block of dy that x[n, c, i, j] was copied to."""
    sh, sw = scale
    n, c, h, w = dy.shape
    return dy.reshape(n, c, h // sh, sh, w // sw, sw).sum(axis=(3, 5))


# ---- normalisation ------------------------------------------------------------
def _normalize_rows(xr, eps):
    """Rows of xr (..., K) -> (xhat, mean, rstd): xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps)."""
    xp = array_module(xr)
    mean = xr.mean(axis=-1)
    var = ((xr - mean[..., None]) ** 2).mean(axis=-1)  # biased: divide by K
    rstd = 1.0 / xp.sqrt(var + eps)
    return (xr - mean[..., None]) * rstd[..., None], mean, rstd


def _normalize_rows_backward(dxhat, xhat, rstd):
    """dL/dx of xhat = (x - mean) * rstd over rows:

    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
    """
    return rstd[..., None] * (
        dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    )


def _channel_shape(x):
    """Shape that broadcasts a per-channel (C,) vector against x (N, C, *spatial)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def group_norm(x, num_groups, weight, bias, eps, with_silu=False):
    """Normalise each (sample, group of C/G channels) over its channels and positions.

    y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]; mean and var (biased) per
    (n, g); with_silu: silu(y) instead (a ResNet block's norm and activation as one op).
    Returns y, mean (N, G), rstd (N, G).
    """
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels (input shape {x.shape}) are not divisible by {num_groups} groups")
    mean, rstd = _normalize_rows(x.reshape(n, num_groups, -1), eps)[1:]
    y = _group_norm_affine(x, mean, rstd, weight, bias, num_groups)
    return (silu(y) if with_silu else y).astype(x.dtype, copy=False), mean, rstd


def _group_norm_affine(x, mean, rstd, weight, bias, num_groups):
    """(x - mean) * rstd * weight[c] + bias[c], with mean and rstd (N, G) of the groups."""
    n = x.shape[0]
    y = ((x.reshape(n, num_groups, -1) - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    if weight is not None:
        y = y * weight.reshape(_channel_shape(x))
    if bias is not None:
        y = y + bias.reshape(_channel_shape(x))
    return y


def group_norm_backward(dy, x, mean, rstd, weight, num_groups, bias=None, with_silu=False):
    """dx by the row formula on each (n, g); dweight[c] = sum dy * xhat, dbias[c] = sum dy (over n and positions).
    with_silu: dy is the gradient of silu(y); first dy <- silu'(y) dy, y rebuilt from x, mean, rstd, weight, bias."""
    n, c = x.shape[:2]
    if with_silu:
        dy = silu_backward(dy, _group_norm_affine(x, mean, rstd, weight, bias, num_groups))
    xhat = (x.reshape(n, num_groups, -1) - mean[..., None]) * rstd[..., None]
    dxhat = dy if weight is None else dy * weight.reshape(_channel_shape(x))
    dx = _normalize_rows_backward(dxhat.reshape(n, num_groups, -1), xhat, rstd).reshape(x.shape)
    if weight is None:
        return dx, None, None
    per_channel = dy.reshape(n, c, -1)
    dweight = (per_channel * xhat.reshape(n, c, -1)).sum(axis=(0, 2))
    dbias = per_channel.sum(axis=(0, 2))
    return dx, dweight, dbias


def layer_norm(x, weight, bias, eps):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis of x (M, D)."""
    y, mean, rstd = _normalize_rows(x, eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, mean, rstd


def layer_norm_backward(dy, x, mean, rstd, weight):
    """dx by the row formula; dweight = sum_m dy * xhat, dbias = sum_m dy."""
    xhat = (x - mean[:, None]) * rstd[:, None]
    dxhat = dy if weight is None else dy * weight
    dx = _normalize_rows_backward(dxhat, xhat, rstd)
    if weight is None:
        return dx, None, None
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


# ---- attention ----------------------------------------------------------------
def attention_bias(mask, sq, sk, is_causal, like):
    """What attention adds to the scores: the additive mask (or 0), and -inf above the
    diagonal when causal (key j > query i). Shape (1 or the mask's batch, Sq, Sk), like's dtype."""
    xp = array_module(like)
    bias = xp.zeros((1, sq, sk), like.dtype) if mask is None else mask
    if is_causal:
        bias = xp.where(xp.tril(xp.ones((sq, sk), dtype=bool)), bias, -xp.inf).astype(like.dtype)
    return bias


def attention_scores(q, k, mask, scale, is_causal):
    """s = scale * q @ k^T + attention_bias(mask, is_causal), (B, H, Sq, Sk): a (B * H)-batch mask is
    indexed by b * H + h."""
    xp = array_module(q)
    s = scale * xp.matmul(q, xp.swapaxes(k, -1, -2))
    bias = attention_bias(mask, s.shape[-2], s.shape[-1], is_causal, q)
    return s + (bias if bias.shape[0] == 1 else bias.reshape(s.shape))


def _probabilities(s, lse):
    """p = exp(s - lse); a row whose keys are all masked (lse = -inf) gets p = 0."""
    xp = array_module(s)
    return xp.exp(s - xp.where(xp.isfinite(lse), lse, 0)[..., None])


def attention(q, k, v, mask, scale, is_causal):
    """Scaled dot-product attention: out = softmax(s) @ v with s = scale q k^T + mask.

    q (B, H, Sq, D), k (B, H, Sk, D), v (B, H, Sk, Dv): batch entries of H heads each, any strides;
    mask (1 or B * H, Sq, Sk), or None. -> out (B, H, Sq, Dv) and lse (B, H, Sq) = log sum_j exp(s_ij),
    which is all backward needs to rebuild the probabilities p_ij = exp(s_ij - lse_i). A query that
    sees no key outputs 0.
    """
    xp = array_module(q)
    s = attention_scores(q, k, mask, scale, is_causal)
    m = s.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    lse = xp.log(xp.exp(s - m).sum(axis=-1)) + m[..., 0]
    return xp.matmul(_probabilities(s, lse), v).astype(q.dtype, copy=False), lse.astype(q.dtype, copy=False)


def attention_backward(dout, q, k, v, out, lse, mask, scale, is_causal):
    """Gradients of attention from the saved out and lse (p is recomputed):

    dv = p^T dout;  dp = dout v^T;  ds = p * (dp - rowsum(dout * out));
    dq = scale ds k;  dk = scale ds^T q.
    """
    xp = array_module(q)
    p = _probabilities(attention_scores(q, k, mask, scale, is_causal), lse)
    dv = xp.matmul(xp.swapaxes(p, -1, -2), dout)
    dp = xp.matmul(dout, xp.swapaxes(v, -1, -2))
    ds = p * (dp - (dout * out).sum(axis=-1, keepdims=True))
    dq = scale * xp.matmul(ds, k)
    dk = scale * xp.matmul(xp.swapaxes(ds, -1, -2), q)
    return dq.astype(q.dtype, copy=False), dk.astype(q.dtype, copy=False), dv


# ---- activations --------------------------------------------------------------
def sigmoid(x):
    """sigmoid(x) = 1 / (1 + e^-x), without overflow: e = exp(-|x|) lies in (0, 1], and
    sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) below (exact in both tails).
    The one formula of sigmoid: ops.sigmoid calls it for every backend."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def silu(x):
    """silu(x) = x * sigmoid(x)."""
    return x * sigmoid(x)


def silu_backward(dy, x):
    """d silu / dx = s (1 + x (1 - s)), s = sigmoid(x)."""
    s = sigmoid(x)
    return dy * s * (1.0 + x * (1.0 - s))


def erf(x):
    """The error function, elementwise (NumPy has none: math.erf per element; CuPy: cupyx)."""
    xp = array_module(x)
    if xp.__name__ == "numpy":
        return xp.vectorize(math.erf, otypes=[x.dtype])(x)
    from cupyx.scipy.special import erf as cupy_erf

    return cupy_erf(x)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_C = 0.044715


def gelu(x, approximate):
    """gelu(x) = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2  ("none"), or the tanh approximation
    x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2  ("tanh")."""
    xp = array_module(x)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + xp.tanh(_SQRT_2_OVER_PI * (x + _TANH_C * x**3)))
    if approximate == "none":
        return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu_backward(dy, x, approximate):
    """"none": Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi).
    "tanh": (1 + t) / 2 + x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2) / 2, t = tanh(...)."""
    xp = array_module(x)
    if approximate == "tanh":
        t = xp.tanh(_SQRT_2_OVER_PI * (x + _TANH_C * x**3))
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * x * x))
    if approximate == "none":
        cdf = 0.5 * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))
        pdf = xp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return dy * (cdf + x * pdf)
    raise ValueError(f"gelu_backward: approximate must be 'none' or 'tanh', got {approximate!r}")


def geglu(x, approximate):
    """a * gelu(b) for x = [a, b], its last dim split in halves (GEGLU, Shazeer 2020): (..., 2D) -> (..., D)."""
    half = x.shape[-1] // 2
    return x[..., :half] * gelu(x[..., half:], approximate)


def geglu_backward(dy, x, approximate):
    """dx = [da, db] = [dy gelu(b), dy a gelu'(b)] for x = [a, b]."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return array_module(x).concatenate([dy * gelu(b, approximate), gelu_backward(dy * a, b, approximate)], axis=-1)


# ---- optimiser ----------------------------------------------------------------
def adamw_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW update, in place (PyTorch's formula; `step` counts from 1):

    param *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    (amsgrad: vmax = max(vmax, v), used instead of v)
    param -= lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)
    """
    xp = array_module(param)
    param *= 1.0 - lr * weight_decay
    exp_avg *= beta1
    exp_avg += (1.0 - beta1) * grad
    exp_avg_sq *= beta2
    exp_avg_sq += (1.0 - beta2) * grad * grad
    v = exp_avg_sq
    if max_exp_avg_sq is not None:
        xp.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    step_size = lr / (1.0 - beta1**step)
    denom = xp.sqrt(v) / math.sqrt(1.0 - beta2**step) + eps
    param -= step_size * exp_avg / denom
