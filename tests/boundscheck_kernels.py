"""Run every Numba kernel once on small shapes and compare it with the reference.

    NUMBA_BOUNDSCHECK=1 NUMBA_CACHE_DIR=$(mktemp -d) python tests/boundscheck_kernels.py

tests/test_boundscheck.py runs this in a child process: with bounds checking on, an index
out of range raises IndexError instead of reading a neighbour's memory (or crashing by
luck), and a fresh cache folder makes Numba compile the kernels again with the checks in.
Prints one line per kernel call, then "checked N calls".
"""

import numba
import numpy as np
from numba import config, njit

from kernels import numba_cpu as nb
from kernels import reference as ref


@njit
def _read_past_the_end(a):
    return a[a.shape[0]]


def checks_are_on():
    try:
        _read_past_the_end(np.zeros(3))
    except IndexError:
        return True
    return False


def randn(rng, *shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def same(name, got, expected, tol=1e-9):
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for g, e in zip(got, expected):
        if e is None:
            assert g is None, name
        else:
            np.testing.assert_allclose(g, e, rtol=tol, atol=tol, err_msg=name)
    print("ok", name)


def small_budgets(module, *names):
    """A runner of fn() with the module's byte budgets or size limits `names` (where it has them) at 0: the
    kernels' paths for large inputs, on small ones."""
    def run(fn):
        saved = {name: getattr(module, name) for name in names if hasattr(module, name)}
        try:
            for name in saved:
                setattr(module, name, 0)
            return fn()
        finally:
            for name, value in saved.items():
                setattr(module, name, value)
    return run


def conv_calls(rng, dtype=np.float64):
    for x_shape, w_shape, stride, padding, dilation, groups in [
        ((2, 3, 7, 6), (4, 3, 3, 2), (1, 1), (1, 0), (1, 1), 1),
        ((1, 4, 9, 8), (6, 2, 3, 3), (2, 3), (2, 1), (2, 1), 2),
        ((2, 2, 5, 5), (2, 1, 1, 1), (2, 2), (0, 0), (1, 1), 2),
        ((5, 2, 3, 3), (2, 2, 1, 1), (1, 1), (0, 0), (1, 1), 1),  # chunks of 3 samples: the last one short
        ((2, 1, 5, 6), (3, 1, 3, 3), (1, 1), (1, 2), (1, 1), 1),  # one channel, 3x3: direct loops
        ((3, 1, 4, 3), (2, 1, 3, 3), (1, 1), (0, 1), (1, 1), 1),
        ((2, 3, 5, 4), (4, 3, 3, 3), (1, 1), (2, 1), (1, 1), 1),  # few channels, 3x3: direct loops (width limit off)
    ]:
        x, w = randn(rng, *x_shape, dtype=dtype), randn(rng, *w_shape, dtype=dtype)
        args = stride, padding, dilation, groups
        y = ref.conv2d(x, w, *args)
        dy = randn(rng, *y.shape, dtype=dtype)
        bias = randn(rng, w_shape[0], dtype=dtype)
        yield "conv2d", lambda m: m.conv2d(x, w, *args)
        yield "conv2d with bias", lambda m: m.conv2d(x, w, *args, bias)
        yield "conv2d (bands of rows)", lambda m: small_budgets(m, "_CACHE_BYTES", "_BAND_BYTES")(
            lambda: m.conv2d(x, w, *args, bias))
        yield "conv2d_grad_input", lambda m: m.conv2d_grad_input(dy, w, x.shape, *args)
        yield "conv2d + grad_input (direct 3x3, any width)", lambda m: small_budgets(m, "_DIRECT_MIN_WIDTH")(
            lambda: (m.conv2d(x, w, *args, bias), m.conv2d_grad_input(dy, w, x.shape, *args)))
        yield "conv2d_grad_weight", lambda m: m.conv2d_grad_weight(dy, x, w.shape, *args)
        wt = randn(rng, w_shape[0], w_shape[1], *w_shape[2:], dtype=dtype)
        yield "conv_transpose2d", lambda m: m.conv_transpose2d(dy, wt, stride, padding, (0, 0), dilation, groups)


def winograd_calls(rng, dtype=np.float64):
    for x_shape, w_shape, padding in [((2, 3, 5, 6), (4, 3, 3, 3), (1, 1)), ((3, 2, 4, 3), (2, 2, 3, 3), (0, 2))]:
        x, w = randn(rng, *x_shape, dtype=dtype), randn(rng, *w_shape, dtype=dtype)
        bias = randn(rng, w_shape[0], dtype=dtype)
        args = (1, 1), padding, (1, 1), 1
        dy = randn(rng, *ref.conv2d(x, w, *args).shape, dtype=dtype)
        any_size = ("_WINOGRAD_MIN_CHANNELS", "_WINOGRAD_MIN_PRODUCT")  # limits at 0: F(2x2, 3x3) for these too
        yield "conv2d (Winograd)", lambda m: small_budgets(m, *any_size)(lambda: m.conv2d(x, w, *args, bias))
        yield "conv2d_grad_input (Winograd)", lambda m: small_budgets(m, *any_size)(
            lambda: m.conv2d_grad_input(dy, w, x.shape, *args))
        yield "conv2d_grad_weight (Winograd)", lambda m: small_budgets(m, *any_size)(
            lambda: m.conv2d_grad_weight(dy, x, w.shape, *args))


def linear_calls(rng, dtype=np.float64):
    x, w, b, dy = (randn(rng, *shape, dtype=dtype) for shape in ((9, 5), (4, 5), (4,), (9, 4)))
    yield "linear", lambda m: m.linear(x, w, b)
    yield "linear", lambda m: m.linear(x, w, None)
    yield "linear_grad_input", lambda m: m.linear_grad_input(dy, w)
    yield "linear_grad_weight", lambda m: m.linear_grad_weight(dy, x)


def pool_calls(rng):
    for kernel, stride, padding in [((2, 2), (2, 2), (0, 0)), ((3, 2), (1, 2), (1, 1)), ((3, 3), (2, 1), (1, 0))]:
        x = randn(rng, 2, 3, 7, 5)
        y, argmax = ref.max_pool2d(x, kernel, stride, padding)
        dy = randn(rng, *y.shape)
        yield "max_pool2d", lambda m: m.max_pool2d(x, kernel, stride, padding)[0]
        yield "max_pool2d_backward", lambda m: m.max_pool2d_backward(
            dy, m.max_pool2d(x, kernel, stride, padding)[1], x.shape, kernel, stride, padding)
        yield "avg_pool2d", lambda m: m.avg_pool2d(x, kernel, stride, padding)
        yield "avg_pool2d_backward", lambda m: m.avg_pool2d_backward(dy, x.shape, kernel, stride, padding)
    x = randn(rng, 2, 3, 3, 4)
    dy = randn(rng, 2, 3, 6, 12)
    yield "upsample_nearest2d", lambda m: m.upsample_nearest2d(x, (2, 3))
    yield "upsample_nearest2d_backward", lambda m: m.upsample_nearest2d_backward(dy, (2, 3))


def norm_calls(rng):
    for affine in (True, False):
        x, dy = randn(rng, 2, 6, 3, 5), randn(rng, 2, 6, 3, 5)
        weight, bias = (randn(rng, 6), randn(rng, 6)) if affine else (None, None)
        _, mean, rstd = ref.group_norm(x, 3, weight, bias, 1e-5)
        for with_silu in (False, True):
            yield "group_norm", lambda m, s=with_silu: m.group_norm(x, 3, weight, bias, 1e-5, s)
            yield "group_norm_backward", lambda m, s=with_silu: m.group_norm_backward(dy, x, mean, rstd, weight, 3, bias, s)
        x2, dy2 = randn(rng, 5, 7), randn(rng, 5, 7)
        w2, b2 = (randn(rng, 7), randn(rng, 7)) if affine else (None, None)
        _, mean2, rstd2 = ref.layer_norm(x2, w2, b2, 1e-5)
        yield "layer_norm", lambda m: m.layer_norm(x2, w2, b2, 1e-5)
        yield "layer_norm_backward", lambda m: m.layer_norm_backward(dy2, x2, mean2, rstd2, w2)


def softmax_calls(rng):
    for shape, axis in (((3, 5), 1), ((4, 3, 2), 0), ((2, 3, 4), 1)):
        x, dy = randn(rng, *shape), randn(rng, *shape)
        y, ly = ref.softmax(x, axis), ref.log_softmax(x, axis)
        yield "softmax", lambda m: m.softmax(x, axis)
        yield "softmax_backward", lambda m: m.softmax_backward(dy, y, axis)
        yield "log_softmax", lambda m: m.log_softmax(x, axis)
        yield "log_softmax_backward", lambda m: m.log_softmax_backward(dy, ly, axis)


def attention_calls(rng):
    for sq, sk, is_causal, masked in ((3, 5, False, False), (4, 4, True, False), (3, 6, False, True)):
        q = randn(rng, 2, sq, 2, 4).transpose(0, 2, 1, 3)  # (B, H, S, D) heads of a projection: a view
        k, v = randn(rng, 2, 2, sk, 4), randn(rng, 2, 2, sk, 3)
        mask = np.where(rng.random((4, sq, sk)) < 0.3, -np.inf, 0.0) if masked else None
        if masked:
            mask[:, :, 0] = 0.0
        out, lse = ref.attention(q, k, v, mask, 0.5, is_causal)
        dout = randn(rng, *out.shape)
        yield "attention", lambda m: m.attention(q, k, v, mask, 0.5, is_causal)
        yield "attention (bands of queries, threads)", lambda m: small_budgets(
            m, "_ATTENTION_CHUNK_BYTES", "_ATTENTION_BAND_BYTES")(lambda: m.attention(q, k, v, mask, 0.5, is_causal))
        yield "attention_backward", lambda m: m.attention_backward(dout, q, k, v, out, lse, mask, 0.5, is_causal)


def geglu_calls(rng, dtype=np.float64):
    x, dy = randn(rng, 3, 1030, dtype=dtype), randn(rng, 3, 515, dtype=dtype)  # halves of two runs, the last short
    for approximate in ("none", "tanh"):
        yield "geglu", lambda m: m.geglu(x, approximate)
        yield "geglu_backward", lambda m: m.geglu_backward(dy, x, approximate)


def elementwise_calls(rng):
    x, dy = randn(rng, 37) * 4, randn(rng, 37)
    yield "silu", lambda m: m.silu(x)
    yield "silu_backward", lambda m: m.silu_backward(dy, x)
    for approximate in ("none", "tanh"):
        yield "gelu", lambda m: m.gelu(x, approximate)
        yield "gelu_backward", lambda m: m.gelu_backward(dy, x, approximate)
    yield from geglu_calls(rng)
    for amsgrad in (False, True):
        state = [randn(rng, 5, 7) for _ in range(3)] + [np.abs(randn(rng, 5, 7))]
        state.append(np.abs(randn(rng, 5, 7)) if amsgrad else None)

        def step(m, state=state):
            arrays = [None if a is None else a.copy() for a in state]
            m.adamw_step(*arrays[:5], 3, 1e-2, 0.9, 0.999, 1e-8, 0.01)
            return tuple(a for a in arrays if a is not None)

        yield "adamw_step", step


def main():
    assert config.BOUNDSCHECK, "run with NUMBA_BOUNDSCHECK=1"
    assert checks_are_on(), "Numba's bounds checks are off"
    rng = np.random.default_rng(0)
    count, names = 0, set()
    for calls in (conv_calls, winograd_calls, linear_calls, pool_calls, norm_calls, softmax_calls, attention_calls,
                  elementwise_calls):
        for name, call in calls(rng):
            same(name, call(nb), call(ref))
            count, names = count + 1, names | {name}
    # float32 on one thread: where NumPy's OpenBLAS is found, the compiled chunk loops (blas.product)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        for calls in (conv_calls, winograd_calls, linear_calls, geglu_calls):
            for name, call in calls(rng, np.float32):
                same(f"{name} (float32, one thread)", call(nb), call(ref), tol=1e-4)
                count += 1
    finally:
        numba.set_num_threads(threads)
    public = {n for n in dir(nb) if not n.startswith("_") and callable(getattr(nb, n)) and hasattr(ref, n)}
    public -= {"conv_output_size", "get_num_threads", "set_num_threads", "njit", "prange", "vectorize"}
    missing = public - names
    assert not missing, f"kernels never run under bounds checking: {sorted(missing)}"
    print(f"checked {count} calls")


if __name__ == "__main__":
    main()
