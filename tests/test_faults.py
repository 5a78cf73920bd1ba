"""Faults: a job killed with SIGKILL at chosen points resumes to the very same result, bit for bit;
a NaN stops training before anything is saved; a damaged or mismatched checkpoint is refused.

The kill points are set through the environment variable TINYSD_CRASH_AT, which `tinysd.io.crash_point`
reads: the process kills itself there (SIGKILL, no cleanup), so each test dies at exactly the point named.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinysd
from tinysd import io, nn, optim
from tinysd.training import NonFiniteError, ResumeMismatchError, train
from helpers import load_script

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--quick", "--samples-per-digit", "1", "--steps", "2", "--threads", "1", "--ranks", "1"]  # one process
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


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The output folder of one uninterrupted quick run."""
    out = tmp_path_factory.mktemp("straight")
    done = run_job(out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def copy_of(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "copy")
    return tmp_path / "copy"


def test_killed_at_every_point_the_rerun_equals_an_uninterrupted_run(straight, tmp_path):
    expected_arrays, expected_metrics = results(straight)

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


@pytest.fixture(scope="module")
def example():
    return load_script("examples/mnist_digits.py")


def test_a_checkpoint_with_damaged_data_is_refused_naming_it(example, straight, tmp_path):
    out = copy_of(straight, tmp_path)
    data = bytearray((out / "vae.safetensors").read_bytes())
    data[-100] ^= 0x40  # one bit of one weight
    (out / "vae.safetensors").write_bytes(bytes(data))
    with pytest.raises(example.JobError, match=r"vae.safetensors is damaged(.|\n)*--retrain vae"):
        example.main([*ARGS, "--out", str(out)])


def test_quick_checkpoints_are_not_used_by_a_full_run(example, straight, tmp_path):
    out = copy_of(straight, tmp_path)
    expected = r"classifier.safetensors does not fit this run: budget was .*\"steps\": 20(.|\n)*--retrain"
    with pytest.raises(example.JobError, match=expected):
        example.main([a for a in ARGS if a != "--quick"] + ["--out", str(out)])


def test_other_seed_or_dataset_is_refused(example, straight, tmp_path):
    out = copy_of(straight, tmp_path)
    with pytest.raises(example.JobError, match="seed was 0, this run has 1"):
        example.main([*ARGS, "--out", str(out), "--seed", "1"])


def test_a_unet_trained_on_another_vae_is_refused(example, straight, tmp_path):
    out = copy_of(straight, tmp_path)
    path = out / "vae.safetensors"
    state, metadata = io.load_file(path), io.load_metadata(path)
    state[sorted(state)[0]] = state[sorted(state)[0]] * 1.5  # a VAE retrained since, with the same settings
    io.save_file(state, path, metadata)
    with pytest.raises(example.JobError,
                       match=r"unet.safetensors does not fit this run: it was trained on another vae.safetensors"):
        example.main([*ARGS, "--out", str(out)])


def test_a_checkpoint_without_its_record_is_refused(example, straight, tmp_path):
    out = copy_of(straight, tmp_path)
    io.save_file(io.load_file(out / "clip.safetensors"), out / "clip.safetensors")  # as older tinysd wrote it
    with pytest.raises(example.JobError, match=r"clip.safetensors does not record what produced it"):
        example.main([*ARGS, "--out", str(out)])


def test_retrain_also_retrains_what_depends_on_it(example, tmp_path):
    args = example.parse_args(["--quick", "--out", str(tmp_path)])
    assert example.stages_to_retrain(["vae"], args) == {"vae", "unet"}
    assert example.stages_to_retrain(["classifier"], args) == {"classifier"}
    assert example.stages_to_retrain(["clip"], args) == {"clip", "unet"}
    assert example.stages_to_retrain(["all"], args) == set(example.STAGES)
    with_perceptual = example.parse_args(["--quick", "--perceptual-weight", "0.3", "--out", str(tmp_path)])
    assert example.stages_to_retrain(["classifier"], with_perceptual) == {"classifier", "vae", "unet"}


def test_a_nan_learning_rate_stops_the_job_before_anything_is_saved(example, tmp_path, monkeypatch):
    monkeypatch.setitem(example.QUICK, "classifier", {**example.QUICK["classifier"], "lr": float("nan")})
    with pytest.raises(example.JobError, match="classifier: the learning rate is nan at step 1 of 20"):
        example.main([*ARGS, "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- the training loop on its own ------------------------------------------------------------------
def tiny_setup():
    tinysd.manual_seed(0)
    model = nn.Linear(3, 1)
    return model, optim.AdamW(model.parameters(), lr=0.1)


def test_a_nan_loss_stops_training_at_that_step_and_keeps_the_last_resume_file(tmp_path):
    model, opt = tiny_setup()
    x = tinysd.randn(8, 3)

    def loss_fn(step):
        loss = (model(x) ** 2).mean()
        return loss * float("nan") if step == 6 else loss

    resume = tmp_path / "r.safetensors"
    with pytest.raises(NonFiniteError, match=r"train: the loss is nan at step 7 of 10; training stopped"):
        train(model, opt, loss_fn, lambda step: step, 10, resume_path=str(resume), save_every=2, progress=False)
    assert io.load_metadata(resume)["step"] == "6"
    assert all(np.isfinite(v).all() for v in io.load_file(resume).values())
    assert all(np.isfinite(p.numpy()).all() for p in model.parameters())  # the bad step was not applied


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_an_infinite_gradient_stops_training(tmp_path):
    model, opt = tiny_setup()
    x = tinysd.zeros(4, 3)

    def loss_fn(step):  # sqrt at 0: a finite loss with an infinite gradient
        return (model(x) * 0).abs().sqrt().sum()

    with pytest.raises(NonFiniteError, match=r"the gradient norm is (inf|nan) at step 1 of 3"):
        train(model, opt, loss_fn, lambda step: step, 3, progress=False)


def test_a_resume_file_from_other_settings_is_refused(tmp_path):
    model, opt = tiny_setup()
    x = tinysd.randn(8, 3)
    resume = str(tmp_path / "r.safetensors")
    kw = dict(resume_path=resume, save_every=2, progress=False)
    train(model, opt, lambda s: (model(x) ** 2).mean(), lambda s: s, 3, fingerprint="steps=3", **kw)
    with pytest.raises(ResumeMismatchError, match=r"r.safetensors was written by a run with other settings"):
        train(model, opt, lambda s: (model(x) ** 2).mean(), lambda s: s, 5, fingerprint="steps=5", **kw)


def test_a_damaged_resume_file_is_refused_naming_it(tmp_path):
    model, opt = tiny_setup()
    x = tinysd.randn(8, 3)
    resume = tmp_path / "r.safetensors"
    kw = dict(resume_path=str(resume), save_every=2, progress=False)
    train(model, opt, lambda s: (model(x) ** 2).mean(), lambda s: s, 3, **kw)
    resume.write_bytes(resume.read_bytes()[:-10])
    with pytest.raises(ResumeMismatchError, match=r"r.safetensors is not a valid safetensors file.*start this stage"):
        train(model, opt, lambda s: (model(x) ** 2).mean(), lambda s: s, 3, **kw)
