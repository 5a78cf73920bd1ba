"""Op benchmarks: our kernels vs the NumPy reference vs PyTorch, forward + backward.

    python benchmarks/bench_ops.py                        # CPU, full shapes, table + JSON
    python benchmarks/bench_ops.py --device cuda --repeat 20 --json bench_cuda.json
    python benchmarks/bench_ops.py --quick --no-memory    # tiny shapes: a smoke run

Each row times what a user gets: the tinysd API (tinysd.nn.functional, then
backward) with

    ours        the kernels `kernels.for_array` picks (Numba on the CPU, CuPy on a GPU)
    reference   the same API with TINYSD_KERNELS=reference (plain NumPy / CuPy kernels)
    torch       the same call in PyTorch, when it is installed (a baseline only: the
                library never imports torch)

Method: all implementations run in one process on the same data; each is warmed
up first (Numba and CuPy compile on first use, outside the timings); then every
repeat runs each implementation once, round-robin with the starting one rotated,
and the table shows the median. PyTorch gets as many threads as Numba uses (--threads sets both; NumPy's
BLAS follows OPENBLAS_NUM_THREADS / OMP_NUM_THREADS if set before the start). On
a GPU both libraries are synchronised around every timing and TF32 is off.

Peak memory (conv and attention rows, ours vs torch) is measured for one
forward + backward in a fresh subprocess per (row, implementation), so peaks do
not mix: on the CPU the growth of the resident set's high-water mark (VmHWM,
reset through /proc/self/clear_refs; ru_maxrss growth where that is not
possible) over the resident set after the inputs are built, with compilation
done beforehand on a small batch; on a GPU the peak of CuPy's pool in use
(tracked by a wrapping allocator) vs torch.cuda.max_memory_allocated, each
above the memory in use before the call.
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

# tinysd asks OpenMP to let idle threads sleep (tinysd/__init__.py, when imported first); torch shares that OpenMP
# runtime, which reads the setting once, when torch is imported first. Without this line tinysd's
# parallel kernels would spin under torch's default (a 512 x 512 SD VAE decode: 23 s instead of 14.5 s);
# torch itself ran 0-9% slower with it at SD size. OMP_WAIT_POLICY=ACTIVE in the environment overrides it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as tinysd/__init__.py sets it when imported before NumPy

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import kernels
import tinysd
import tinysd.nn.functional as F
import tinysd.optim

try:
    import torch
    import torch.nn.functional as torch_F
except ImportError:
    torch = None

IMPLS = ("ours", "reference", "torch")


# ---- the rows -----------------------------------------------------------------------------------------
class Case:
    """One row: `run = case.build(impl, device)`, then each `run()` is one forward + backward (or one step).

    `make(batch)` rebuilds the same case with another batch size (for the small warm-up of the memory runs).
    """

    def __init__(self, op, shape, arrays, build, make, memory=False):
        self.op, self.shape, self.arrays, self.build_fn, self.make, self.memory = op, shape, arrays, build, make, memory

    @property
    def key(self):
        return f"{self.op} {self.shape}"

    def build(self, impl, device):
        return self.build_fn(impl, device, self.arrays())


def _text(shape):
    return "(" + ",".join(map(str, shape)) + ")"


def _random(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s, dtype=np.float32) for s in shapes]


class _FwdBwd:
    """run(): clear the leaves' gradients, y = fn(F, *leaves), y.backward(g)."""

    def __init__(self, impl, device, fn, inputs, grad):
        if impl == "torch":
            if torch is None:
                raise RuntimeError("PyTorch is not installed")
            dev = torch.device(device)
            self.leaves = [torch.tensor(a, device=dev, requires_grad=True) for a in inputs]
            self.grad, self.F = torch.tensor(grad, device=dev), torch_F
        else:
            self.leaves = [tinysd.tensor(a, requires_grad=True, device=device) for a in inputs]
            self.grad, self.F = tinysd.tensor(grad, device=device), F
        self.fn, self.kernels = fn, "reference" if impl == "reference" else "auto"

    def reset(self):
        for t in self.leaves:
            t.grad = None

    def __call__(self):
        self.reset()
        with _kernels(self.kernels):
            self.fn(self.F, *self.leaves).backward(self.grad)


@contextlib.contextmanager
def _kernels(name):
    """Pick tinysd's kernels for this block: "reference", or "auto" (what for_array chooses)."""
    old = os.environ.get("TINYSD_KERNELS")
    os.environ["TINYSD_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["TINYSD_KERNELS"]
        else:
            os.environ["TINYSD_KERNELS"] = old


def _fwd_bwd_case(op, shape, make, fn, input_shapes, out_shape, memory=False):
    def arrays():
        *inputs, grad = _random(0, *input_shapes, out_shape)
        return inputs, grad

    def build(impl, device, data):
        return _FwdBwd(impl, device, fn, *data)

    return Case(op, shape, arrays, build, make, memory)


def conv_case(n, c, h, w, o, stride):
    out_hw = ((h - 1) // stride + 1, (w - 1) // stride + 1)  # 3x3, padding 1

    def fn(F, x, weight):
        return F.conv2d(x, weight, stride=stride, padding=1)

    shape = f"{_text((n, c, h, w))}->{o} 3x3 p1" + (f" s{stride}" if stride != 1 else "")
    make = lambda b: conv_case(b, c, h, w, o, stride)
    return _fwd_bwd_case("conv2d", shape, make, fn, [(n, c, h, w), (o, c, 3, 3)], (n, o, *out_hw), memory=True)


def attention_case(b, heads, sq, d, sk=None):
    sk = sq if sk is None else sk
    shape = f"q {_text((b, heads, sq, d))}" + (f" kv {_text((b, heads, sk, d))}" if sk != sq else " = k = v")
    make = lambda n: attention_case(n, heads, sq, d, sk)
    fn = lambda F, q, k, v: F.scaled_dot_product_attention(q, k, v)
    shapes = [(b, heads, sq, d), (b, heads, sk, d), (b, heads, sk, d)]
    op = "attention" if sk == sq else "cross-attention"
    return _fwd_bwd_case(op, shape, make, fn, shapes, (b, heads, sq, d), memory=True)


def group_norm_case(n, c, h, w, groups):
    fn = lambda F, x, weight, bias: F.group_norm(x, groups, weight, bias)
    make = lambda b: group_norm_case(b, c, h, w, groups)
    shape = f"{_text((n, c, h, w))} {groups} groups"
    return _fwd_bwd_case("group_norm", shape, make, fn, [(n, c, h, w), (c,), (c,)], (n, c, h, w))


def layer_norm_case(m, d):
    fn = lambda F, x, weight, bias: F.layer_norm(x, (d,), weight, bias)
    make = lambda b: layer_norm_case(b, d)
    return _fwd_bwd_case("layer_norm", _text((m, d)), make, fn, [(m, d), (d,), (d,)], (m, d))


def softmax_case(*shape):
    fn = lambda F, x: F.softmax(x, dim=-1)
    make = lambda b: softmax_case(b, *shape[1:])
    return _fwd_bwd_case("softmax", f"{_text(shape)} dim=-1", make, fn, [shape], shape)


def adamw_case(total, tensors, torch_foreach):
    """One AdamW step over `total` parameters in `tensors` tensors; torch with foreach=False or its default."""
    size = total // tensors
    label = "foreach=False" if torch_foreach is False else "default"

    def arrays():
        return _random(1, *[(size,)] * (2 * tensors))

    def build(impl, device, data):
        params, grads = data[:tensors], data[tensors:]
        if impl == "torch":
            if torch is None:
                raise RuntimeError("PyTorch is not installed")
            ps = [torch.tensor(p, device=device, requires_grad=True) for p in params]
            for p, g in zip(ps, grads):
                p.grad = torch.tensor(g, device=device)
            return torch.optim.AdamW(ps, lr=1e-3, foreach=torch_foreach).step
        ps = [tinysd.tensor(p, requires_grad=True, device=device) for p in params]
        for p, g in zip(ps, grads):
            p.grad = tinysd.tensor(g, device=device)
        optimizer = tinysd.optim.AdamW(ps, lr=1e-3)
        name = "reference" if impl == "reference" else "auto"

        def step():
            with _kernels(name):
                optimizer.step()

        return step

    return Case("adamw_step", f"{total / 1e6:g}M params in {tensors} tensors (torch {label})", arrays, build, None)


def cases(quick):
    """The rows of the table (tiny shapes with quick=True, for a smoke run)."""
    if quick:
        return [
            conv_case(2, 4, 8, 8, 4, 1),
            conv_case(2, 4, 8, 8, 8, 2),
            attention_case(2, 2, 8, 4),
            attention_case(2, 2, 8, 4, sk=3),
            group_norm_case(2, 8, 4, 4, 4),
            layer_norm_case(16, 8),
            softmax_case(2, 2, 4, 4),
            adamw_case(1000, 4, False),
        ]
    return [
        conv_case(128, 64, 8, 8, 64, 1),
        conv_case(128, 128, 4, 4, 128, 1),
        conv_case(128, 32, 32, 32, 32, 1),
        conv_case(64, 64, 16, 16, 64, 1),
        conv_case(128, 32, 32, 32, 64, 2),
        attention_case(128, 4, 64, 32),
        attention_case(128, 4, 64, 32, sk=8),
        group_norm_case(128, 64, 16, 16, 8),
        layer_norm_case(8192, 128),
        softmax_case(128, 4, 64, 64),
        adamw_case(5_000_000, 50, False),
        adamw_case(5_000_000, 50, None),
    ]


# ---- devices, threads, timing -------------------------------------------------------------------------
def _torch_device_ok(device):
    return torch is not None and (device == "cpu" or torch.cuda.is_available())


def setup_device(device, threads=None):
    """Match thread counts (CPU: `threads`, default Numba's) or turn TF32 off (GPU); return the settings."""
    info = {"device": device, "cpu_count": os.cpu_count()}
    if device == "cpu":
        try:
            import numba

            if threads:
                tinysd.set_num_threads(threads)  # Numba's threads and NumPy's BLAS threads
            threads = numba.get_num_threads()
        except ImportError:
            threads = threads or os.cpu_count()
        info["numba_threads"] = threads
        info["blas_threads_env"] = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        info["openblas_coretype_env"] = os.environ.get("OPENBLAS_CORETYPE")
        if torch is not None:
            torch.set_num_threads(threads)
            info["torch_threads"] = torch.get_num_threads()
    elif torch is not None and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        info["gpu"] = torch.cuda.get_device_name()
    return info


def synchronize(device):
    if device == "cuda":
        cp = tinysd.backend.cupy_or_none()
        cp.cuda.Device().synchronize()
        if torch is not None and torch.cuda.is_available():
            torch.cuda.synchronize()


def time_case(case, impls, device, repeat, per_turn=3, settle=0.1, warmup=2, clock=time.perf_counter):
    """Median milliseconds per implementation, interleaved round-robin; errors by implementation.

    Each round gives every implementation a turn: a pause of `settle` seconds, one untimed
    call, then `per_turn` timed calls back to back, as in a training loop. The pause lets the
    previous implementation's thread pools (OpenMP, OpenBLAS) go idle: their threads keep
    spinning for a while after their last job and would otherwise steal this one's cores.
    `clock`: wall time by default; time.process_time (CPU seconds of this process) is steadier
    on a loaded machine when every library runs on one thread.
    """
    runs, errors = {}, {}
    for impl in impls:
        try:
            run = case.build(impl, device)
            for _ in range(warmup):
                run()
            runs[impl] = run
        except Exception as e:  # noqa: BLE001 (a missing kernel, no torch on this device, ...: report, go on)
            errors[impl] = f"{type(e).__name__}: {e}"
    order, times = list(runs), {impl: [] for impl in runs}
    for r in range(repeat if order else 0):
        for impl in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
            time.sleep(settle)
            for call in range(-1, per_turn):  # call -1: the untimed one
                synchronize(device)
                start = clock()
                runs[impl]()
                synchronize(device)
                if call >= 0:
                    times[impl].append(clock() - start)
    return {impl: 1e3 * statistics.median(t) for impl, t in times.items()}, errors


# ---- peak memory, one fresh process per measurement ---------------------------------------------------
def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _cpu_peak_bytes(run):
    """Growth of the resident set's peak during run() over the resident set before it."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = _status_kib("VmRSS")
        run()
        return 1024 * (_status_kib("VmHWM") - before), "VmHWM"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        run()
        return 1024 * (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before), "ru_maxrss"


def _gpu_peak_bytes(run, impl):
    """Peak device memory in use during run() above what was in use before it."""
    run()  # compile and warm up first; on a GPU the allocators' caches do not count as in use
    run.reset()
    synchronize("cuda")
    if impl == "torch":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        synchronize("cuda")
        return torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
    cp = tinysd.backend.cupy_or_none()
    pool = cp.get_default_memory_pool()
    before = pool.used_bytes()
    peak = [before]

    def tracking_malloc(size):
        memory = pool.malloc(size)
        peak[0] = max(peak[0], pool.used_bytes())
        return memory

    cp.cuda.set_allocator(tracking_malloc)
    try:
        run()
        synchronize("cuda")
    finally:
        cp.cuda.set_allocator(pool.malloc)
    return peak[0] - before, "cupy pool peak used_bytes"


def measure_memory_here(key, impl, device, quick, threads):
    """In this (fresh) process: peak bytes of one forward + backward of row `key` with `impl`."""
    setup_device(device, threads)
    case = next(c for c in cases(quick) if c.key == key)
    if device == "cuda":
        return _gpu_peak_bytes(case.build(impl, device), impl)
    case.make(2).build(impl, device)()  # compile (Numba) / initialise (torch) on a small batch first
    run = case.build(impl, device)
    return _cpu_peak_bytes(run)


def measure_memory(case, impl, device, quick, threads):
    """Run measure_memory_here in a fresh subprocess; (bytes, method) or (None, error)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--device", device, "--memory-of", case.key, impl]
    cmd += (["--quick"] if quick else []) + (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if re.match(r"[\w.]+(Error|Exception): ", line)]
        return None, (errors or ["failed"])[-1][:300]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["bytes"], result["method"]


# ---- the report ---------------------------------------------------------------------------------------
def _fmt_ms(value):
    return "-" if value is None else f"{value:.3g}" if value < 10 else f"{value:.1f}"


def _fmt_mib(nbytes):
    mib = nbytes / 2**20
    return f"{mib:.1f}" if mib < 10 else f"{mib:.0f}"


def _ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def format_table(rows):
    """One line per row: times in ms, ours/torch time ratio, ours/torch peak memory (MiB)."""
    head = ("op", "shape", "ours ms", "ref ms", "torch ms", "ours/torch", "mem ours/torch")
    lines = [head]
    for r in rows:
        ms, mem = r["ms"], r.get("memory_bytes") or {}
        ratio, mem_ratio = r["ours_over_torch"], r.get("memory_ours_over_torch")
        mem_text = "-"
        if mem_ratio is not None:
            mem_text = f"{mem_ratio:.2f}x ({_fmt_mib(mem['ours'])}/{_fmt_mib(mem['torch'])} MiB)"
        times = [_fmt_ms(ms.get(impl)) for impl in IMPLS]
        lines.append((r["op"], r["shape"], *times, "-" if ratio is None else f"{ratio:.2f}x", mem_text))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    lines.insert(1, ["-" * w for w in widths])
    # text columns to the left, numbers to the right
    return "\n".join(
        "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))) for line in lines
    )


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", default=None, help="write the results here (default bench_ops_<device>.json)")
    p.add_argument("--repeat", type=int, default=None, help="rounds of turns (default 7, quick 2)")
    p.add_argument("--per-turn", type=int, default=3, help="timed calls per implementation and round (default 3)")
    p.add_argument("--settle", type=float, default=0.1, help="seconds of pause before each turn (default 0.1)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run, not a measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for Numba and torch (default: Numba's)")
    p.add_argument("--only", default=None, help="only rows whose 'op shape' contains this text")
    p.add_argument("--memory-of", nargs=2, metavar=("ROW", "IMPL"), help=argparse.SUPPRESS)  # internal
    return p.parse_args(argv)


def run_row(case, impls, args, repeat):
    """Time one row (and measure its memory); the JSON entry."""
    ms, errors = time_case(case, impls, args.device, repeat, args.per_turn, args.settle)
    row = {"op": case.op, "shape": case.shape, "ms": ms, "errors": errors,
           "ours_over_torch": _ratio(ms.get("ours"), ms.get("torch"))}  # fmt: skip
    if case.memory and not args.no_memory:
        measured = {
            impl: measure_memory(case, impl, args.device, args.quick, args.threads)
            for impl in ("ours", "torch")
            if impl in impls
        }
        row["memory_bytes"] = {impl: nbytes for impl, (nbytes, _) in measured.items()}
        row["memory_method"] = {impl: method for impl, (_, method) in measured.items()}
        row["memory_ours_over_torch"] = _ratio(row["memory_bytes"].get("ours"), row["memory_bytes"].get("torch"))
    progress = ", ".join(f"{impl} {t:.3g} ms" for impl, t in ms.items())
    print(f"  {case.key}: {progress}" + "".join(f"  [{k}: {v}]" for k, v in errors.items()), file=sys.stderr)
    return row


MEMORY_NOTE = {
    "cpu": "CPU: growth of the resident set's high-water mark (VmHWM) over the resident set before the call",
    "cuda": "GPU: peak in use of CuPy's pool vs torch.cuda.max_memory_allocated, above what was in use before",
}


def main(argv=None):
    args = parse_args(argv)
    if args.memory_of:  # we are the subprocess of one memory measurement
        nbytes, method = measure_memory_here(*args.memory_of, args.device, args.quick, args.threads)
        print(json.dumps({"bytes": int(nbytes), "method": method}))
        return 0
    if args.device == "cuda" and not tinysd.cuda.is_available():
        raise SystemExit("bench_ops: --device cuda needs CuPy and an NVIDIA GPU")
    repeat = args.repeat or (2 if args.quick else 7)
    settings = setup_device(args.device, args.threads)
    impls = [i for i in IMPLS if i != "torch" or _torch_device_ok(args.device)]
    settings.update(
        repeat=repeat, quick=args.quick, dtype="float32", per_turn=args.per_turn, settle_s=args.settle,
        timing="median ms of forward+backward; round-robin turns: pause, 1 untimed call, per_turn timed calls",
        ours_kernels=kernels.for_array(tinysd.zeros(1, device=args.device).data).__name__,
        python=platform.python_version(), numpy=np.__version__, torch=None if torch is None else torch.__version__,
    )  # fmt: skip
    rows = [run_row(case, impls, args, repeat) for case in cases(args.quick) if not args.only or args.only in case.key]
    print(format_table(rows))
    print(f"\n{settings}")
    if not args.no_memory:
        print("memory: peak of one forward+backward, a fresh process per (row, impl); " + MEMORY_NOTE[args.device])
    path = args.json or f"bench_ops_{args.device}.json"
    with open(path, "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
