"""The main job's smoke run: `examples/mnist_digits.py --quick` writes every output, well-formed."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from helpers import load_script

ROOT = Path(__file__).resolve().parent.parent


def load_example():
    return load_script("examples/mnist_digits.py")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from tinysd import data

    try:
        data.load_mnist("test")
    except RuntimeError as e:  # no cache and no network
        pytest.skip(f"MNIST is not available: {e}")
    out = tmp_path_factory.mktemp("mnist_digits")
    example = load_example()
    example.main(["--quick", "--out", str(out), "--samples-per-digit", "2", "--steps", "4",
                  "--prompt", "the number 3", "--perceptual-weight", "0.5"])
    return example, out


def test_quick_run_writes_every_output(quick_run):
    _, out = quick_run
    for name in ("classifier", "vae", "clip", "unet"):
        assert (out / f"{name}.safetensors").stat().st_size > 0
        assert not (out / f"{name}.resume.safetensors").exists()
    samples = np.load(out / "samples.npz")
    n = 10 * 2 + 2  # two per digit, plus two for the extra prompt
    assert samples["images"].shape == (n, 28, 28) and samples["images"].dtype == np.float32
    assert 0.0 <= samples["images"].min() and samples["images"].max() <= 1.0
    assert samples["labels"].dtype == np.int64 and list(samples["labels"][-2:]) == [3, 3]
    assert list(samples["prompts"][:2]) == ["a handwritten digit zero"] * 2
    with Image.open(out / "samples.png") as grid:
        assert grid.size[1] == 11 * 56  # one row per prompt
    with Image.open(out / "denoise.gif") as gif:
        assert gif.n_frames >= 4
    metrics = json.loads((out / "metrics.json").read_text())
    for stage in ("classifier", "vae", "clip", "unet"):
        assert {"wall_s", "images_per_s", "final_loss"} <= set(metrics[stage])
    assert 0.0 <= metrics["classifier"]["test_accuracy"] <= 1.0
    assert np.isfinite(metrics["vae"]["test_psnr_db"]) and metrics["vae"]["perceptual_weight"] == 0.5
    assert 0.0 <= metrics["vae"]["test_recon_accuracy"] <= 1.0
    assert 0.0 <= metrics["clip"]["zero_shot_test_accuracy"] <= 1.0
    assert 0.0 <= metrics["samples"]["accuracy"] <= 1.0
    assert set(metrics["samples"]["accuracy_per_digit"]) == {str(d) for d in range(10)}
    assert np.isfinite(metrics["samples"]["frechet_distance_classifier_features"])
    assert metrics["samples"]["frechet_distance_real_vs_real"] >= 0 and metrics["samples"]["real_vs_real_count"] > 0


def test_second_run_skips_finished_stages(quick_run, capsys, monkeypatch):
    example, out = quick_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    monkeypatch.setattr(example, "busy_cores", lambda: 1.2)
    example.main(["--quick", "--out", str(out), "--samples-per-digit", "1", "--steps", "2",
                  "--perceptual-weight", "0.5"])
    printed = capsys.readouterr().out
    assert "keep 1.2 of" in printed and "--threads 1" in printed
    for name in ("classifier", "vae", "clip", "unet"):
        assert f"[{name}] loaded" in printed
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    with pytest.raises(example.JobError, match=r"vae.safetensors does not fit this run: perceptual_weight was 0.5, "
                                               r"this run has 0.0(.|\n)*--retrain vae"):
        example.main(["--quick", "--out", str(out), "--samples-per-digit", "1", "--steps", "2"])
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}


_WARM_UP_CHILD = """
import json, sys
from numba.core.dispatcher import Dispatcher
sys.path.insert(0, sys.argv[2])
from helpers import load_script

loaded = []  # every kernel signature this process compiles or loads from Numba's cache, in order
add_overload = Dispatcher.add_overload
Dispatcher.add_overload = lambda self, cres: (loaded.append(f"{self.py_func.__qualname__}{cres.signature}"),
                                              add_overload(self, cres))[1]
example = load_script("examples/mnist_digits.py")
run = example.Run(example.parse_args(["--quick", "--out", sys.argv[1]]))
example.distributed.world_size = lambda: 2
example.distributed.barrier = lambda what: None
for rank in (0, 1):  # both ranks' shares, one after the other
    example.distributed.rank = lambda: rank
    example.compile_kernels_once(run, example.Tokenizer())
warm_up = len(loaded)
example.distributed.world_size, example.distributed.rank = (lambda: 1), (lambda: 0)
example.main(["--quick", "--out", sys.argv[1], "--ranks", "1", "--samples-per-digit", "1", "--steps", "2"])
print(json.dumps({"warm_up": loaded[:warm_up], "later": loaded[warm_up:]}))
"""


def test_the_ranks_warm_up_needs_every_kernel_the_job_does(tmp_path):
    """compile_kernels_once: the ranks' shares of the warm-up, together, reach every kernel signature the
    whole job (four stages, sampling, scoring) uses, so no rank compiles while training. Run in a fresh
    process: in this one, earlier tests have already loaded most kernels."""
    pytest.importorskip("numba")
    from tinysd import data

    try:
        data.load_mnist("test")
    except RuntimeError as e:
        pytest.skip(f"MNIST is not available: {e}")
    done = subprocess.run([sys.executable, "-c", _WARM_UP_CHILD, str(tmp_path), str(ROOT / "tests")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(kernels["warm_up"]) >= 20 and any("geglu" in k for k in kernels["warm_up"])  # 28 from the cache
    assert kernels["later"] == []


def test_busy_cores_sees_a_spinning_process():
    import multiprocessing
    import os

    example = load_example()
    if example.busy_cores() is None:
        pytest.skip("no /proc/stat")
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, args=(3.0,))
    spinner.start()
    try:
        time.sleep(0.5)
        busy = example.busy_cores(seconds=0.5)
    finally:
        spinner.terminate()
        spinner.join()
    assert 0.6 <= busy <= (os.cpu_count() or 1)


def _spin(seconds):
    end = time.time() + seconds
    while time.time() < end:
        pass


def test_digit_in_text():
    example = load_example()
    assert example.digit_in_text("the number 7.") == 7
    assert example.digit_in_text("A handwritten digit Seven") == 7
    assert example.digit_in_text("a cat") == -1
