"""Faults: a job killed with SIGKILL at chosen points resumes to the very same result, bit for bit;
a NaN stops training before anything is saved; a damaged or mismatched checkpoint is refused.

The kill points are set through the environment variable TINYSD_CRASH_AT, which `tinysd.io.crash_point`
reads: the process kills itself there (SIGKILL, no cleanup), so each test dies at exactly the point named.
"""

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
ARGS = ["--quick", "--samples-per-digit", "1", "--steps", "2", "--threads", "1"]
TIMINGS = {"wall_s", "images_per_s", "total_wall_s"}  # the only values allowed to differ between runs

# In order: where the job dies, and the step its resume file then holds (None: no resume file).
# Quick budgets are 20 steps per stage, with a resume file every 5 steps.
KILL_POINTS = [
    ("classifier step 7", ("classifier", 5)),  # between resume files
    ("replace classifier.resume.safetensors", ("classifier", 5)),  # writing the step-10 resume file
    ("vae step 3", ("vae", None)),  # before the first resume file: the stage starts over
    ("replace vae.safetensors", ("vae", 15)),  # writing the checkpoint
    ("clip step 12", ("clip", 10)),
    ("clip saved", ("clip", 15)),  # checkpoint written, resume file not yet removed
    ("replace unet.resume.safetensors", ("unet", None)),  # writing the first resume file
    ("unet step 18", ("unet", 15)),
    ("replace samples.npz", ("unet", None)),
    ("replace metrics.json", ("unet", None)),
]


@pytest.fixture(scope="module", autouse=True)
def _needs_mnist():
    from tinysd import data

    try:
        data.load_mnist("test")
    except RuntimeError as e:
        pytest.skip(f"MNIST is not available: {e}")


def run_job(out, *extra, crash_at=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TINYSD_CRASH_AT", None)
    if crash_at:
        env["TINYSD_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, str(ROOT / "examples" / "mnist_digits.py"), *ARGS, "--out", str(out),
                           *extra], env=env, capture_output=True, text=True, timeout=900)


def results(out):
    """Every array of every checkpoint and of samples.npz, and metrics.json without its timings."""
    arrays = {}
    for name in ("classifier", "vae", "clip", "unet"):
        arrays.update({f"{name}/{k}": v for k, v in io.load_file(out / f"{name}.safetensors").items()})
    with np.load(out / "samples.npz") as npz:
        arrays.update({f"samples/{k}": npz[k] for k in npz.files})

    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k not in TIMINGS}
        return value

    return arrays, untimed(json.loads((out / "metrics.json").read_text()))


def test_killed_at_every_point_the_rerun_equals_an_uninterrupted_run(tmp_path):
    done = run_job(tmp_path / "straight")
    assert done.returncode == 0, done.stderr[-2000:]
    expected_arrays, expected_metrics = results(tmp_path / "straight")

    out = tmp_path / "killed"
    for point, (stage, resume_step) in KILL_POINTS:
        killed = run_job(out, crash_at=point)
        assert killed.returncode == -signal.SIGKILL, f"not killed at {point!r}: {killed.stderr[-2000:]}"
        resume = out / f"{stage}.resume.safetensors"
        assert (int(io.load_metadata(resume)["step"]) if resume.exists() else None) == resume_step, point
        if point.startswith("replace "):  # died between writing the temporary file and the rename
            assert any(p.name.startswith(f".{point[8:]}.") for p in out.iterdir()), point
    finished = run_job(out)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "removed 1 temporary file(s)" in finished.stdout

    arrays, metrics = results(out)
    assert arrays.keys() == expected_arrays.keys()
    differing = [k for k in arrays if not np.array_equal(arrays[k], expected_arrays[k])]
    assert not differing, f"differ from the uninterrupted run: {differing[:10]}"
    assert metrics == expected_metrics
    leftovers = sorted(p.name for p in out.iterdir() if ".tmp" in p.name or ".resume." in p.name)
    assert not leftovers
