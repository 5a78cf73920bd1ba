"""The Tensor API and the autograd engine of tinysd/tensor.py.

The engine: deep graphs, gradient accumulation over reused nodes, no_grad,
freeing the graph after backward(), and the errors for misuse. The API:
properties, conversions, creation functions and seeding.
"""

import numpy as np
import pytest

import tinysd
from tinysd.tensor import Function, check_same_device


def leaf(values, dtype=np.float64):
    return tinysd.tensor(np.array(values, dtype), requires_grad=True)


# ---- the engine ---------------------------------------------------------------------------
def test_an_intermediate_no_op_saved_is_freed_before_backward():
    import weakref

    x = leaf(np.ones((3, 3)))
    h = x + 1.0  # Add saves nothing: only the next op's inputs could keep h's values alive
    values = weakref.ref(h.data)
    y = (h + 1.0) * 2.0 + h  # h used twice: its two gradients must still add up
    del h
    assert values() is None, "the graph kept the values of an intermediate no op saved"
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.data, np.full((3, 3), 3.0))


def test_deep_chain_runs_backward_without_recursion():
    x = leaf(1.0)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.backward()
    np.testing.assert_allclose(x.grad.item(), 1.0001**10_000, rtol=1e-9)


FREE_DEEP_GRAPH = """
import gc, sys, weakref
import tinysd
gc.disable()  # the graph must go by reference counting alone, the moment the last reference drops
sys.setrecursionlimit(1000)  # a recursive free of 50,000 nodes would need 50 times this
y = tinysd.tensor(1.0, requires_grad=True)
for i in range(50_000):
    y = y + 1.0
    if i == 0:
        first = weakref.ref(y._ctx)  # the op next to the leaf: the last one a free reaches
del y
assert first() is None, "the graph outlived its last reference"
print("freed")
"""


def test_deep_graph_never_differentiated_is_freed_without_recursion():
    # In a child process: a recursive free could overflow the C stack and kill this one, and an
    # exception raised while freeing (a RecursionError in a __del__) is only printed, not raised.
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", FREE_DEEP_GRAPH], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "freed", done.stderr[-2000:]
    assert "Exception ignored" not in done.stderr and "Error" not in done.stderr, done.stderr[-2000:]


def test_reused_nodes_accumulate_their_gradients():
    x = leaf([1.0, -2.0, 3.0])
    (x * x + x).sum().backward()  # d/dx (x^2 + x) = 2x + 1
    assert x.grad.tolist() == [3.0, -3.0, 7.0]

    x.grad = None
    a = x * 2.0  # a diamond: a feeds two branches that meet again
    (a * a + a.exp()).sum().backward()  # d/dx = 2 * (2a + e^a)
    np.testing.assert_allclose(x.grad.numpy(), 2 * (2 * x.numpy() * 2 + np.exp(2 * x.numpy())))


def test_gradients_add_up_over_backward_calls_and_broadcasting():
    x = leaf([[1.0], [2.0]])  # (2, 1) broadcast against (3,)
    y = leaf([1.0, 2.0, 3.0])
    (x * y).sum().backward()
    (x * y).sum().backward()  # a second graph: .grad accumulates, as in PyTorch
    assert x.grad.shape == (2, 1) and x.grad.tolist() == [[12.0], [12.0]]
    assert y.grad.shape == (3,) and y.grad.tolist() == [6.0, 6.0, 6.0]


def test_leaf_gradients_are_independent_writable_arrays():
    x, y = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    upstream = np.array([1.0, 1.0])
    (x + y).backward(upstream)  # Add passes the same array to both inputs
    x.grad.zero_()  # an optimizer may scale or zero a gradient in place
    assert y.grad.tolist() == [1.0, 1.0] and upstream.tolist() == [1.0, 1.0]
    x.sum().backward()  # Sum's gradient is a read-only broadcast view
    x.grad.data *= 2
    assert x.grad.tolist() == [2.0, 2.0]
    z = leaf([[1.0, 2.0]])
    z.reshape(2).backward(upstream)  # Reshape's gradient is a view of the caller's array
    z.grad.data += 1
    row = np.ones((1, 2))
    z.backward(row)  # the caller's array reaches a leaf unchanged
    z.grad.data += 1
    assert upstream.tolist() == [1.0, 1.0] and row.tolist() == [[1.0, 1.0]] and z.grad.tolist() == [[4.0, 4.0]]


def test_a_fresh_gradient_array_becomes_grad_without_a_copy():
    fresh = []

    class Twice(Function):
        def forward(self, x):
            return 2 * x

        def backward(self, g):
            fresh.append(2 * g)
            return fresh[-1]

    x = leaf([1.0, 2.0])
    Twice.apply(x).backward(np.ones(2))
    assert x.grad.data is fresh[0]
    z = leaf([[1.0, 2.0]])
    Twice.apply(z.reshape(2)).backward(np.ones(2))  # reshape's backward: a view of a fresh array
    assert z.grad.data.base is fresh[1]


def test_leaves_given_views_of_one_array_get_separate_gradients():
    a, b = leaf([1.0, 2.0]), leaf([3.0])
    (tinysd.cat([a, b]) * 2).backward(np.ones(3))  # cat's backward: views of one fresh array
    a.grad.data += 1
    b.grad.data += 10
    assert a.grad.tolist() == [3.0, 3.0] and b.grad.tolist() == [12.0]


def test_a_gradient_of_the_wrong_shape_is_refused_naming_the_function():
    class Broadcasts(Function):
        def forward(self, a, b):
            return a + b

        def backward(self, g):
            return g, g  # forgot ops.unbroadcast: b of shape (1,) gets a gradient of shape (2,)

    with pytest.raises(RuntimeError, match=r"backward: Broadcasts returned a gradient of shape \(2,\) for its input 1"):
        Broadcasts.apply(leaf([1.0, 2.0]), leaf([3.0])).sum().backward()


def test_broadcasting_ops_sum_their_gradient_back_with_unbroadcast():
    g = np.arange(24.0).reshape(2, 3, 4)
    assert tinysd.ops.unbroadcast(g, (3, 1)).tolist() == g.sum(axis=(0, 2)).reshape(3, 1).tolist()
    x, b = leaf([[1.0], [2.0], [3.0]]), leaf([1.0, 2.0, 3.0, 4.0])
    (x + b).backward(np.ones((3, 4)))
    assert x.grad.tolist() == [[4.0], [4.0], [4.0]] and b.grad.tolist() == [3.0] * 4


def test_only_leaves_keep_gradients():
    x = leaf([1.0, 2.0])
    h = x * 3.0
    h.sum().backward()
    assert x.is_leaf and not h.is_leaf
    assert h.grad is None and x.grad.tolist() == [3.0, 3.0]


def test_needs_input_grad_tells_backward_what_to_skip():
    seen = []

    class Scale(Function):
        def forward(self, a, b):
            self.save_for_backward(a, b)
            return a * b

        def backward(self, g):
            seen.append(self.needs_input_grad)
            a, b = self.saved
            return (g * b if self.needs_input_grad[0] else None), (g * a if self.needs_input_grad[1] else None)

    x, c = leaf([2.0]), tinysd.tensor(np.array([5.0]))
    Scale.apply(x, c).sum().backward()
    assert seen == [(True, False)] and x.grad.tolist() == [5.0] and c.grad is None


def test_no_grad_builds_no_graph():
    x = leaf([1.0, 2.0])
    with tinysd.no_grad():
        assert not tinysd.is_grad_enabled()
        y = (x * 2).exp().sum()
        with tinysd.enable_grad():
            z = x * 2
    assert not y.requires_grad and y._ctx is None and z.requires_grad
    assert tinysd.is_grad_enabled()
    with pytest.raises(ZeroDivisionError), tinysd.no_grad():
        1 / 0
    assert tinysd.is_grad_enabled()  # restored even after an exception


def test_graph_is_freed_after_backward():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match=r"Sum .*\(\).*already freed.*retain_graph=True"):
        y.backward()


def test_retain_graph_allows_a_second_backward():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    assert x.grad.tolist() == [4.0, 8.0]  # twice 2x


def test_backward_misuse_raises_clear_errors():
    x = leaf([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(RuntimeError, match=r"\(2, 2\).*pass grad="):
        (x * 2).backward()  # a non-scalar output needs an explicit upstream gradient
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 2\)"):
        (x * 2).backward(np.ones(3))
    with pytest.raises(RuntimeError, match=r"\(2, 2\) does not require grad"):
        tinysd.ones(2, 2).backward(np.ones((2, 2)))
    (x * 2).backward(tinysd.ones(2, 2, dtype=np.float64))
    assert x.grad.tolist() == [[2.0, 2.0], [2.0, 2.0]]


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_only_float_tensors_can_require_grad(dtype):
    with pytest.raises(RuntimeError, match=f"floating-point.*{np.dtype(dtype).name}.*\\(2,\\)"):
        tinysd.tensor([1, 0], dtype=dtype, requires_grad=True)
    with pytest.raises(RuntimeError, match="floating-point"):
        tinysd.zeros(2, dtype=dtype).requires_grad_()


def test_in_place_assignment_is_refused_while_recording():
    x = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match="in-place"):
        x[0] = 5.0
    with tinysd.no_grad():
        x[0] = 5.0
    assert x.tolist() == [5.0, 2.0]


# ---- devices ------------------------------------------------------------------------------
class FakeTensor:
    def __init__(self, shape, device):
        self.shape, self.device = shape, device


def test_mixing_devices_is_refused_with_op_shapes_and_devices():
    with pytest.raises(RuntimeError) as info:
        check_same_device("Add", [FakeTensor((2, 3), "cpu"), FakeTensor((3,), "cuda")])
    message = str(info.value)
    assert all(word in message for word in ("Add", "(2, 3) on cpu", "(3,) on cuda")), message
    check_same_device("Add", [FakeTensor((2,), "cpu"), FakeTensor((2,), "cpu")])  # one device: fine


@pytest.mark.skipif(not tinysd.cuda.is_available(), reason="CuPy or a GPU is absent")
def test_mixing_real_devices_and_moving_between_them():
    x = leaf([1.0, 2.0])
    g = x.to("cuda")
    assert g.device == "cuda" and g.requires_grad
    with pytest.raises(RuntimeError, match=r"on one device.*cpu.*cuda"):
        x + g
    (g * g).sum().backward()
    assert x.grad.device == "cpu" and x.grad.tolist() == [2.0, 4.0]


@pytest.mark.skipif(tinysd.cuda.is_available(), reason="a GPU is present")
def test_asking_for_cuda_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="cuda.*not available"):
        tinysd.ones(2).to("cuda")
    with pytest.raises(RuntimeError, match="cuda.*not available"):
        tinysd.zeros(2, device="cuda")


def test_device_names():
    x = tinysd.ones(2)
    assert x.device == "cpu" and x.to("cpu") is x and x.cpu() is x
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        x.to("tpu")


# ---- the Tensor API ------------------------------------------------------------------------
def test_properties():
    x = tinysd.tensor(np.arange(6.0).reshape(2, 3))
    assert x.shape == (2, 3) and x.ndim == 2 and x.dim() == 2 and len(x) == 2
    assert x.size == 6 and x.numel() == 6  # size is NumPy's attribute, numel() PyTorch's method
    assert x.dtype == np.float64 and x.device == "cpu"
    assert not x.requires_grad and x.grad is None and x.is_leaf


def test_conversions():
    x = tinysd.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    assert isinstance(x.numpy(), np.ndarray) and x.numpy().tolist() == x.tolist()
    assert x[1, 2].item() == 5.0 and float(x[0, 1]) == 1.0 and int(x[1, 0]) == 3 and bool(x[0, 1])
    with pytest.raises(ValueError, match=r"item\(\).*\(2, 3\)"):
        x.item()
    with pytest.raises(RuntimeError, match="ambiguous"):
        bool(x)
    d = x.detach()
    assert not d.requires_grad and d._ctx is None and d.data is x.data  # same values, no graph


def test_zero_dim_results_hold_zero_dim_arrays():
    x = leaf([1.0, 2.0])
    for t in (x.sum(), x.max(), x[0], (x * x).sum()):
        assert t.shape == () and isinstance(t.numpy(), np.ndarray)
    s = x.sum()
    s.backward()
    assert isinstance(x.grad.numpy(), np.ndarray)


def test_repr():
    assert repr(tinysd.tensor([1.5, 2.0])) == "tensor([1.5, 2. ], dtype=float32)"
    r = repr(leaf([1.0]))
    assert r.startswith("tensor([1.]") and "float64" in r and "requires_grad=True" in r


@pytest.mark.parametrize(
    "data, dtype, expected",
    [
        (1.5, None, np.float32),  # Python floats become float32, as in PyTorch
        ([1.0, 2.0], None, np.float32),
        ([[1, 2]], None, np.int64),
        ([True, False], None, np.bool_),
        (np.zeros(2, np.float64), None, np.float64),  # arrays keep their dtype
        (np.zeros(2, np.float32), None, np.float32),
        (np.zeros(2, np.int32), None, np.int32),
        ([1, 2], np.float64, np.float64),
        (np.zeros(2), "float32", np.float32),
    ],
)
def test_tensor_from_data(data, dtype, expected):
    t = tinysd.tensor(data, dtype=dtype)
    assert t.dtype == expected and t.shape == np.shape(data) and not t.requires_grad
    np.testing.assert_array_equal(t.numpy(), np.asarray(data))


def test_tensor_from_a_tensor_and_requires_grad():
    a = tinysd.tensor(np.arange(3.0))
    b = tinysd.tensor(a, requires_grad=True)
    assert b.requires_grad and b.is_leaf and b.dtype == np.float64 and b.tolist() == [0.0, 1.0, 2.0]


def test_creation_functions():
    assert tinysd.zeros(2, 3).shape == (2, 3) and tinysd.zeros((2, 3)).dtype == np.float32
    assert tinysd.ones(4).tolist() == [1.0] * 4 and tinysd.ones((), dtype=np.float64).dtype == np.float64
    assert tinysd.full((2, 2), 7.0).tolist() == [[7.0, 7.0], [7.0, 7.0]]
    assert tinysd.zeros(3, requires_grad=True).requires_grad
    r = tinysd.randn(3, 4, dtype=np.float64)
    assert r.shape == (3, 4) and r.dtype == np.float64 and tinysd.randn(5).dtype == np.float32
    assert tinysd.arange(4).tolist() == [0, 1, 2, 3] and tinysd.arange(4).dtype == np.int64
    assert tinysd.arange(1, 7, 2).tolist() == [1, 3, 5]
    assert tinysd.arange(0, 1, 0.25).tolist() == [0.0, 0.25, 0.5, 0.75] and tinysd.arange(0, 1, 0.5).dtype == np.float32


def test_like_functions_copy_shape_dtype_and_device():
    t = tinysd.tensor(np.ones((2, 3), np.float64))
    for made in (tinysd.zeros_like(t), tinysd.ones_like(t), tinysd.randn_like(t), tinysd.full_like(t, 2.5)):
        assert made.shape == (2, 3) and made.dtype == np.float64 and made.device == "cpu"
    assert tinysd.zeros_like(t).tolist() == [[0.0] * 3] * 2 and tinysd.full_like(t, 2.5).numpy().max() == 2.5
    assert tinysd.ones_like(t, dtype=np.float32).dtype == np.float32


def test_manual_seed_makes_random_tensors_reproducible():
    def draw():
        return tinysd.randn(5).numpy(), tinysd.rand(3).numpy(), tinysd.randint(0, 100, (4,)).numpy()

    tinysd.manual_seed(123)
    first = draw()
    tinysd.manual_seed(123)
    second = draw()
    tinysd.manual_seed(124)
    third = draw()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], third[0])


def test_numpy_array_on_the_left_gives_a_tensor():
    x = leaf([1.0, 2.0])
    y = np.array([3.0, 4.0]) * x + np.array([1.0, 1.0])
    assert isinstance(y, tinysd.Tensor)
    y.sum().backward()
    assert x.grad.tolist() == [3.0, 4.0]
