"""A small, resumable training loop shared by every stage of the examples.

    summary = train(model, optimizer, loss_fn, batch_for_step, steps, resume_path=...)

Each step draws the batch for that step number, computes `loss_fn(batch)`,
backpropagates, optionally clips the global gradient norm, sets the learning
rate from a schedule, steps the optimizer and updates an EMA of the weights.

Nothing silently wrong: the first non-finite loss, gradient or learning rate
stops training with a `NonFiniteError` naming the step, before the step's
update and before anything is saved, so a NaN never reaches a checkpoint.

Exact resume: every `save_every` steps the model, optimizer, EMA, the losses so
far and the state of the random generator the loss draws from go to
`resume_path` (atomically). Batches are a pure function of the step number, so
a run interrupted at step k and resumed from that file repeats, bit for bit,
what an uninterrupted run computes. The file also holds a `fingerprint` of what
produced it (the caller's config); a resume file with another one is refused
instead of continued.
"""

import json
import math
import os
import time

import numpy as np
from tqdm import tqdm

from . import distributed, io, optim
from .tensor import default_generator


class NonFiniteError(FloatingPointError):
    """Training met a NaN or infinite loss, gradient or learning rate."""


class ResumeMismatchError(ValueError):
    """A resume file that cannot be continued: damaged, or written by another configuration."""


def epoch_batches(n, batch_size, seed):
    """batch_for_step(step) -> index array: a fresh permutation of range(n) per epoch."""
    if not 0 < batch_size <= n:
        raise ValueError(f"epoch_batches: batch_size {batch_size} must be in 1..{n} (the number of examples)")
    per_epoch = n // batch_size
    cache = {}

    def batch_for_step(step):
        epoch, i = divmod(step, per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng((seed, epoch)).permutation(n)
        return cache[epoch][i * batch_size : (i + 1) * batch_size]

    return batch_for_step


def train(
    model,
    optimizer,
    loss_fn,
    batch_for_step,
    steps,
    *,
    lr_at=None,
    clip_norm=None,
    ema=None,
    resume_path=None,
    save_every=None,
    fingerprint="",
    generator=None,
    desc="train",
    batch_size=None,
    progress=True,
):
    """Run `steps` optimizer steps; return {"final_loss", "wall_s", "images_per_s", "steps"}.

    loss_fn(batch) -> scalar Tensor; batch_for_step(step) -> whatever loss_fn takes.
    lr_at(step) -> learning rate (optional). batch_size is used for the images/s figure.
    generator: the numpy Generator loss_fn draws from (default: tinysd's global one); its
    state is saved with the resume file. save_every: steps between resume files (default:
    a quarter of the run, at most 100).
    Data parallel (see tinysd.distributed): batch_for_step gives the global batch, loss_fn
    takes its rank's shard of it; only rank 0 shows progress and writes the resume file.
    """
    generator = generator or default_generator()
    save_every = save_every or max(1, min(100, steps // 4))
    losses = []
    start = 0
    if resume_path:
        start, losses = _load_resume(resume_path, model, optimizer, ema, generator, fingerprint)
    # Data parallel (after distributed.init(); no-ops otherwise): every rank starts from rank 0's
    # weights at the same step, and averages its gradients with the others' after each backward().
    distributed.check_same({"resume step": start}, f"where {desc} starts")
    distributed.broadcast_parameters(model.state_dict().values())
    model.train()
    t0, seen = time.perf_counter(), 0
    show = progress and distributed.is_main()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not show, leave=False)
    for step in bar:
        if lr_at is not None:
            optimizer.lr = _check_finite(desc, "learning rate", lr_at(step), step, steps)
        loss = loss_fn(batch_for_step(step))
        value = _check_finite(desc, "loss", loss.item(), step, steps)
        optimizer.zero_grad()
        loss.backward()
        value = distributed.average_gradients(model.parameters(), value)  # the mean over ranks
        params = model.parameters()
        norm = optim.clip_grad_norm_(params, clip_norm) if clip_norm is not None else optim.grad_norm(params)
        _check_finite(desc, "gradient norm", norm, step, steps)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        losses.append(value)
        seen += batch_size or 0
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", img_s=f"{rate:.0f}")
        io.crash_point(f"{desc} step {step + 1}")
        if resume_path and (step + 1) % save_every == 0 and step + 1 < steps and distributed.is_main():
            _save_resume(resume_path, model, optimizer, ema, generator, fingerprint, step + 1, losses)
    bar.close()
    wall = time.perf_counter() - t0
    final = float(np.mean(losses[-50:])) if losses else None
    return {"final_loss": final, "wall_s": wall, "images_per_s": seen / wall if wall > 0 else 0.0, "steps": steps}


def _check_finite(desc, what, value, step, steps):
    """value, or a NonFiniteError naming the stage, the quantity and the step."""
    if not math.isfinite(value):
        raise NonFiniteError(
            f"{desc}: the {what} is {value} at step {step + 1} of {steps}; training stopped before this "
            f"step's update, and nothing of it was saved. Look for a NaN, infinite or too large "
            f"learning rate, loss weight or input."
        )
    return value


def _save_resume(path, model, optimizer, ema, generator, fingerprint, step, losses):
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"optim.{k}": v for k, v in optimizer.state_dict().items()})
    if ema is not None:
        state.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    state["train.losses"] = np.asarray(losses, dtype=np.float64)
    metadata = {"step": str(step), "rng": json.dumps(generator.bit_generator.state), "fingerprint": fingerprint}
    io.save_file(state, path, metadata=metadata)


def _load_resume(path, model, optimizer, ema, generator, fingerprint):
    """Restore a resume file if there is one; return (the step to continue from, the losses so far)."""
    if not os.path.exists(path):
        return 0, []
    try:
        state, metadata = io.load_file_and_metadata(path)
    except ValueError as err:
        raise ResumeMismatchError(f"{err}; delete it to start this stage over") from None
    if metadata.get("fingerprint", "") != fingerprint:
        raise ResumeMismatchError(
            f"{path} was written by a run with other settings ({metadata.get('fingerprint') or 'unknown'}), "
            f"not this one ({fingerprint}); delete it to start this stage over"
        )

    def part(prefix):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    model.load_state_dict(part("model."))
    optimizer.load_state_dict(part("optim."))
    if ema is not None:
        ema.load_state_dict(part("ema."))
    generator.bit_generator.state = json.loads(metadata["rng"])
    step = int(metadata["step"])
    print(f"resuming from {path} at step {step}")
    return step, state["train.losses"].tolist()
