"""Data parallel on one machine: R ranks x 1 thread against 1 process x R threads (and x 1), per stage.

    python benchmarks/bench_data_parallel.py                   # 3 rounds, 2 ranks: table + JSON
    python benchmarks/bench_data_parallel.py --rounds 1 --ranks 2 --steps-scale 0.3

After one untimed warm-up run (Numba fills its cache), each round runs the three set-ups,
the order rotating, in fresh processes: the main job's
four stages (examples/mnist_digits.py) at their full batch sizes for a few steps on a 4,096
image subset; images/s per stage come from the stages' own summaries (training steps only,
first step included). The multi-rank run then times the gradient all-reduce alone: for each
stage's parameters, the median of 20 `distributed.average_gradients` calls, the ranks kept in
step by the calls themselves. Bytes per step are the gradients' float32 bytes (+ the loss).
Needs mpi4py and an mpiexec (`pip install mpi4py mpich`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS = dict(classifier=60, vae=30, clip=30, unet=40)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count")
    p.add_argument("--json", default="bench_data_parallel.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data-parallel", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--allreduce-only", action="store_true", help="only time the all-reduce on --ranks ranks")
    return p.parse_args(argv)


# ---- one run: the four stages, then (with several ranks) the all-reduce alone ------------------------
def worker(args):
    import importlib.util

    import tinysd
    from tinysd import distributed
    from tinysd.models import AutoencoderKL, CLIPModel, DigitClassifier, UNet2DConditionModel
    from tinysd.tokenizer import Tokenizer

    spec = importlib.util.spec_from_file_location("mnist_digits", ROOT / "examples" / "mnist_digits.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.QUICK = {name: dict(example.FULL[name], steps=max(2, round(n * args.steps_scale)))
                     for name, n in STEPS.items()}
    example.QUICK["train_subset"] = 4096
    out = args.out  # one folder for every rank, as the main job expects
    flags = ["--quick", "--out", out, "--threads", str(args.threads), "--samples-per-digit", "1", "--steps", "2"]
    if args.allreduce_only:
        distributed.init()
    else:
        example.main(flags + (["--data-parallel"] if args.data_parallel else []))
    result = {"world_size": distributed.world_size(), "threads": args.threads,
              "stages": {name: {} for name in STEPS}}
    if distributed.is_main() and not args.allreduce_only:
        metrics = json.loads((Path(out) / "metrics.json").read_text())
        result["stages"] = {name: {"images_per_s": metrics[name]["images_per_s"]} for name in STEPS}

    tokenizer = Tokenizer()
    clip = CLIPModel(vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length)
    models = dict(classifier=DigitClassifier(), vae=AutoencoderKL(), clip=clip,
                  unet=UNet2DConditionModel(cross_attention_dim=clip.text_model.width))
    for name, model in models.items():
        params = model.parameters()
        for p in params:
            p.grad = tinysd.Tensor(np.random.default_rng(0).standard_normal(p.shape).astype(p.dtype))
        seconds = []
        for _ in range(21):
            t0 = time.perf_counter()
            distributed.average_gradients(params, 1.0)
            seconds.append(time.perf_counter() - t0)
        if distributed.is_main():
            result["stages"][name].update(
                allreduce_ms=1e3 * float(np.median(seconds[1:])) if distributed.world_size() > 1 else None,
                gradient_bytes=int(sum(p.grad.data.nbytes for p in params)),
                parameters=int(sum(p.size for p in params)))
    if distributed.is_main():
        sys.__stdout__.write("RESULT " + json.dumps(result) + "\n")


# ---- the driver: both set-ups, interleaved, medians --------------------------------------------------
def run_setup(args, ranks, threads):
    from tinysd import distributed

    out = tempfile.mkdtemp(prefix="bench_dp_")
    command = [sys.executable, __file__, "--worker", "--steps-scale", str(args.steps_scale), "--out", out]
    command += ["--allreduce-only"] if args.allreduce_only else []
    if ranks > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
        command = [mpiexec, "-n", str(ranks), *command, "--data-parallel"]
    command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True,
                          env=distributed.launcher_environment(dict(os.environ, PYTHONPATH=str(ROOT))))
    shutil.rmtree(out, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.allreduce_only:
        result = run_setup(args, args.ranks, 1)
        for stage, row in result["stages"].items():
            print(f"{stage:<11} {row['allreduce_ms']:7.2f} ms  {row['gradient_bytes'] / 1e6:5.2f} MB")
        return 0
    setups = {"1 x 1 thread": (1, 1), f"1 x {args.ranks} threads": (1, args.ranks),
              f"{args.ranks} ranks x 1 thread": (args.ranks, 1)}
    run_setup(argparse.Namespace(**{**vars(args), "steps_scale": 0.05}), 1, 1)  # warm-up: Numba's cache
    runs = {name: [] for name in setups}
    for r in range(args.rounds):
        order = list(setups)[r % 3 :] + list(setups)[: r % 3]
        for name in order:
            runs[name].append(run_setup(args, *setups[name]))
            print(f"round {r + 1}: {name} done", flush=True)
    print(f"\nimages/s, medians of {args.rounds} rounds (each stage's training steps, full batch sizes)")
    print(f"{'stage':<11}" + "".join(f"{name:>20}" for name in setups) + f"{'all-reduce ms':>15}{'MB/step':>9}")
    table = {}
    multi = runs[list(setups)[-1]]
    for stage in STEPS:
        rates = {name: float(np.median([run["stages"][stage]["images_per_s"] for run in runs[name]]))
                 for name in setups}
        ms = float(np.median([run["stages"][stage]["allreduce_ms"] for run in multi]))
        mb = multi[0]["stages"][stage]["gradient_bytes"] / 1e6
        table[stage] = dict(images_per_s=rates, allreduce_ms=ms, gradient_mb=mb,
                            parameters=multi[0]["stages"][stage]["parameters"])
        print(f"{stage:<11}" + "".join(f"{v:>20.0f}" for v in rates.values()) + f"{ms:>15.2f}{mb:>9.2f}")
    with open(args.json, "w") as f:
        json.dump({"setups": list(setups), "rounds": args.rounds, "table": table, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
