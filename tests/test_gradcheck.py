"""tinysd/gradcheck.py: it must catch wrong gradients, explain them, and trust only float64.

The wrong backward() passes below are the classic mistakes: a missing factor,
a forgotten transpose, one element off. A check with a uniform upstream
gradient (`.sum().backward()`) lets the transposition through; gradcheck's
random upstream gradient must not.
"""

import re

import numpy as np
import pytest

import tinysd
from tinysd.gradcheck import GradcheckError, gradcheck, numerical_grad
from tinysd.tensor import Function


class SquareMissingFactor(Function):
    """y = x^2 with backward g * x: the factor 2 is missing."""

    def forward(self, x):
        self.save_for_backward(x)
        return x * x

    def backward(self, g):
        return g * self.saved[0]


class TransposeForgotten(Function):
    """y = x^T (square x) with backward g: the transpose is missing."""

    def forward(self, x):
        return x.T

    def backward(self, g):
        return g


class MatMulForgotTranspose(Function):
    """y = a @ b with da = g @ b instead of g @ b^T (square b, so the shapes still fit)."""

    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a @ b

    def backward(self, g):
        a, b = self.saved
        return g @ b, a.T @ g


class OneElementOff(Function):
    """y = 3x with the gradient of element (1, 2) doubled."""

    def forward(self, x):
        return 3 * x

    def backward(self, g):
        dx = 3 * g
        dx[1, 2] *= 2
        return dx


def leaf(shape, seed=0, dtype=np.float64):
    return tinysd.tensor(np.random.default_rng(seed).standard_normal(shape).astype(dtype), requires_grad=True)


@pytest.mark.parametrize("mode", ["full", "directional"])
@pytest.mark.parametrize(
    "fn, inputs",
    [
        (SquareMissingFactor.apply, [(3, 4)]),
        (TransposeForgotten.apply, [(4, 4)]),
        (MatMulForgotTranspose.apply, [(2, 3), (3, 3)]),
        (OneElementOff.apply, [(3, 4)]),
    ],
    ids=["missing factor", "forgotten transpose", "matmul transpose", "one element off"],
)
def test_wrong_backward_is_caught_in_both_modes(fn, inputs, mode):
    with pytest.raises(GradcheckError, match="gradcheck failed"):
        gradcheck(fn, [leaf(s, seed=i) for i, s in enumerate(inputs)], mode=mode)


def test_a_forgotten_transpose_hides_from_a_uniform_upstream_gradient():
    """Why gradcheck uses a random upstream gradient: with all ones, x^T's wrong backward looks right."""
    x = leaf((4, 4))
    TransposeForgotten.apply(x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.ones((4, 4)))  # the true gradient of sum(x^T)
    with pytest.raises(GradcheckError):
        gradcheck(TransposeForgotten.apply, [x])


def test_failure_message_names_input_element_and_both_values():
    x, y = leaf((2, 2), seed=1), leaf((3, 4), seed=2)
    with pytest.raises(GradcheckError) as info:
        gradcheck(lambda a, b: a.sum() * OneElementOff.apply(b), [x, y], mode="full")
    message = str(info.value)
    assert "input 1" in message and "worst element (1, 2)" in message and "1 of 12 elements off" in message
    ours, numeric = map(float, re.search(r"backward gives (\S+), finite differences give (\S+),", message).groups())
    np.testing.assert_allclose(ours, 2 * numeric, rtol=1e-4)  # the doubled element


def test_directional_failure_message():
    with pytest.raises(GradcheckError) as info:
        gradcheck(SquareMissingFactor.apply, [leaf((5, 5))], mode="directional")
    message = str(info.value)
    assert "inputs [0] along a random direction" in message
    ours, numeric = map(float, re.search(r"backward gives (\S+), finite differences give (\S+),", message).groups())
    np.testing.assert_allclose(ours, numeric / 2, rtol=1e-4)


@pytest.mark.parametrize("mode", ["full", "directional", "auto"])
def test_correct_gradients_pass(mode):
    a, b, c = leaf((3, 4)), leaf((4, 2), seed=1), tinysd.tensor(np.arange(2.0))  # c is a constant
    assert gradcheck(lambda a, b, c: ((a @ b) * c).tanh(), [a, b, c], mode=mode) is True


def test_auto_mode_checks_large_inputs_along_a_direction():
    big = leaf((30, 30))  # 900 elements: over full_limit, so one directional check
    assert gradcheck(lambda x: (x @ x).sigmoid(), [big])
    with pytest.raises(GradcheckError, match="random direction"):
        gradcheck(SquareMissingFactor.apply, [big])


def test_refuses_float32_and_other_misuse():
    with pytest.raises(ValueError, match="input 1 is float32.*float64"):
        gradcheck(lambda a, b: a * b, [leaf(3), leaf(3, dtype=np.float32)])
    with pytest.raises(ValueError, match="no input has requires_grad"):
        gradcheck(lambda a: a * 2, [np.ones(3)])
    with pytest.raises(ValueError, match="unknown mode 'sideways'"):
        gradcheck(lambda a: a * 2, [leaf(3)], mode="sideways")


@pytest.mark.parametrize(
    "f, derivative",
    [
        (lambda x: (x**3).sum(), lambda x: 3 * x**2),
        (lambda x: np.sin(x).sum(), np.cos),
        (lambda x: np.exp(x).sum(), np.exp),
        (lambda x: np.prod(x), lambda x: np.prod(x) / x),
        (lambda x: (np.arange(x.size).reshape(x.shape) * x).sum(), lambda x: np.arange(x.size).reshape(x.shape)),
    ],
    ids=["cube", "sin", "exp", "product", "weights"],
)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_numerical_grad_matches_known_derivatives(f, derivative, layout):
    x = np.random.default_rng(0).uniform(0.5, 1.5, (3, 4))
    if layout == "transposed":  # a view in Fortran order must be perturbed element by element too
        x = x.T.copy().T
    np.testing.assert_allclose(numerical_grad(f, x), derivative(x), rtol=1e-7, atol=1e-8)


def test_numerical_grad_accepts_tensors_and_leaves_x_alone():
    x = tinysd.tensor(np.array([1.0, 2.0]))
    grad = numerical_grad(lambda a: tinysd.tensor(a).exp().sum(), x)  # f may return a Tensor
    np.testing.assert_allclose(grad, np.exp([1.0, 2.0]), rtol=1e-7)
    assert x.tolist() == [1.0, 2.0]
