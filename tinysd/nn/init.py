"""Parameter initialisation, in place, with PyTorch's names and formulas.

Samples come from tinysd's global generator (`tinysd.manual_seed` makes a
model reproducible), drawn on the CPU and copied to the tensor's device.

Fans of a weight of shape (out, in, *kernel): fan_in = in * prod(kernel),
fan_out = out * prod(kernel). The bounds keep activations' variance roughly
constant from layer to layer:

    kaiming_uniform_:  U(-b, b), b = gain * sqrt(3 / fan),  gain = sqrt(2 / (1 + a^2))
    xavier_uniform_:   U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out))

With a = sqrt(5) (PyTorch's default for Linear and Conv) kaiming_uniform_
gives b = 1 / sqrt(fan_in).
"""

import math

import numpy as np

from .. import backend
from ..tensor import default_generator


def _fill(tensor, values):
    """Write NumPy `values` into `tensor` in place, in its dtype and on its device."""
    values = np.asarray(values).astype(tensor.dtype, copy=False)
    tensor.data[...] = backend.to_device(values, tensor.device)
    return tensor.bump_version_()


def uniform_(tensor, a=0.0, b=1.0):
    return _fill(tensor, default_generator().uniform(a, b, size=tensor.shape))


def normal_(tensor, mean=0.0, std=1.0):
    return _fill(tensor, default_generator().normal(mean, std, size=tensor.shape))


def constant_(tensor, value):
    tensor.data[...] = value
    return tensor.bump_version_()


def zeros_(tensor):
    return constant_(tensor, 0.0)


def ones_(tensor):
    return constant_(tensor, 1.0)


def calculate_fan_in_and_fan_out(tensor):
    if tensor.ndim < 2:
        raise ValueError(f"init: fan in and fan out need a tensor with at least 2 dims, got shape {tensor.shape}")
    receptive_field = math.prod(tensor.shape[2:])
    return tensor.shape[1] * receptive_field, tensor.shape[0] * receptive_field


def calculate_gain(nonlinearity, param=None):
    """The factor by which a nonlinearity shrinks the standard deviation, inverted."""
    if nonlinearity in ("linear", "conv2d", "conv_transpose2d", "sigmoid"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else param
        return math.sqrt(2.0 / (1 + slope**2))
    raise ValueError(f"calculate_gain: unknown nonlinearity {nonlinearity!r}")


def kaiming_uniform_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu"):
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"kaiming_uniform_: mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    fan = fan_in if mode == "fan_in" else fan_out
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / fan)
    return uniform_(tensor, -bound, bound)


def xavier_uniform_(tensor, gain=1.0):
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound)
