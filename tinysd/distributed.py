"""Data-parallel training over processes: MPI between CPUs, NCCL between GPUs.

    mpiexec -n 4 python train.py          # 4 processes ("ranks"), each a full copy of the model

Every rank holds the same parameters. Each step:
  1. every rank takes its equal slice of the step's global batch            shard(batch)
  2. forward and backward on that slice, as a single process would
  3. the gradients are averaged over the ranks                              average_gradients(...)

         g = (1/R) sum_r g_r

     g_r is the gradient of the mean loss over rank r's B samples. For a loss that is a mean
     over samples, g is then exactly the gradient of the mean over all R*B samples: every
     rank takes the step a single process would take on the whole global batch, so the
     parameters, broadcast from rank 0 at the start, stay equal on every rank.

Gradients travel packed into a few flat buffers (one all-reduce per buffer, not one per
tensor). On NumPy arrays the all-reduce goes through MPI (mpi4py); on CuPy arrays through
NCCL (`cupy.cuda.nccl`), with MPI used only to hand every rank the NCCL id.

Without `init()`, without mpi4py, or in a single process, every function here is a no-op:
rank() == 0, world_size() == 1, shard(batch) is batch. The engine never imports this file.

Faults end the job instead of hanging it: a watchdog thread watches every collective and,
after `timeout_s` (a dead or stuck rank, ranks running different code), prints what it waited
for and aborts all ranks (MPI Abort); an uncaught exception on any rank aborts them all too.
`check_same` compares a digest of named values (arguments, code, data) across ranks and
raises a clear error naming what differs.
"""

import hashlib
import os
import sys
import threading
import time

import numpy as np

from . import backend

DEFAULT_TIMEOUT_S = 300.0
_BUCKET_BYTES = 16 << 20  # gradients are packed into flat buffers of at most this size

_comm = None  # the MPI communicator while more than one rank runs, else None
_local_comm = None  # the ranks on this machine
_nccl = None  # the NCCL communicator, made on the first collective over CuPy arrays
_timeout_s = DEFAULT_TIMEOUT_S


# ---- who am I ----------------------------------------------------------------------------------
def launcher_environment(environ=None):
    """The environment to start `mpiexec` in: `environ` (default os.environ), and where this process
    runs as root (as in most containers), Open MPI's two variables that let its mpiexec start
    as root; without them it refuses and exits (MPICH's mpiexec starts either way)."""
    env = dict(os.environ if environ is None else environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def init(timeout_s=None, device="cpu"):
    """Join the ranks started by mpiexec (or a cluster's launcher); return world_size().

    One process (or plain `python train.py`) leaves everything single-process. timeout_s
    (default $TINYSD_DIST_TIMEOUT or 300) bounds every collective. With device "cuda", each
    rank uses GPU (local rank mod GPU count) of its machine.
    """
    global _comm, _local_comm, _timeout_s
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError("data-parallel training needs mpi4py and an MPI: pip install mpi4py mpich") from e
    _timeout_s = float(timeout_s if timeout_s is not None else os.environ.get("TINYSD_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if MPI.COMM_WORLD.Get_size() > 1:
        _comm = MPI.COMM_WORLD
        _local_comm = _comm.Split_type(MPI.COMM_TYPE_SHARED)
        sys.excepthook = _abort_on_uncaught  # one rank's error must not leave the others waiting
        threading.Thread(target=_watchdog, daemon=True, name="tinysd.distributed watchdog").start()
    if device == "cuda":
        if not backend.cuda_is_available():
            raise RuntimeError("distributed.init(device='cuda'): CuPy or an NVIDIA GPU is not available")
        cp = backend.cupy_or_none()
        cp.cuda.Device(local_rank() % cp.cuda.runtime.getDeviceCount()).use()
    return world_size()


def rank():
    return _comm.Get_rank() if _comm is not None else 0


def world_size():
    return _comm.Get_size() if _comm is not None else 1


def is_main():
    """True on rank 0, the one rank that writes files and prints progress."""
    return rank() == 0


def local_rank():
    return _local_comm.Get_rank() if _local_comm is not None else 0


def local_world_size():
    """How many ranks run on this machine (to split its cores or GPUs between them)."""
    return _local_comm.Get_size() if _local_comm is not None else 1


# ---- the three steps of data parallelism ---------------------------------------------------------
def shard(batch):
    """This rank's equal slice of a global batch (anything with len() and slicing)."""
    if _comm is None:
        return batch
    n, world = len(batch), world_size()
    if n % world:
        raise ValueError(f"distributed.shard: a global batch of {n} does not split evenly over {world} ranks")
    per_rank = n // world
    return batch[rank() * per_rank : (rank() + 1) * per_rank]


def broadcast_parameters(tensors):
    """Overwrite every tensor's values with rank 0's (call once, before training)."""
    broadcast_arrays([t.data for t in tensors], "parameters")


def broadcast_arrays(arrays, what="arrays"):
    """Overwrite every array, in place, with rank 0's values."""
    _in_place(arrays, f"broadcast of {what}", _broadcast_mpi, _broadcast_nccl)


def sum_arrays(arrays, what="arrays"):
    """Every array <- its sum over the ranks, in place. With each entry computed by one rank and
    left zero on the others, this hands every rank the whole result, exactly (x + 0 = x)."""
    _in_place(arrays, f"sum of {what}", _sum_mpi, _sum_nccl)


def _in_place(arrays, what, on_mpi, on_nccl):
    """One collective over `arrays`, packed into flat buffers, the results written back into them."""
    if _comm is None:
        return
    for bucket in _buckets(arrays):
        flat = _pack(bucket)
        _collective(what, flat, on_mpi, on_nccl)
        _unpack(flat, bucket)


def average_gradients(parameters, loss=None):
    """After backward(): every .grad <- the mean of that gradient over the ranks.

    Parameters without a gradient are left out (the same ones on every rank, checked once
    per layout). `loss` (a float) rides along in the last buffer; its mean is returned.
    """
    if _comm is None:
        return loss
    with_grad = [p for p in parameters if p.grad is not None]
    _check_layout(with_grad)
    grads = [p.grad.data for p in with_grad]
    buckets = list(_buckets(grads))
    mean_loss = loss
    for i, bucket in enumerate(buckets):
        extra = [loss] if loss is not None and i == len(buckets) - 1 else []
        flat = _pack(bucket, extra)
        _collective("all-reduce of gradients", flat, _sum_mpi, _sum_nccl)
        flat /= world_size()
        _unpack(flat, bucket)
        if extra:
            mean_loss = float(flat[-1])
    if not buckets and loss is not None:  # no gradients at all: the loss alone
        flat = np.array([loss], dtype=np.float64)
        _collective("all-reduce of the loss", flat, _sum_mpi, _sum_nccl)
        mean_loss = float(flat[0]) / world_size()
    return mean_loss


def barrier(what="barrier"):
    """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
    if _comm is not None:
        _wait(_comm.Ibarrier(), what)


# ---- ranks that disagree -------------------------------------------------------------------------
def check_same(values, what="run"):
    """Raise on every rank if any named value differs between ranks.

    values: {name: value}; arrays are compared by their bytes, anything else by repr().
    Only SHA-256 digests travel. The error names the values and the ranks that differ.
    """
    if _comm is None:
        return
    names = sorted(values)
    mine = np.frombuffer(b"".join(_digest(values[name]) for name in names), dtype=np.uint8)
    everyone = np.empty((world_size(), mine.size), dtype=np.uint8)
    _wait(_comm.Iallgather(mine, everyone), f"consistency check of {what}")
    digests = everyone.reshape(world_size(), len(names), 32)
    differs = (digests != digests[0]).any(axis=2)  # (rank, name): differs from rank 0's
    differ = [f"{name} (ranks {np.flatnonzero(differs[:, i]).tolist()} differ from rank 0)"
              for i, name in enumerate(names) if differs[:, i].any()]
    if differ:
        raise RuntimeError(f"data-parallel ranks disagree on {what}: " + "; ".join(differ))


def source_digest(paths):
    """A SHA-256 of the Python files under the given files or folders (to check ranks run the same code)."""
    h = hashlib.sha256()
    for path in paths:
        files = sorted(_walk_py(str(path)))
        for file in files:
            with open(file, "rb") as f:
                h.update(os.path.relpath(file, str(path)).encode() + b"\0" + f.read())
    return h.hexdigest()


def _walk_py(path):
    if os.path.isfile(path):
        yield path
        return
    for folder, _, names in os.walk(path):
        yield from (os.path.join(folder, n) for n in names if n.endswith(".py"))


def _digest(value):
    if hasattr(value, "dtype") and hasattr(value, "shape"):  # NumPy or CuPy array
        array = np.ascontiguousarray(value.get() if backend.is_cupy_array(value) else value)
        return hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).digest()
    return hashlib.sha256(repr(value).encode()).digest()


_checked_layouts = set()


def _check_layout(with_grad):
    layout = tuple((p.grad.data.shape, p.grad.data.dtype) for p in with_grad)
    if layout not in _checked_layouts:
        check_same({"shapes and dtypes of the gradients": layout}, "the gradients to average")
        _checked_layouts.add(layout)


# ---- flat buffers --------------------------------------------------------------------------------
def _buckets(arrays):
    """Consecutive arrays of one dtype, grouped until a group reaches _BUCKET_BYTES."""
    bucket, size = [], 0
    for a in arrays:
        if bucket and (a.dtype != bucket[0].dtype or size + a.nbytes > _BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(a)
        size += a.nbytes
    if bucket:
        yield bucket


def _pack(arrays, extra=()):
    """One flat array holding every array's values, then the numbers in `extra`."""
    xp = backend.array_module(arrays[0])
    return xp.concatenate([a.ravel() for a in arrays] + [xp.asarray(extra, dtype=arrays[0].dtype)])


def _unpack(flat, arrays):
    """Copy the flat buffer's values back into the arrays, in place."""
    start = 0
    for a in arrays:
        a[...] = flat[start : start + a.size].reshape(a.shape)
        start += a.size


# ---- the collectives: MPI on NumPy arrays, NCCL on CuPy arrays, both with a deadline -------------
def _collective(what, flat, on_mpi, on_nccl):
    if _comm is None:
        return
    (on_nccl if backend.is_cupy_array(flat) else on_mpi)(flat, what)


def _sum_mpi(flat, what):
    from mpi4py import MPI

    _wait(_comm.Iallreduce(MPI.IN_PLACE, flat, op=MPI.SUM), what)


def _broadcast_mpi(flat, what):
    _wait(_comm.Ibcast(flat, root=0), what)


_waiting_for = None  # (since when, what) while a collective is under way


def _wait(request, what, spin_s=0.05):
    """Wait for an MPI request; the watchdog aborts every rank after the timeout.

    MPI moves data only while a rank polls: poll flat out for the first 50 ms (2 ranks on a
    busy machine, 3.8 MB: 0.7 ms polled so, 3-6 ms in a blocking Wait), then sleep between
    polls, so a rank waiting for a slower one leaves it the cores.
    """
    global _waiting_for
    start, pause = time.monotonic(), 1e-4
    _waiting_for = (start, what)
    while not request.Test():
        if time.monotonic() - start > spin_s:
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
    _waiting_for = None


def _watchdog():
    """Runs beside the main thread: aborts every rank when a collective outlives the timeout."""
    while True:
        time.sleep(0.1)
        waiting = _waiting_for
        if waiting is not None and time.monotonic() - waiting[0] > _timeout_s:
            _abort(waiting[1])


def _sum_nccl(flat, what):
    nccl, stream = _nccl_communicator(), backend.cupy_or_none().cuda.get_current_stream()
    _nccl.allReduce(flat.data.ptr, flat.data.ptr, flat.size, _nccl_dtype(flat), nccl.NCCL_SUM, stream.ptr)
    _wait_stream(stream, what)


def _broadcast_nccl(flat, what):
    _nccl_communicator()
    stream = backend.cupy_or_none().cuda.get_current_stream()
    _nccl.bcast(flat.data.ptr, flat.size, _nccl_dtype(flat), 0, stream.ptr)
    _wait_stream(stream, what)


def _nccl_communicator():
    """The NCCL communicator (made once): rank 0 draws the NCCL id, MPI hands it to the others."""
    global _nccl
    from cupy.cuda import nccl

    if _nccl is None:
        uid = np.array(nccl.get_unique_id() if is_main() else [0] * 128, dtype=np.int64)  # 128 chars
        _broadcast_mpi(uid, "broadcast of the NCCL id")
        _nccl = nccl.NcclCommunicator(world_size(), tuple(int(v) for v in uid), rank())
    return nccl


def _nccl_dtype(flat):
    from cupy.cuda import nccl

    names = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
             "int32": "NCCL_INT32", "int64": "NCCL_INT64"}
    if str(flat.dtype) not in names:
        raise TypeError(f"distributed: NCCL collectives take {sorted(names)}, got {flat.dtype}")
    return getattr(nccl, names[str(flat.dtype)])


def _wait_stream(stream, what):
    """Poll a CUDA stream until the NCCL call on it is done; abort every rank after the timeout."""
    deadline = time.monotonic() + _timeout_s
    while not stream.done:
        if time.monotonic() > deadline:
            _nccl.abort()
            _abort(what)
        time.sleep(1e-4)


def _abort(what):
    sys.stderr.write(
        f"\ntinysd.distributed: rank {rank()} of {world_size()} waited {_timeout_s:g} s for the {what}; "
        "another rank has died, hangs, or runs different code. Aborting every rank.\n"
    )
    _abort_all()


def _abort_all():
    """MPI Abort, once this rank's last words have had time to reach the terminal: mpiexec (MPICH's
    launcher) forwards each rank's output through pipes and, when a rank aborts, tears everything
    down, at times before it has relayed what was just written (about one run in six here)."""
    sys.stderr.flush()
    time.sleep(_LAST_WORDS_S)
    _comm.Abort(1)


_LAST_WORDS_S = 0.5


def _abort_on_uncaught(kind, value, traceback):
    if issubclass(kind, KeyboardInterrupt):  # Ctrl-C reaches every rank: one line, no traceback
        sys.stderr.write(f"tinysd.distributed: rank {rank()} interrupted; stopping every rank.\n")
    else:
        sys.__excepthook__(kind, value, traceback)
        sys.stderr.write(f"tinysd.distributed: rank {rank()} failed; aborting every rank.\n")
    _abort_all()
