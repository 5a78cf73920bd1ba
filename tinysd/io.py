"""Checkpoints as safetensors files, written atomically.

A safetensors file is an 8-byte little-endian header length, a JSON header
(each name's dtype, shape and byte range, plus optional string metadata),
then the raw bytes of the arrays. Loading one runs no code, unlike a pickle,
so a checkpoint from anywhere is safe to open. tinysd never unpickles.

Writing goes to a temporary file in the same folder, which is flushed and
fsynced, then renamed over the target with os.replace (atomic on POSIX and
Windows): a crash mid-write leaves the previous checkpoint intact.
"""

import json
import os
import secrets

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


def save_file(state_dict, path, metadata=None):
    """Write name -> Tensor or array to a safetensors file, atomically. metadata: str -> str."""
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"save_file: metadata must map str to str, got {key!r}: {type(value).__name__}")
    arrays = {}
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"save_file: names must be strings, got {name!r}")
        arrays[name] = _to_numpy(value)
    atomic_write(path, safetensors.numpy.save(arrays, metadata=metadata))


def atomic_write(path, data):
    """Write bytes to path so that readers see either the old file or the whole new one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    _fsync_folder(folder)


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
    """name -> NumPy array from a safetensors file."""
    return _read_safetensors(path, safetensors.numpy.load)


def load_metadata(path):
    """The file's str -> str metadata ({} if it has none)."""

    def parse(data):
        safetensors.deserialize(data)  # validates the whole file, not only the header
        header_len = int.from_bytes(data[:8], "little")
        return dict(json.loads(data[8 : 8 + header_len]).get("__metadata__") or {})

    return _read_safetensors(path, parse)


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
