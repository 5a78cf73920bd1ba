"""Checkpoints as safetensors files, written atomically.

A safetensors file is an 8-byte little-endian header length, a JSON header
(each name's dtype, shape and byte range, plus optional string metadata),
then the raw bytes of the arrays. Loading one runs no code, unlike a pickle,
so a checkpoint from anywhere is safe to open. tinysd never unpickles.

Every file tinysd writes (checkpoints, samples, metrics, caches) goes through
`atomic_file`: the bytes go to a temporary file in the same folder, which is
flushed and fsynced, then renamed over the target with os.replace (atomic on
POSIX and Windows): a crash mid-write leaves the previous file intact, and at
worst an orphan `.NAME.XXXXXXXX.tmp` that `sweep_temp_files` removes.

`save_file` also stores a SHA-256 of the arrays (names, dtypes, shapes and
bytes) in the metadata, and `load_file` checks it, so a file whose data bytes
were damaged is refused instead of loaded.
"""

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import signal

import numpy as np
import safetensors
import safetensors.numpy

from . import backend
from .tensor import Tensor


def _to_numpy(value):
    if isinstance(value, Tensor):
        value = value.data
    if backend.is_cupy_array(value):
        value = value.get()
    return np.asarray(value, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)


CHECKSUM_KEY = "tinysd.sha256"  # metadata key of the arrays' checksum


def save_file(state_dict, path, metadata=None):
    """Write name -> Tensor or array to a safetensors file, atomically, with the arrays' checksum.

    metadata: str -> str."""
    if not hasattr(state_dict, "items"):
        raise TypeError(f"save_file: state_dict must map names to tensors, got {type(state_dict).__name__}")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"save_file: metadata must map str to str, got {key!r}: {type(value).__name__}")
    arrays = {}
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"save_file: names must be strings, got {name!r}")
        arrays[name] = _to_numpy(value)
    metadata = {**(metadata or {}), CHECKSUM_KEY: arrays_checksum(arrays)}
    atomic_write(path, safetensors.numpy.save(arrays, metadata=metadata))


def arrays_checksum(arrays):
    """SHA-256 (hex) over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---- atomic files ----------------------------------------------------------------------------
TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # what atomic_file names its temporary files


@contextlib.contextmanager
def atomic_file(path):
    """`with atomic_file(path) as f: f.write(...)`: readers see the old file or the whole new one.

    The bytes go to `.NAME.XXXXXXXX.tmp` in the same folder, are fsynced, then renamed over
    `path`; on an exception the temporary file is removed and `path` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        crash_point(f"replace {os.path.basename(path)}")
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise
    _fsync_folder(folder)


def atomic_write(path, data):
    """Write bytes to path so that readers see either the old file or the whole new one."""
    with atomic_file(path) as f:
        f.write(data)


def write_json(path, obj):
    """Write obj as JSON, atomically; NaN and infinities become null (bare NaN is not JSON)."""
    text = json.dumps(_json_safe(obj), indent=2, allow_nan=False)
    atomic_write(path, (text + "\n").encode())


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def sweep_temp_files(folder):
    """Remove the temporary files that writes killed mid-way left in `folder`; return their names."""
    removed = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if TEMP_NAME.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed


def crash_point(label):
    """A test hook: when the environment variable TINYSD_CRASH_AT equals `label`, the process
    kills itself here with SIGKILL (no cleanup, like a power cut), so tests can check what
    a crash at this very point leaves behind. Costs one dictionary lookup otherwise."""
    if os.environ.get("TINYSD_CRASH_AT") == label:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _fsync_folder(folder):
    """Make the rename itself durable (POSIX; folders cannot be opened this way on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_safetensors(path, parse):
    """Read the file's bytes and parse them; a malformed file raises ValueError naming the path."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return parse(data)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ValueError(f"{os.fspath(path)} is not a valid safetensors file (truncated or another format): {err}") \
            from None


def load_file(path):
    """name -> NumPy array from a safetensors file; checks the arrays' checksum when the file has one."""
    return load_file_and_metadata(path)[0]


def load_file_and_metadata(path):
    """(name -> NumPy array, str -> str metadata) from one read of a safetensors file; the
    arrays' checksum is checked when the file has one (and left out of the metadata)."""
    _check_path("load_file", path)

    def parse(data):
        arrays = safetensors.numpy.load(data)
        return arrays, _metadata_of(data)

    arrays, metadata = _read_safetensors(path, parse)
    expected = metadata.pop(CHECKSUM_KEY, None)
    if expected is not None and arrays_checksum(arrays) != expected:
        raise ValueError(
            f"{os.fspath(path)} is damaged: its data does not match the SHA-256 it was saved with "
            f"(a disk or copy error, or an edit); delete it or write it again"
        )
    return arrays, metadata


def _check_path(op, path):
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{op}: path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{op}: no file {os.fspath(path)!r}")


def _metadata_of(data):
    header_len = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8 : 8 + header_len]).get("__metadata__") or {})


def load_metadata(path):
    """The file's str -> str metadata ({} if it has none), without the checksum save_file adds."""

    _check_path("load_metadata", path)

    def parse(data):
        safetensors.deserialize(data)  # validates the whole file, not only the header
        return _metadata_of(data)

    metadata = _read_safetensors(path, parse)
    metadata.pop(CHECKSUM_KEY, None)
    return metadata


def stored_checksum(path):
    """The arrays' SHA-256 that save_file stored in the file (None for files from elsewhere).
    load_file checks it; this only reads it, e.g. to record which upstream file a model came from."""
    _check_path("stored_checksum", path)
    try:
        header, _ = read_header(path)
    except ValueError:
        return None
    return (header.get("__metadata__") or {}).get(CHECKSUM_KEY)


def read_header(path):
    """(the JSON header, where the data starts) of a safetensors file, read without its data:
    the header maps each tensor's name to its dtype, shape and data_offsets."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(header_len)), 8 + header_len


# ---- a model, its optimizer and its EMA in one file ----------------------------------------
def save_checkpoint(path, model, optimizer=None, ema=None, step=None, metadata=None):
    """One file with keys "model.*", "optim.*" and "ema.*"; `step` goes into the metadata."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        state.update({f"optim.{k}": v for k, v in optimizer.state_dict().items()})
    if ema is not None:
        state.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    metadata = dict(metadata or {})
    if step is not None:
        metadata["step"] = str(step)
    save_file(state, path, metadata)


def load_checkpoint(path, model, optimizer=None, ema=None):
    """Restore what save_checkpoint wrote, in place; returns the metadata (with "step" if it was saved)."""
    state = load_file(path)

    def part(prefix):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    model.load_state_dict(part("model."))
    if optimizer is not None:
        optimizer.load_state_dict(part("optim."))
    if ema is not None:
        ema.load_state_dict(part("ema."))
    return load_metadata(path)
