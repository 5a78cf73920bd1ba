"""Matrix products on one thread: kernels.blas.matmul vs np.matmul vs PyTorch, for the main job's shapes.

    python benchmarks/bench_blas.py              # table
    python benchmarks/bench_blas.py --json f.json

Each row is one layer's three products, as its forward and backward take them: y = x W^T
(x: M x K, W: N x K), dx = dy W, dW = dy^T x. `blocks` is kernels.blas.matmul (OpenBLAS's
small-matrix kernels, block by block; one sgemm call per product where those kernels are
missing, np.matmul where NumPy's BLAS is not OpenBLAS),
`numpy` np.matmul on the same OpenBLAS, `torch` the same products in PyTorch when it is
installed (MKL on x86; a baseline only). One process, one thread each, interleaved rounds,
medians; the ratios are the truth on a machine whose speed changes with the hour.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import numpy as np

import tinysd
from kernels import blas

SHAPES = [  # (what, M rows, K inputs, N outputs)
    ("UNet 3x3 conv, 32 ch at 8x8 (a chunk of 11 samples)", 704, 288, 32),
    ("UNet 3x3 conv, 64 ch at 4x4 (a chunk of 20 samples)", 320, 576, 64),
    ("UNet attention projection, 32 ch, 128 x 64 tokens", 8192, 32, 32),
    ("UNet feed-forward in (GEGLU), 32 -> 256", 8192, 32, 256),
    ("UNet feed-forward out, 128 -> 32", 8192, 128, 32),
    ("UNet attention projection, 64 ch, 128 x 16 tokens", 2048, 64, 64),
    ("UNet feed-forward in, 64 -> 512", 2048, 64, 512),
    ("VAE 3x3 conv, 8 ch at 32x32 (a chunk of 2 samples)", 2048, 72, 8),
    ("VAE 3x3 conv, 32 ch at 8x8 (a chunk of 5 samples)", 320, 288, 32),
]


def products(x, w, dy, out):
    """The three products of one layer, for `blocks` and for `numpy` (into preallocated outputs)."""
    y, dx, dw = out
    w_t = np.ascontiguousarray(w.T)
    blocked = [lambda: blas.matmul(x, w_t, y), lambda: blas.matmul(dy, w, dx),
               lambda: blas.matmul(dy, x, dw, trans_a=True)]
    plain = [lambda: np.matmul(x, w.T, out=y), lambda: np.matmul(dy, w, out=dx),
             lambda: np.matmul(dy.T, x, out=dw)]
    return blocked, plain


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    tinysd.set_num_threads(1)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print(f"OpenBLAS's sgemm: {'found' if blas._SGEMM is not None else 'not found (np.matmul everywhere)'}; "
          f"small-matrix kernels: {'yes' if blas._SMALL_KERNELS else 'no (one call per product)'}")
    print(f"{'layer':54s} {'M x K -> N':>16s} {'blocks ms':>10s} {'numpy ms':>9s} {'torch ms':>9s} "
          f"{'blocks/numpy':>12s} {'blocks/torch':>12s}")
    rows = []
    for what, m, k, n in SHAPES:
        x, w, dy = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (n, k), (m, n)))
        out = [np.empty(s, np.float32) for s in ((m, n), (m, k), (n, k))]
        blocked, plain = products(x, w, dy, out)
        runs = {"blocks": lambda: [f() for f in blocked], "numpy": lambda: [f() for f in plain]}
        if torch is not None:
            tx, tw, tdy = (torch.from_numpy(a) for a in (x, w, dy))
            runs["torch"] = lambda: (tx @ tw.T, tdy @ tw, tdy.T @ tx)
        times = {name: [] for name in runs}
        for r in range(args.repeat + 3):
            order = list(runs)[r % len(runs):] + list(runs)[: r % len(runs)]
            for name in order:
                t = time.perf_counter()
                runs[name]()
                if r >= 3:  # the first rounds warm up (and compile)
                    times[name].append(time.perf_counter() - t)
        ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
        row = {"layer": what, "m": m, "k": k, "n": n, **{f"{name}_ms": v for name, v in ms.items()}}
        rows.append(row)
        torch_ms = ms.get("torch", float("nan"))
        print(f"{what:54s} {f'{m} x {k} -> {n}':>16s} {ms['blocks']:10.3f} {ms['numpy']:9.3f} {torch_ms:9.3f} "
              f"{ms['blocks'] / ms['numpy']:12.2f} {ms['blocks'] / torch_ms:12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sgemm_found": blas._SGEMM is not None, "small_matrix_kernels": blas._SMALL_KERNELS,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
