"""Optimizers against updates computed by hand, clipping, EMA, schedules, exact resume, overfitting."""

import math

import numpy as np
import pytest

import tinysd
import tinysd.nn.functional as F
from tinysd import io, nn, optim

P0 = np.array([1.0, -2.0, 0.5])
GRADS = [np.array([0.5, -1.0, 2.0]), np.array([-0.1, 0.3, 0.2]), np.array([0.05, 0.05, -0.4])]


def run_steps(opt_cls, dtype=np.float64, device="cpu", **kwargs):
    """Apply GRADS in turn with the optimizer; return the parameter after each step."""
    p = nn.Parameter(tinysd.tensor(P0.copy(), dtype=dtype, device=device))  # (a Parameter shares its array)
    opt = opt_cls([p], **kwargs)
    history = []
    for g in GRADS:
        opt.zero_grad()
        p.grad = tinysd.tensor(g, dtype=dtype, device=device)
        opt.step()
        history.append(p.numpy().copy())
    return history


def test_sgd_plain_by_hand():
    history = run_steps(optim.SGD, lr=0.1)
    np.testing.assert_allclose(history[0], [0.95, -1.9, 0.3])
    np.testing.assert_allclose(history[2], P0 - 0.1 * sum(GRADS))


@pytest.mark.parametrize(
    "momentum, dampening, weight_decay, nesterov",
    [(0.9, 0.0, 0.0, False), (0.9, 0.5, 0.0, False), (0.8, 0.0, 0.1, True), (0.0, 0.0, 0.1, False)],
)
def test_sgd_momentum_nesterov_weight_decay_by_hand(momentum, dampening, weight_decay, nesterov):
    lr = 0.1
    history = run_steps(
        optim.SGD, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov
    )
    p, buf = P0.copy(), None
    for g, got in zip(GRADS, history):
        d = g + weight_decay * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
        np.testing.assert_allclose(got, p, rtol=1e-12)


def test_sgd_first_momentum_step_by_hand():
    # step 1: buf = g; step 2: buf = 0.9 g1 + g2, so p2 = p1 - lr * buf
    history = run_steps(optim.SGD, lr=1.0, momentum=0.9)
    np.testing.assert_allclose(history[0], P0 - GRADS[0])
    np.testing.assert_allclose(history[1], history[0] - (0.9 * GRADS[0] + GRADS[1]))


def adamw_by_hand(lr, betas, eps, weight_decay, amsgrad):
    p, m, v, vmax, out = P0.copy(), 0.0, 0.0, 0.0, []
    for t, g in enumerate(GRADS, start=1):
        p = p * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g**2
        vmax = np.maximum(vmax, v)
        v_used = vmax if amsgrad else v
        m_hat, v_hat = m / (1 - betas[0] ** t), v_used / (1 - betas[1] ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p)
    return out


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_by_hand(amsgrad, device):
    kwargs = dict(lr=0.1, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.05, amsgrad=amsgrad)
    history = run_steps(optim.AdamW, device=device, **kwargs)
    for got, expected in zip(history, adamw_by_hand(**kwargs)):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_adamw_first_step_is_lr_times_sign():
    # with bias correction, m_hat = g and v_hat = g^2 at t = 1: the step is lr * g / (|g| + eps)
    history = run_steps(optim.AdamW, lr=0.01, weight_decay=0.0)
    np.testing.assert_allclose(history[0], P0 - 0.01 * np.sign(GRADS[0]), rtol=1e-6)


def test_amsgrad_changes_the_update():
    assert not np.allclose(
        run_steps(optim.AdamW, lr=0.1, betas=(0.8, 0.9), amsgrad=True)[2],
        run_steps(optim.AdamW, lr=0.1, betas=(0.8, 0.9), amsgrad=False)[2],
    )


def test_adamw_float32_stays_float32():
    history = run_steps(optim.AdamW, dtype=np.float32, lr=0.1)
    assert history[-1].dtype == np.float32
    np.testing.assert_allclose(
        history[-1], adamw_by_hand(0.1, (0.9, 0.999), 1e-8, 1e-2, False)[-1], rtol=1e-5
    )


def test_optimizer_skips_parameters_without_grad_and_validates():
    a, b = nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2))
    opt = optim.SGD([a, b, a], lr=0.5)  # duplicates count once
    assert len(opt.params) == 2
    a.grad = tinysd.tensor(np.ones(2))
    opt.step()
    assert np.array_equal(a.data, [0.5, 0.5]) and np.array_equal(b.data, [1.0, 1.0])
    opt.zero_grad()
    assert a.grad is None
    with pytest.raises(ValueError, match="empty"):
        optim.AdamW([])
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD([a], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.AdamW([a], betas=(1.0, 0.9))


def test_clip_grad_norm():
    a, b = nn.Parameter(np.zeros(1)), nn.Parameter(np.zeros(2))
    a.grad, b.grad = tinysd.tensor(np.array([3.0])), tinysd.tensor(np.array([0.0, 4.0]))
    assert optim.clip_grad_norm_([a, b], max_norm=10.0) == pytest.approx(5.0)
    assert np.array_equal(b.grad.data, [0.0, 4.0])  # under the limit: untouched
    assert optim.clip_grad_norm_([a, b], max_norm=1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(a.grad.data, [0.6], rtol=1e-5)
    np.testing.assert_allclose(b.grad.data, [0.0, 0.8], rtol=1e-5)
    assert optim.clip_grad_norm_([nn.Parameter(np.zeros(1))], 1.0) == 0.0


# ---- schedules ------------------------------------------------------------------------------
def test_warmup_cosine_values():
    lr = lambda step: optim.warmup_cosine_lr(step, 1.0, warmup_steps=10, total_steps=110, min_lr=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.1)
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0) and lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # halfway down the cosine
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    values = [lr(s) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(values, values[1:]))


def test_one_cycle_values_match_pytorch_formula():
    lr = lambda step: optim.one_cycle_lr(step, max_lr=1.0, total_steps=100)  # noqa: E731
    assert lr(0) == pytest.approx(1.0 / 25)
    assert lr(29) == pytest.approx(1.0)  # peak at pct_start * total - 1
    assert lr(99) == pytest.approx(1.0 / 25 / 1e4)
    assert lr(64) == pytest.approx((1.0 + 4e-6) / 2)  # halfway down: the mean of max and final
    start = 1 / 25
    assert lr(14.5) == pytest.approx(start + (1 - start) / 2)  # halfway up


def test_schedule_objects_set_the_optimizer_lr():
    p = nn.Parameter(np.zeros(1))
    opt = optim.SGD([p], lr=0.5)
    sched = optim.WarmupCosine(opt, warmup_steps=2, total_steps=6)
    assert opt.lr == pytest.approx(0.25) and sched.get_lr() == opt.lr
    sched.step()
    assert opt.lr == pytest.approx(0.5)
    for _ in range(10):
        sched.step()
    assert opt.lr == pytest.approx(0.0)
    assert [sched.lr_at(s) for s in (0, 1)] == [pytest.approx(0.25), pytest.approx(0.5)]

    cycle = optim.OneCycle(opt, max_lr=2.0, total_steps=10)
    assert opt.lr == pytest.approx(2.0 / 25)
    cycle.step(), cycle.step()
    saved = cycle.state_dict()
    fresh = optim.OneCycle(optim.SGD([p], lr=1.0), max_lr=2.0, total_steps=10)
    fresh.load_state_dict(saved)
    assert fresh.optimizer.lr == opt.lr == pytest.approx(cycle.lr_at(2))


# ---- EMA ----------------------------------------------------------------------------------------
def test_ema_math_and_swapping():
    model = nn.Linear(2, 1)
    w0 = model.weight.data.copy()
    ema = optim.EMA(model, decay=0.9, warmup=False)
    model.weight.data[...] = 1.0
    ema.update(model)
    expected = 0.9 * w0 + 0.1 * 1.0
    np.testing.assert_allclose(ema.shadow["weight"], expected, rtol=1e-6)
    model.weight.data[...] = 3.0
    ema.update(model)
    expected = 0.9 * expected + 0.1 * 3.0
    np.testing.assert_allclose(ema.shadow["weight"], expected, rtol=1e-6)

    with ema.average_parameters(model):
        np.testing.assert_allclose(model.weight.data, expected, rtol=1e-6)
    assert np.all(model.weight.data == 3.0)  # own weights back

    state = ema.state_dict()
    other = optim.EMA(nn.Linear(2, 1), decay=0.9, warmup=False)
    other.load_state_dict(state)
    assert other.num_updates == 2
    other.copy_to(model)
    np.testing.assert_allclose(model.weight.data, expected, rtol=1e-6)


def test_ema_warmup_decay():
    ema = optim.EMA(nn.Linear(1, 1), decay=0.999)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.num_updates += 1
    assert decays == [pytest.approx(0.1), pytest.approx(2 / 11), pytest.approx(3 / 12)]
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999
    with pytest.raises(ValueError, match="EMA"):
        ema.copy_to(nn.Linear(2, 1))  # shapes differ
    with pytest.raises(ValueError, match="EMA"):
        ema.copy_to(nn.Sequential(nn.Linear(1, 1)))  # names differ


# ---- exact resume through a safetensors file ------------------------------------------------
def make_problem(seed):
    tinysd.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))
    rng = np.random.default_rng(seed)
    x, y = tinysd.tensor(rng.standard_normal((16, 4))), tinysd.tensor(rng.standard_normal((16, 2)))
    return model, x.float(), y.float()


def train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda params: optim.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True),
        lambda params: optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    ],
    ids=["adamw", "sgd"],
)
def test_resume_is_bit_exact(tmp_path, make_opt):
    straight, x, y = make_problem(0)
    opt = make_opt(straight.parameters())
    train(straight, opt, x, y, 6)

    first, _, _ = make_problem(0)
    opt = make_opt(first.parameters())
    train(first, opt, x, y, 3)
    io.save_checkpoint(tmp_path / "ckpt.safetensors", first, opt, step=3)

    resumed, _, _ = make_problem(1)  # different initial weights, fully overwritten by the load
    opt2 = make_opt(resumed.parameters())
    opt2.lr = 123.0  # the learning rate comes back from the file too
    meta = io.load_checkpoint(tmp_path / "ckpt.safetensors", resumed, opt2)
    assert meta["step"] == "3" and opt2.lr == opt.lr
    train(resumed, opt2, x, y, 3)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert np.array_equal(a.data, b.data), name


def test_optimizer_load_state_dict_errors():
    model, x, y = make_problem(0)
    opt = optim.AdamW(model.parameters())
    train(model, opt, x, y, 1)
    state = opt.state_dict()
    assert state["state.0.step"] == 1 and state["state.0.exp_avg"].shape == (8, 4)
    with pytest.raises(ValueError, match="unexpected key 'state.0.momentum_buffer'"):
        opt.load_state_dict(dict(state, **{"state.0.momentum_buffer": np.zeros((8, 4))}))
    with pytest.raises(ValueError, match=r"state.0.exp_avg has shape \(4, 8\), parameter \(8, 4\)"):
        opt.load_state_dict(dict(state, **{"state.0.exp_avg": np.zeros((4, 8))}))
    with pytest.raises(ValueError, match="parameter 9"):
        opt.load_state_dict(dict(state, **{"state.9.step": np.array(1)}))


# ---- overfitting a fixed batch ---------------------------------------------------------------
def test_small_mlp_overfits_a_batch():
    model, x, y = make_problem(3)
    opt = optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < first / 100


def test_small_cnn_overfits_a_batch():
    tinysd.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 4),
    )
    rng = np.random.default_rng(0)
    x = tinysd.tensor(rng.standard_normal((8, 1, 8, 8)).astype(np.float32))
    labels = tinysd.tensor(np.arange(8) % 4)
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optim.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        first = first or loss.item()
    assert loss.item() < first / 100
    assert math.isfinite(loss.item())
