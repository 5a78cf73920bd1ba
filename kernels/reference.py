"""Plain NumPy kernels: the readable specification of what every backend computes.

Written with `xp` (the array module of the input) so the same code also
serves as a correct, if slow, fallback for CuPy arrays.
"""

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
