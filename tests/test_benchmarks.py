"""Smoke tests of the benchmarks: a tiny run of each writes a complete report (no timing checks)."""

import json
import pathlib

import pytest
from helpers import load_script

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ops.py"


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_ops.py")


def test_quick_run_writes_json(bench, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--quick", "--no-memory", "--repeat", "1", "--settle", "0", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    rows = report["rows"]
    assert [(r["op"], r["shape"]) for r in rows] == [(c.op, c.shape) for c in bench.cases(quick=True)]
    for row in rows:
        assert row["errors"] == {}, row
        for impl in ("ours", "reference"):
            assert row["ms"][impl] > 0, row
        if "torch" in row["ms"]:
            assert row["ours_over_torch"] == pytest.approx(row["ms"]["ours"] / row["ms"]["torch"])
    assert report["settings"]["device"] == "cpu" and report["settings"]["quick"] is True
    table = capsys.readouterr().out
    assert "ours/torch" in table and "conv2d" in table and "adamw_step" in table


def test_memory_is_measured_in_a_subprocess(bench, tmp_path):
    path = tmp_path / "bench.json"
    bench.main(["--quick", "--repeat", "1", "--only", "conv2d (2,4,8,8)->4 ", "--json", str(path)])
    (row,) = json.loads(path.read_text())["rows"]
    assert isinstance(row["memory_bytes"]["ours"], int), row
    assert row["memory_method"]["ours"] in ("VmHWM", "ru_maxrss")


BENCH_MODELS = BENCH.parent / "bench_models.py"


def test_bench_models_quick_run(tmp_path, capsys):
    """A tiny run of every model row: our steps run, and where torch is installed its models agree with ours."""
    module = load_script("benchmarks/bench_models.py")
    path = tmp_path / "models.json"
    assert module.main(["--quick", "--no-memory", "--repeat", "1", "--per-turn", "1", "--settle", "0",
                        "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["op"] for r in rows] == ["classifier", "vae", "clip", "unet", "unet sample"]
    for row in rows:
        assert row["ms"]["ours"] > 0, row
        if module.torch_missing(next(c for c in module.cases(True) if c.op == row["op"])) is None:
            assert row["errors"] == {} and row["agreement"] < 1e-3, row
            assert row["ours_over_torch"] == pytest.approx(row["ms"]["ours"] / row["ms"]["torch"])
        else:
            assert "torch" in row["errors"] and "torch" not in row["ms"], row
    assert "ours/torch" in capsys.readouterr().out


def test_bench_blas_quick_run(tmp_path, capsys):
    """Every shape's three products run in each implementation and the report names them."""
    module = load_script("benchmarks/bench_blas.py")
    path = tmp_path / "blas.json"
    assert module.main(["--repeat", "1", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert [(r["m"], r["k"], r["n"]) for r in report["rows"]] == [shape[1:] for shape in module.SHAPES]
    for row in report["rows"]:
        assert row["blocks_ms"] > 0 and row["numpy_ms"] > 0, row
    assert "blocks/numpy" in capsys.readouterr().out
