"""One rank of the data-parallel tests (tests/test_distributed.py starts it with mpiexec, or alone).

A small conv net (conv, GroupNorm, SiLU, linear) trained with tinysd.training.train on fixed
random data: AdamW, gradient clipping, EMA and a resume file, as the main job's stages use
them. Rank 0 writes the final weights to --out. Faults on demand: --kill-rank R --at-step S
(rank R SIGKILLs itself), --hang-rank R --at-step S (rank R stops answering), --interrupt-rank R
--at-step S (Ctrl-C reaches rank R), --other-data-rank R (rank R trains on other data, which the
consistency check must catch).
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tinysd  # noqa: E402
import tinysd.nn as nn  # noqa: E402
import tinysd.nn.functional as F  # noqa: E402
from tinysd import distributed, io, optim  # noqa: E402
from tinysd.training import epoch_batches, train  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--hang-rank", type=int, default=-1)
    p.add_argument("--interrupt-rank", type=int, default=-1)
    p.add_argument("--at-step", type=int, default=2)
    p.add_argument("--other-data-rank", type=int, default=-1)
    return p.parse_args()


def main():
    args = parse_args()
    tinysd.set_num_threads(1)
    distributed.init(timeout_s=args.timeout)
    data_seed = 1 if distributed.rank() == args.other_data_rank else 0
    rng = np.random.default_rng(data_seed)
    images = rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 64)
    distributed.check_same({"training images": images, "training labels": labels}, "the data")

    tinysd.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)
    )
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    ema = optim.EMA(model, decay=0.9)

    def loss_fn(idx):
        step = loss_fn.calls
        loss_fn.calls += 1
        if step == args.at_step and distributed.rank() == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.at_step and distributed.rank() == args.hang_rank:
            time.sleep(3600)
        if step == args.at_step and distributed.rank() == args.interrupt_rank:
            raise KeyboardInterrupt
        idx = distributed.shard(idx)  # this rank's slice of the global batch
        return F.cross_entropy(model(tinysd.tensor(images[idx])), tinysd.tensor(labels[idx]))

    loss_fn.calls = 0
    train(model, opt, loss_fn, epoch_batches(len(images), args.global_batch, seed=0), args.steps,
          clip_norm=0.5, ema=ema, resume_path=args.out + ".resume", save_every=2, progress=False)
    if distributed.is_main():
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        state.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        io.save_file(state, args.out)
    print(f"rank {distributed.rank()} of {distributed.world_size()}: done")


if __name__ == "__main__":
    main()
