"""Modules: parameter discovery, names, state dicts, modes, devices, layers, initialisation."""

import math

import numpy as np
import pytest

import tinysd
from tinysd import io, nn
from tinysd.nn import init


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(tinysd.relu(self.norm(x)))


class Nested(nn.Module):
    """Parameters held directly, in lists, in dicts, in lists of dicts; one shared parameter and module."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(np.ones(3, np.float32))
        self.layers = [nn.Linear(3, 3), nn.Linear(3, 2)]
        self.heads = {"a": nn.Linear(2, 1), "b": [nn.Parameter(np.zeros(2, np.float32))]}
        self.tied = self.scale  # the same Parameter again: counted once
        self.again = self.layers[0]  # the same module again: counted once
        self._private = nn.Linear(5, 5)  # "_" attributes are not walked
        self.not_a_param = tinysd.zeros(4)  # a plain Tensor without register_buffer is not state
        self.config = [1, 2, "three"]  # non-module values are ignored


def test_parameters_found_by_walking_attributes_in_definition_order():
    m = Nested()
    names = [n for n, _ in m.named_parameters()]
    assert names == [
        "scale", "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
        "heads.a.weight", "heads.a.bias", "heads.b.0",
    ]
    params = m.parameters()
    assert len(params) == len({id(p) for p in params}) == 8
    assert params[0] is m.scale
    assert m.num_parameters() == 3 + 12 + 8 + 3 + 2
    assert [n for n, _ in m.named_modules()] == ["", "layers.0", "layers.1", "heads.a"]
    assert [n for n, _ in m.named_children()] == ["layers.0", "layers.1", "heads.a"]


def test_containers_name_their_items_by_index_and_key():
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(seq) == 3 and isinstance(seq[1], nn.ReLU)
    assert isinstance(seq[:2], nn.Sequential) and len(seq[:2]) == 2
    assert seq(tinysd.randn(4, 2)).shape == (4, 1)
    ml = nn.ModuleList([nn.Linear(1, 1)]).append(nn.Linear(1, 2))
    assert [n for n, _ in ml.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    md = nn.ModuleDict({"enc": nn.Linear(1, 1)})
    md["dec"] = nn.Linear(1, 1, bias=False)
    assert list(md.state_dict()) == ["enc.weight", "enc.bias", "dec.weight"]
    assert "dec" in md and list(md.keys()) == ["enc", "dec"]


def test_sequential_runs_group_norm_then_silu_as_one_fused_op(monkeypatch):
    """nn.Sequential fuses a GroupNorm followed by a SiLU (not a SiLU after anything else): the same
    values and gradients as the two modules one after the other."""
    import tinysd.nn.functional as F

    rng = np.random.default_rng(0)
    seq = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.SiLU()).double()
    for p in seq.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    x = tinysd.tensor(rng.standard_normal((3, 2, 5, 5)), requires_grad=True)
    calls = []
    monkeypatch.setattr(F, "group_norm", lambda *a, f=F.group_norm: calls.append(a[-1]) or f(*a))
    fused = seq(x)
    assert calls == [True]  # with_silu, the last positional argument
    fused.sum().backward()
    grads = [t.grad.numpy().copy() for t in (x, *seq.parameters())]
    x.grad = None
    seq.zero_grad()
    plain = x
    for m in seq:
        plain = m(plain)
    np.testing.assert_allclose(fused.numpy(), plain.numpy(), rtol=1e-12)
    plain.sum().backward()
    for g, t in zip(grads, (x, *seq.parameters())):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_module_without_super_init_still_works():
    class Bare(nn.Module):
        def __init__(self):  # forgot super().__init__()
            self.lin = nn.Linear(2, 2)

    m = Bare()
    assert m.training and len(m.parameters()) == 2
    m.eval()
    assert not m.training and not m.lin.training


def test_state_dict_round_trips_through_safetensors_bit_exactly(tmp_path):
    tinysd.manual_seed(1)
    a = nn.Sequential(Block(), nn.Conv2d(4, 2, 1))
    a.register_buffer("step_count", np.array([7], dtype=np.int64))
    path = tmp_path / "model.safetensors"
    io.save_file(a.state_dict(), path)
    tinysd.manual_seed(2)
    b = nn.Sequential(Block(), nn.Conv2d(4, 2, 1))
    b.register_buffer("step_count", np.array([0], dtype=np.int64))
    assert not np.array_equal(a[0].conv.weight.data, b[0].conv.weight.data)
    params_before = b.parameters()
    result = b.load_state_dict(io.load_file(path))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(p is q for p, q in zip(params_before, b.parameters()))  # copied in place
    for key, value in a.state_dict().items():
        assert np.array_equal(value.data, b.state_dict()[key].data), key
        assert value.data.dtype == b.state_dict()[key].data.dtype
    x = tinysd.randn(2, 4, 5, 5)
    assert np.array_equal(a(x).data, b(x).data)


def test_load_state_dict_accepts_tensors_and_copies():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert b.weight.data is not a.weight.data
    assert np.array_equal(a.weight.data, b.weight.data)


class Small(nn.Module):
    def __init__(self, channels=64):
        super().__init__()
        self.conv_in = nn.Conv2d(4, channels, 3)
        self.out = nn.Linear(2, 2)


def test_load_state_dict_errors_name_keys_and_shapes():
    model = Small(64)
    state = {k: v.numpy() for k, v in model.state_dict().items()}

    missing = {k: v for k, v in state.items() if k != "out.bias"}
    with pytest.raises(RuntimeError, match=r"load_state_dict: missing keys \['out.bias'\]"):
        model.load_state_dict(missing)

    extra = dict(state, **{"extra.weight": np.zeros(1)})
    with pytest.raises(RuntimeError, match=r"unexpected keys \['extra.weight'\]"):
        model.load_state_dict(extra)

    other = Small(32).state_dict()
    with pytest.raises(
        RuntimeError, match=r"size mismatch for conv_in.weight: checkpoint \(32, 4, 3, 3\) vs model \(64, 4, 3, 3\)"
    ):
        model.load_state_dict(other)

    before = model.conv_in.weight.data.copy()
    with pytest.raises(RuntimeError):  # a failed load changes nothing
        model.load_state_dict(dict(other, **{"conv_in.bias": np.zeros(64)}))
    assert np.array_equal(before, model.conv_in.weight.data)

    result = model.load_state_dict(dict(missing, **{"extra.weight": np.zeros(1)}), strict=False)
    assert result.missing_keys == ["out.bias"] and result.unexpected_keys == ["extra.weight"]


def test_buffers_are_state_and_move_but_are_not_parameters():
    m = nn.Linear(2, 2)
    m.register_buffer("running", np.zeros(2, np.float32))
    m.register_buffer("cache", np.zeros(3, np.float32), persistent=False)
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]
    assert list(m.state_dict()) == ["weight", "bias", "running"]
    assert [n for n, _ in m.named_buffers()] == ["running", "cache"]
    m.to(np.float64)
    assert m.running.dtype == np.float64 and m.cache.dtype == np.float64 and m.weight.dtype == np.float64


def test_train_eval_propagate_and_dropout_follows():
    m = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Dropout(0.5), nn.ReLU()))
    assert all(mod.training for mod in m.modules())
    assert m.eval() is m
    assert not any(mod.training for mod in m.modules())
    x = tinysd.randn(8, 4)
    assert np.array_equal(m[1](x).data, tinysd.relu(x).data)  # dropout is the identity in eval
    m.train()
    assert all(mod.training for mod in m.modules())
    y = m[1][0](tinysd.ones(1000)).data
    assert set(np.unique(y)) == {0.0, 2.0}  # inverted dropout: survivors scaled by 1 / (1 - p)


def test_to_moves_in_place_keeping_parameter_objects(device):
    m = nn.Sequential(nn.Linear(3, 2), nn.GroupNorm(1, 2))
    m.register_buffer("mask", np.ones(2, np.float32))
    params = m.parameters()
    m(tinysd.randn(4, 3)).sum().backward()
    assert m.to(device) is m
    assert all(p is q for p, q in zip(params, m.parameters()))
    assert all(p.device == device and p.grad.device == device for p in params)
    assert m.mask.device == device
    assert m(tinysd.randn(4, 3, device=device)).device == device
    m.to("cpu")
    assert all(isinstance(p.data, np.ndarray) for p in params)


def test_zero_grad_and_requires_grad():
    m = nn.Linear(3, 2)
    m(tinysd.randn(4, 3)).sum().backward()
    assert m.weight.grad is not None
    m.zero_grad(set_to_none=False)
    assert np.all(m.weight.grad.data == 0)
    m.zero_grad()
    assert m.weight.grad is None and m.bias.grad is None
    m.requires_grad_(False)
    assert not any(p.requires_grad for p in m.parameters())


def test_parameter_is_a_leaf_that_requires_grad():
    p = nn.Parameter(tinysd.randn(2, 3))
    assert p.requires_grad and p.is_leaf and p.dtype == np.float32
    assert repr(p).startswith("Parameter containing:")
    y = p * 2  # ops on a Parameter give plain Tensors
    assert type(y) is tinysd.Tensor


def test_num_parameters_and_repr():
    assert nn.Linear(3, 4).num_parameters() == 16
    assert nn.Conv2d(2, 6, 3, groups=2).num_parameters() == 6 * 1 * 9 + 6
    assert nn.ConvTranspose2d(4, 6, 2, groups=2).weight.shape == (4, 3, 2, 2)
    assert nn.LayerNorm(5).num_parameters() == 10
    assert nn.Embedding(10, 3).num_parameters() == 30
    text = repr(nn.Sequential(nn.Linear(2, 3), nn.SiLU()))
    assert text == "Sequential(\n  (0): Linear(in_features=2, out_features=3, bias=True)\n  (1): SiLU()\n)"


@pytest.mark.parametrize("cross", [False, True])
def test_attention_keys_and_shapes(cross):
    attn = nn.Attention(16, cross_attention_dim=12 if cross else None, heads=2, dim_head=8)
    assert list(attn.state_dict()) == [
        "to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias",
    ]
    assert attn.to_k.weight.shape == (16, 12 if cross else 16)
    x = tinysd.randn(2, 5, 16)
    context = tinysd.randn(2, 7, 12) if cross else None
    assert attn(x, context).shape == (2, 5, 16)
    keep = np.ones((2, 7 if cross else 5), bool)
    keep[0, 2:] = False
    assert attn(x, context, attention_mask=keep).shape == (2, 5, 16)


def test_attention_matches_a_numpy_computation():
    attn = nn.Attention(6, heads=2, dim_head=3, out_bias=True).to(np.float64)
    x = tinysd.randn(1, 4, 6, dtype=np.float64)
    keep = np.array([[True, True, True, False]])
    y = attn(x, attention_mask=keep, is_causal=False).data

    xs = x.data[0]
    q, k, v = (xs @ lin.weight.data.T for lin in (attn.to_q, attn.to_k, attn.to_v))
    heads = []
    for h in range(2):
        cols = slice(3 * h, 3 * h + 3)
        s = q[:, cols] @ k[:, cols].T / math.sqrt(3) + np.where(keep[0], 0.0, -np.inf)
        p = np.exp(s - s.max(1, keepdims=True))
        heads.append(p / p.sum(1, keepdims=True) @ v[:, cols])
    expected = np.concatenate(heads, 1) @ attn.to_out[0].weight.data.T + attn.to_out[0].bias.data
    np.testing.assert_allclose(y[0], expected, rtol=1e-10, atol=1e-12)


def test_attention_mask_of_other_shapes_and_causal_equivalence():
    attn = nn.Attention(8, heads=2, dim_head=4).to(np.float64)
    x = tinysd.randn(2, 5, 8, dtype=np.float64)
    causal = np.tril(np.ones((5, 5), bool))
    a = attn(x, is_causal=True).data
    b = attn(x, attention_mask=np.broadcast_to(causal, (2, 5, 5))).data
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_layers_forward_shapes():
    x = tinysd.randn(2, 4, 8, 8)
    assert nn.Conv2d(4, 6, 3, stride=2, padding=1)(x).shape == (2, 6, 4, 4)
    assert nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)(x).shape == (2, 3, 16, 16)
    assert nn.GroupNorm(2, 4)(x).shape == x.shape
    assert nn.LayerNorm(8)(x).shape == x.shape
    assert nn.Upsample(scale_factor=2)(x).shape == (2, 4, 16, 16)
    assert nn.AvgPool2d(2)(x).shape == nn.MaxPool2d(2)(x).shape == (2, 4, 4, 4)
    assert nn.Flatten()(x).shape == (2, 256)
    for act in (nn.Identity(), nn.ReLU(), nn.SiLU(), nn.GELU(), nn.GELU("tanh"), nn.Sigmoid(), nn.Tanh()):
        assert act(x).shape == x.shape
    ids = tinysd.tensor(np.array([[1, 2, 2]]))
    assert nn.Embedding(5, 3)(ids).shape == (1, 3, 3)


def test_layer_errors_are_clear():
    with pytest.raises(ValueError, match="GroupNorm: num_channels 6 is not divisible by num_groups 4"):
        nn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="Conv2d"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="Dropout"):
        nn.Dropout(1.5)


# ---- initialisation ---------------------------------------------------------------------
def _check_uniform(values, bound):
    """Samples of U(-b, b): inside the bound, reaching near it, mean 0 and std b / sqrt(3) (within 5 sigma)."""
    values = np.asarray(values, np.float64).ravel()
    sigma, n = bound / math.sqrt(3), values.size
    assert np.abs(values).max() <= bound * (1 + 1e-6)
    assert np.abs(values).max() > 0.95 * bound
    assert abs(values.mean()) < 5 * sigma / math.sqrt(n)
    assert abs(values.std() - sigma) < 5 * 0.45 * sigma / math.sqrt(n)  # sd of a uniform's sample std


def test_init_follows_pytorch_bounds():
    lin = nn.Linear(400, 300)
    _check_uniform(lin.weight.data, 1 / math.sqrt(400))
    _check_uniform(lin.bias.data, 1 / math.sqrt(400))
    conv = nn.Conv2d(16, 64, 3)
    _check_uniform(conv.weight.data, 1 / math.sqrt(16 * 9))
    convt = nn.ConvTranspose2d(64, 16, 3)  # PyTorch takes the fan from weight dim 1 (out_channels)
    _check_uniform(convt.weight.data, 1 / math.sqrt(16 * 9))
    gn, ln = nn.GroupNorm(4, 8), nn.LayerNorm(8)
    for norm in (gn, ln):
        assert np.all(norm.weight.data == 1) and np.all(norm.bias.data == 0)
    emb = nn.Embedding(1000, 64).weight.data
    assert abs(emb.std() - 1) < 0.02 and abs(emb.mean()) < 0.02


def test_init_functions():
    w = nn.Parameter(np.zeros((200, 300), np.float32))
    init.kaiming_uniform_(w, a=0.0, nonlinearity="relu")
    _check_uniform(w.data, math.sqrt(2) * math.sqrt(3 / 300))
    init.kaiming_uniform_(w, mode="fan_out")
    _check_uniform(w.data, math.sqrt(2) * math.sqrt(3 / 200))
    init.xavier_uniform_(w, gain=2.0)
    _check_uniform(w.data, 2.0 * math.sqrt(6 / 500))
    init.normal_(w, mean=1.0, std=0.1)
    assert abs(w.data.mean() - 1) < 0.01 and abs(w.data.std() - 0.1) < 0.01
    assert np.all(init.zeros_(w).data == 0) and np.all(init.ones_(w).data == 1)
    with pytest.raises(ValueError, match="at least 2 dims"):
        init.xavier_uniform_(nn.Parameter(np.zeros(3, np.float32)))


def test_manual_seed_makes_models_reproducible():
    tinysd.manual_seed(123)
    a = Block()
    tinysd.manual_seed(123)
    b = Block()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert np.array_equal(p.data, q.data), name


def test_apply_visits_children_first():
    seen = []
    nn.Sequential(nn.Linear(1, 1), nn.Sequential(nn.ReLU())).apply(lambda m: seen.append(type(m).__name__))
    assert seen == ["Linear", "ReLU", "Sequential", "Sequential"]
