"""Version counters: changing in place a tensor an op saved for backward makes backward raise,
naming the op, instead of returning a gradient computed from the new values."""

import numpy as np
import pytest

import tinysd
from tinysd import nn, optim


def leaf(*shape):
    return tinysd.randn(*shape, requires_grad=True)


def test_setitem_on_a_saved_input_is_caught():
    w = leaf(3)
    x = tinysd.randn(3)
    y = (w * x).sum()  # Mul saved x
    x[0] = 100.0
    with pytest.raises(RuntimeError, match=r"backward: Mul saved its input 1 of shape \(3,\) for its backward, "
                                           r"and it was changed in place since \(version 0 then, 1 now"):
        y.backward()


def test_zero_on_a_saved_input_is_caught():
    w = leaf(2, 3)
    x = tinysd.randn(3, 4)
    y = (w @ x).sum()
    x.zero_()
    with pytest.raises(RuntimeError, match="backward: MatMul saved its input 1"):
        y.backward()


def test_a_parameter_updated_under_no_grad_before_backward_is_caught():
    model = nn.Linear(3, 2)
    loss = (model(tinysd.randn(4, 3)) ** 2).mean()
    with tinysd.no_grad():
        model.weight -= 0.1  # in place, as in PyTorch
    with pytest.raises(RuntimeError, match="saved its input 1 of shape .* changed in place"):
        loss.backward()


def test_an_optimizer_step_between_forward_and_backward_is_caught():
    model = nn.Linear(3, 2)
    opt = optim.SGD(model.parameters(), lr=0.1)
    first = (model(tinysd.randn(4, 3)) ** 2).mean()
    second = (model(tinysd.randn(4, 3)) ** 2).mean()
    first.backward()
    opt.step()  # changes the weights second's graph saved
    with pytest.raises(RuntimeError, match="changed in place"):
        second.backward()


def test_a_saved_output_changed_through_a_view_is_caught():
    x = leaf(2, 3)
    y = x.exp()  # Exp saves its output
    with tinysd.no_grad():
        y.reshape(6)[0] = 0.0  # a view shares the counter of the tensor it views
    with pytest.raises(RuntimeError, match="saved its output"):
        y.sum().backward()


def test_detach_shares_the_counter():
    w = leaf(3)
    y = (w * w).sum()
    w.detach().zero_()
    with pytest.raises(RuntimeError, match="changed in place"):
        y.backward()


def test_changes_to_tensors_nothing_saved_do_not_raise_and_gradients_stay_right():
    w = leaf(3)
    x = tinysd.randn(3)
    y = (w + x).sum()  # Add saves nothing
    x[0] = 100.0
    y.backward()
    assert np.array_equal(w.grad.numpy(), np.ones(3, np.float32))
    z = leaf(3)
    loss = z.sum() * 2.0
    with tinysd.no_grad():
        z += 1.0  # Sum saved nothing of z
    loss.backward()
    assert np.allclose(z.grad.numpy(), 2.0)


def test_in_place_ops_bump_the_version_and_keep_dtype_and_shape():
    x = tinysd.zeros(2, 3)
    v = x._version[0]
    x += 1.0
    x *= tinysd.ones(3)
    x -= 0.5
    x /= 2.0
    assert x._version[0] == v + 4 and x.dtype == np.float32 and np.allclose(x.numpy(), 0.25)
    with pytest.raises(RuntimeError, match=r"x \+= y: the result has shape \(2, 2, 3\)"):
        x += tinysd.ones(2, 1, 1)


def test_in_place_on_a_parameter_while_recording_is_refused_and_on_a_non_leaf_is_out_of_place():
    w = leaf(3)
    with pytest.raises(RuntimeError, match=r"x \+= y: x is a leaf tensor that requires grad"):
        w += 1.0
    y = w * 2.0
    before = y
    y += 1.0  # recorded out of place: the gradient flows through it
    assert y is not before
    y.sum().backward()
    assert np.allclose(w.grad.numpy(), 2.0)


def test_a_normal_training_step_raises_nothing():
    model = nn.Linear(3, 2)
    opt = optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = (model(tinysd.randn(4, 3)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.weight._version[0] >= 3


def test_group_norm_watches_its_bias_only_when_fused_with_silu():
    """The bias is saved (and so watched) only by the fused GroupNorm + SiLU, whose backward rebuilds
    the normalised values; a plain group norm's gradient does not read it."""
    for with_silu, raises in ((False, False), (True, True)):
        norm = nn.GroupNorm(2, 4)
        loss = norm(tinysd.randn(3, 4, 5), with_silu=with_silu).sum()
        with tinysd.no_grad():
            norm.bias += 1.0
        if raises:
            with pytest.raises(RuntimeError, match="GroupNorm saved its input 2 of shape \\(4,\\)"):
                loss.backward()
        else:
            loss.backward()
