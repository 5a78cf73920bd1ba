"""Data-parallel training (tinysd.distributed): 2 ranks under mpiexec against 1 process.

Each run starts tests/distributed_worker.py in fresh processes (one thread each, NumPy
reference kernels so no process waits on Numba's compiler). Skipped where mpi4py or an
mpiexec is missing.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinysd import distributed, io
from tinysd.tensor import Tensor

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def find_mpiexec():
    beside_python = Path(sys.executable).parent / "mpiexec"  # the mpich wheel puts it in the venv's bin
    return str(beside_python) if beside_python.exists() else shutil.which("mpiexec")


needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or find_mpiexec() is None, reason="mpi4py or mpiexec is missing"
)


def run_worker(ranks, out, *flags, timeout=120):
    """Run the worker on `ranks` processes (1: plain python); return (exit code, output, seconds)."""
    env = distributed.launcher_environment(dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                                                NUMBA_NUM_THREADS="1", TINYSD_KERNELS="reference",
                                                PYTHONPATH=str(WORKER.parent.parent)))
    command = [sys.executable, str(WORKER), "--out", str(out), *flags]
    if ranks > 1:
        command = [find_mpiexec(), "-n", str(ranks), *command]
    t0 = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - t0


def assert_same_weights(path_a, path_b):
    a, b = io.load_file(path_a), io.load_file(path_b)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(np.asarray(b[name]), np.asarray(a[name]), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: 1 process, global batch 16, 6 steps."""
    out = tmp_path_factory.mktemp("dp") / "one.safetensors"
    code, log, _ = run_worker(1, out)
    assert code == 0, log
    return out


@needs_mpi
def test_two_ranks_of_batch_8_equal_one_process_of_batch_16(one_process, tmp_path):
    out = tmp_path / "two.safetensors"
    code, log, _ = run_worker(2, out)
    assert code == 0, log
    assert "rank 1 of 2: done" in log
    assert_same_weights(one_process, out)


@needs_mpi
def test_resume_after_a_killed_rank_with_another_number_of_ranks(one_process, tmp_path):
    out = tmp_path / "resumed.safetensors"
    code, log, seconds = run_worker(2, out, "--kill-rank", "1", "--at-step", "3", "--timeout", "20")
    assert code != 0 and not out.exists(), log
    assert seconds < 60, f"the surviving rank took {seconds:.0f} s to stop"
    assert io.load_metadata(str(out) + ".resume")["step"] == "2"  # written by rank 0 every 2 steps
    code, log, _ = run_worker(1, out)  # resume the 2-rank run in 1 process: the file holds the global state
    assert code == 0 and "resuming" in log, log
    assert_same_weights(one_process, out)


@needs_mpi
def test_a_hanging_rank_makes_the_others_abort_within_the_timeout(tmp_path):
    # 10 s, not less: on a busy machine one rank may start seconds after the other.
    code, log, seconds = run_worker(2, tmp_path / "hang.safetensors", "--hang-rank", "1", "--timeout", "10")
    assert code != 0
    assert "waited 10 s for the all-reduce of gradients" in log, log
    assert seconds < 60, f"took {seconds:.0f} s"


@needs_mpi
def test_ctrl_c_on_a_rank_stops_every_rank_with_one_line_and_keeps_the_resume_file(tmp_path):
    code, log, seconds = run_worker(2, tmp_path / "c.safetensors", "--interrupt-rank", "0", "--at-step", "3",
                                    "--timeout", "20")
    assert code != 0 and seconds < 60
    assert "tinysd.distributed: rank 0 interrupted; stopping every rank." in log, log
    assert "Traceback" not in log, log
    assert (tmp_path / "c.safetensors.resume").exists()  # written at step 2, before the interrupt


@needs_mpi
def test_ranks_with_different_data_fail_with_a_clear_error(tmp_path):
    code, log, _ = run_worker(2, tmp_path / "d.safetensors", "--other-data-rank", "1", "--timeout", "20")
    assert code != 0
    assert "data-parallel ranks disagree on the data: training images (ranks [1] differ from rank 0)" in log, log


# ---- without mpiexec: one process, nothing to talk to ------------------------------------------------
def test_single_process_functions_are_no_ops():
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    batch = np.arange(10)
    assert distributed.shard(batch) is batch
    p = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    p.grad = Tensor(np.full(3, 2.0, dtype=np.float32))
    assert distributed.average_gradients([p], loss=1.5) == 1.5
    np.testing.assert_array_equal(p.grad.data, 2.0)
    distributed.check_same({"anything": np.zeros(2)})


def test_gradients_travel_in_few_buffers_and_come_back_in_place():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (5,), (2, 2, 2)]]
    arrays.append(rng.standard_normal(7))  # float64: a new buffer
    buckets = list(distributed._buckets(arrays))
    assert [len(b) for b in buckets] == [3, 1]
    flat = distributed._pack(buckets[0], extra=[9.0])
    assert flat.shape == (12 + 5 + 8 + 1,) and flat[-1] == 9.0
    expected = [a * 2 for a in buckets[0]]
    distributed._unpack(flat * 2, buckets[0])
    for a, e in zip(buckets[0], expected):
        np.testing.assert_array_equal(a, e)


def test_the_library_never_imports_mpi4py():
    code = "import sys, tinysd, tinysd.training, tinysd.distributed; assert 'mpi4py' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(WORKER.parent.parent)))


def run_code_on_two_ranks(code, timeout=300):
    """Run Python `code` on 2 ranks under mpiexec, from the repository's root; return (exit code, output)."""
    root = WORKER.parent.parent
    done = subprocess.run([find_mpiexec(), "-n", "2", sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=timeout,
                          env=distributed.launcher_environment(dict(os.environ, PYTHONPATH=str(root))))
    return done.returncode, done.stdout + done.stderr


_SUM_OF_PARTS = """
import numpy as np
from tinysd import distributed

distributed.init(timeout_s=60)
rank, ranks = distributed.rank(), distributed.world_size()
whole = np.random.default_rng(0).standard_normal((10, 3, 4)).astype(np.float32)
mine = np.zeros_like(whole)
mine[rank::ranks] = whole[rank::ranks]  # this rank's rows; zeros where the rows are another's
distributed.sum_arrays([mine, np.ones(5)], "parts")
print("rank", rank, "has the whole" if mine.tobytes() == whole.tobytes() else "differs")
"""


@needs_mpi
def test_sum_arrays_hands_every_rank_the_parts_of_all():
    """distributed.sum_arrays, as encode_latents in the main job uses it: each rank computes some rows,
    and after the sum every rank holds all of them, bit for bit."""
    code, log = run_code_on_two_ranks(_SUM_OF_PARTS)
    assert code == 0, log
    assert log.count("has the whole") == 2, log


_LATENTS_OF_RANKS = """
import sys
import numpy as np
import tinysd
from tinysd import distributed
sys.path.insert(0, "tests")
from helpers import load_script

job = load_script("examples/mnist_digits.py")
distributed.init(timeout_s=60)
tinysd.manual_seed(0)
vae = job.AutoencoderKL()
vae.scaling_factor = 1.5
images = np.random.default_rng(0).uniform(-1, 1, (1300, 1, 32, 32)).astype(np.float32)
run = type("Run", (), {"tensor": staticmethod(tinysd.tensor)})
latents = job.encode_latents(run, vae, images)  # this rank encodes every other batch of 500
with tinysd.no_grad():  # one process's answer: every batch here
    alone = np.concatenate([vae.encode(tinysd.tensor(images[i : i + 500])).mode().numpy() for i in (0, 500, 1000)])
print("rank", distributed.rank(), "as one process" if latents.tobytes() == (alone * 1.5).tobytes() else "differs")
"""


@needs_mpi
def test_the_ranks_encode_the_latents_of_one_process_between_them():
    """mnist_digits.encode_latents on 2 ranks: each encodes every other batch, and both end with the
    latents one process computes, bit for bit."""
    code, log = run_code_on_two_ranks(_LATENTS_OF_RANKS)
    assert code == 0, log
    assert log.count("as one process") == 2, log


# ---- the main job starts its own ranks ------------------------------------------------------------
class Became(Exception):
    """Raised by the stand-in for os.execve: the command the job would have become, and its environment."""


@pytest.fixture
def job(monkeypatch):
    """examples/mnist_digits.py with os.execve replaced: start_ranks raises Became(command, env) instead."""
    from helpers import load_script

    example = load_script("examples/mnist_digits.py")

    def execve(path, command, env):
        raise Became(command, env)

    monkeypatch.setattr(example.os, "execve", execve)
    return example


@needs_mpi
def test_the_job_becomes_mpiexec_with_one_rank_per_core(job, tmp_path):
    flags = ["--quick", "--out", str(tmp_path)]
    if job.usable_cores() < 2:
        assert job.start_ranks(flags) is None  # one core: one process
        return
    with pytest.raises(Became) as became:
        job.start_ranks(flags)
    launcher, n, ranks, python, script, *rest = became.value.args[0]
    expected = 1 << (min(job.usable_cores(), 32).bit_length() - 1)
    assert Path(launcher).name == "mpiexec" and (n, ranks) == ("-n", str(expected))
    assert (python, Path(script).name, rest) == (sys.executable, "mnist_digits.py", [*flags, "--data-parallel"])


def test_mpiexec_is_started_so_that_open_mpi_accepts_root(job, tmp_path, monkeypatch):
    """As root (most containers) Open MPI's mpiexec exits unless two variables allow it (seen on a GPU
    machine: every test here failed with its refusal); the job sets them, only as root."""
    monkeypatch.setattr(job.shutil, "which", lambda name, path=None: "/usr/bin/mpiexec")
    monkeypatch.setattr(job.importlib.util, "find_spec", lambda name, *a: object())
    for name in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"):
        monkeypatch.delenv(name, raising=False)
    for uid, allowed in ((0, {"1"}), (1000, {None})):
        monkeypatch.setattr(distributed.os, "geteuid", lambda uid=uid: uid)
        with pytest.raises(Became) as became:
            job.start_ranks(["--ranks", "2", "--out", str(tmp_path)])
        command, env = became.value.args
        assert command[1:3] == ["-n", "2"] and env["PATH"] == os.environ["PATH"]
        assert {env.get("OMPI_ALLOW_RUN_AS_ROOT"), env.get("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")} == allowed


@needs_mpi
def test_ranks_flag_sets_the_count_and_one_rank_stays_in_this_process(job, tmp_path):
    with pytest.raises(Became) as became:
        job.start_ranks(["--ranks", "3", "--out", str(tmp_path)])
    assert became.value.args[0][1:3] == ["-n", "3"]
    assert job.start_ranks(["--ranks", "1", "--out", str(tmp_path)]) is None
    assert job.start_ranks(["--data-parallel", "--out", str(tmp_path)]) is None  # already a rank
    # --threads T without --ranks: ranks of T threads each, as many as the cores hold
    assert job.start_ranks(["--threads", str(job.usable_cores()), "--out", str(tmp_path)]) is None


def test_without_mpi4py_the_job_runs_in_one_process_unless_ranks_are_asked_for(job, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(job.importlib.util, "find_spec", lambda name, *a: None if name == "mpi4py" else real(name, *a))
    assert job.start_ranks(["--out", str(tmp_path)]) is None
    with pytest.raises(job.JobError, match="--ranks 2 needs mpi4py and an mpiexec"):
        job.start_ranks(["--ranks", "2", "--out", str(tmp_path)])


def test_main_in_this_process_refuses_more_than_one_rank(job, tmp_path):
    with pytest.raises(job.JobError, match="--ranks 2 starts its processes from the command line only"):
        job.main(["--ranks", "2", "--quick", "--out", str(tmp_path)])


@needs_mpi
def test_the_command_line_job_runs_on_two_ranks(tmp_path):
    """`python examples/mnist_digits.py --ranks 2 --quick`: every output, written once, by rank 0."""
    script = WORKER.parent.parent / "examples" / "mnist_digits.py"
    env = dict(os.environ, PYTHONPATH=str(WORKER.parent.parent), PATH=f"{Path(find_mpiexec()).parent}{os.pathsep}"
               f"{os.environ['PATH']}")  # no launcher_environment: the job must add it itself
    done = subprocess.run([sys.executable, str(script), "--ranks", "2", "--quick", "--samples-per-digit", "1",
                           "--steps", "2", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "[ranks] 2 processes, data parallel" in log, log
    assert log.count("[samples]") == 1, log  # only rank 0 reports
    for name in ("classifier", "vae", "clip", "unet"):
        assert (tmp_path / f"{name}.safetensors").exists()
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "samples.png").exists()
