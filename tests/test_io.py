"""safetensors checkpoints: exact round trips, atomic writes, clear errors on bad files."""

import builtins
import json
import os
import pickle

import numpy as np
import pytest

import tinysd
from tinysd import io, nn, optim


def test_round_trip_is_bit_exact_for_dtypes_and_shapes(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "f16": rng.standard_normal(2).astype(np.float16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "u8": rng.integers(0, 256, (2, 2), dtype=np.uint8),
        "bool": np.array([True, False]),
        "scalar": np.array(0.125),
        "empty": np.zeros((0, 3), np.float32),
        "transposed": rng.standard_normal((3, 2)).T,  # not contiguous: written in logical order
        "tensor": tinysd.randn(2, 2),
    }
    path = tmp_path / "all.safetensors"
    io.save_file(state, path, metadata={"note": "hello", "step": "12"})
    loaded = io.load_file(path)
    assert set(loaded) == set(state)
    for name, value in state.items():
        expected = value.numpy() if isinstance(value, tinysd.Tensor) else value
        assert loaded[name].dtype == expected.dtype and loaded[name].shape == expected.shape, name
        assert np.array_equal(loaded[name], expected), name
    assert io.load_metadata(path) == {"note": "hello", "step": "12"}
    io.save_file({"a": np.ones(1)}, path)
    assert io.load_metadata(path) == {}


def test_loaded_arrays_are_writable(tmp_path):
    io.save_file({"w": np.ones(3)}, tmp_path / "w.safetensors")
    w = io.load_file(tmp_path / "w.safetensors")["w"]
    w += 1
    assert np.all(w == 2)


def test_bad_names_and_metadata_are_rejected(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        io.save_file({"a": np.ones(1)}, tmp_path / "x.safetensors", metadata={"step": 3})
    with pytest.raises(TypeError, match="names"):
        io.save_file({1: np.ones(1)}, tmp_path / "x.safetensors")
    assert not os.listdir(tmp_path)


class HalfWriter:
    """A file that dies after writing half of what it is given (a full disk, a kill -9)."""

    def __init__(self, path, mode):
        self.f = builtins.open(path, mode)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_a_crash_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "ckpt.safetensors"
    io.save_file({"w": np.arange(4.0)}, path)
    old = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash")  # not even an Exception: the cleanup must still run

    if fail_at == "write":
        monkeypatch.setattr(io, "open", HalfWriter, raising=False)  # shadows the builtin inside tinysd.io
    else:
        monkeypatch.setattr(os, fail_at, crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_file({"w": np.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
    assert np.array_equal(io.load_file(path)["w"], np.arange(4.0))


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    io.save_file({"w": np.arange(4.0)}, path)
    io.save_file({"v": np.ones(2, np.float32)}, str(path))
    assert list(io.load_file(path)) == ["v"]
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


def _bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    io.save_file({"w": np.arange(100.0), "b": np.ones(3, np.float32)}, good, metadata={"k": "v"})
    data = good.read_bytes()
    files = {
        "half": data[: len(data) // 2],
        "last_byte_missing": data[:-1],
        "random": np.random.default_rng(0).bytes(256),
        "json": json.dumps({"w": [1, 2, 3]}).encode(),
        "pickle": pickle.dumps({"w": [1.0, 2.0]}),
        "empty": b"",
        "tiny": b"\x01\x02",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return list(files)


def test_truncated_or_foreign_files_raise_value_error_naming_the_path(tmp_path):
    for name in _bad_files(tmp_path):
        path = tmp_path / name
        with pytest.raises(ValueError, match=f"{name} is not a valid safetensors file"):
            io.load_file(path)
        with pytest.raises(ValueError, match=name):
            io.load_metadata(path)
    with pytest.raises(FileNotFoundError):
        io.load_file(tmp_path / "missing.safetensors")


def test_checkpoint_helpers_round_trip_model_optimizer_and_ema(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 1))
    opt = optim.AdamW(model.parameters(), lr=0.01)
    ema = optim.EMA(model, decay=0.9)
    model(tinysd.randn(5, 3)).sum().backward()
    opt.step()
    ema.update(model)
    path = tmp_path / "run.safetensors"
    io.save_checkpoint(path, model, opt, ema, step=1, metadata={"config": "{}"})
    keys = set(io.load_file(path))
    assert {"model.0.weight", "optim.lr", "optim.state.0.exp_avg", "ema.shadow.0.weight", "ema.num_updates"} <= keys

    model2 = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 1))
    opt2, ema2 = optim.AdamW(model2.parameters(), lr=1.0), optim.EMA(model2)
    meta = io.load_checkpoint(path, model2, opt2, ema2)
    assert meta == {"config": "{}", "step": "1"}
    assert opt2.lr == 0.01 and opt2.state[0]["step"] == 1 and ema2.num_updates == 1
    for a, b in zip(model.parameters(), model2.parameters()):
        assert np.array_equal(a.data, b.data)
    assert np.array_equal(ema.shadow["2.bias"], ema2.shadow["2.bias"])
