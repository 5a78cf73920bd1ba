"""Files: every write is atomic (old file or whole new one, never half), orphan temporary files are
swept, metrics stay valid JSON, and a file whose data bytes changed is refused."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinysd import io

ROOT = Path(__file__).resolve().parent.parent


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "samples.npz"
    path.write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        with io.atomic_file(path) as f:
            f.write(b"half of the new")
            1 / 0
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]


def test_a_process_killed_mid_write_leaves_the_old_file_and_an_orphan_that_is_swept(tmp_path):
    path = tmp_path / "metrics.json"
    io.write_json(path, {"run": 1})
    code = (f"from tinysd import io; io.write_json({str(path)!r}, {{'run': 2}})")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TINYSD_CRASH_AT": "replace metrics.json"}
    died = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert died.returncode == -signal.SIGKILL
    assert json.loads(path.read_text()) == {"run": 1}
    orphans = [p.name for p in tmp_path.iterdir() if p.name != "metrics.json"]
    assert len(orphans) == 1 and io.TEMP_NAME.match(orphans[0])
    (tmp_path / "notes.tmp").write_text("not ours")  # only atomic_file's own names are swept
    assert io.sweep_temp_files(tmp_path) == orphans
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "notes.tmp"]


def test_write_json_turns_nan_and_infinities_into_null(tmp_path):
    io.write_json(tmp_path / "m.json", {"loss": float("nan"), "x": [np.float32(np.inf), 1.5], "n": np.int64(3)})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "x": [None, 1.5], "n": 3}


def test_a_flipped_bit_in_the_data_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    io.save_file({"w": np.arange(64, dtype=np.float32)}, path, metadata={"note": "x"})
    assert io.stored_checksum(path) == io.arrays_checksum({"w": np.arange(64, dtype=np.float32)})
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"w.safetensors is damaged: its data does not match the SHA-256"):
        io.load_file(path)
    assert io.load_metadata(path) == {"note": "x"}  # the header is intact; only the data changed


def test_files_from_elsewhere_without_a_checksum_still_load(tmp_path):
    import safetensors.numpy

    path = tmp_path / "foreign.safetensors"
    path.write_bytes(safetensors.numpy.save({"w": np.ones(3, np.float32)}))
    assert io.stored_checksum(path) is None
    assert np.array_equal(io.load_file(path)["w"], np.ones(3))


def test_load_file_rejects_a_path_that_is_not_one(tmp_path):
    with pytest.raises(TypeError, match=r"load_file: path must be a str or os.PathLike, got dict"):
        io.load_file({"w": 1})
    with pytest.raises(FileNotFoundError, match="load_file: no file"):
        io.load_file(tmp_path)  # a folder
