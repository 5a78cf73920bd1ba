"""A small, resumable training loop shared by every stage of the examples.

    summary = train(model, optimizer, loss_fn, batch_for_step, steps, resume_path=...)

Each step draws the batch for that step number, computes `loss_fn(batch)`,
backpropagates, optionally clips the global gradient norm, sets the learning
rate from a schedule, steps the optimizer and updates an EMA of the weights.
Batches are a pure function of the step number, so a run interrupted at step
k and resumed from its checkpoint sees exactly the batches it would have seen.
Every `save_every` steps the model, optimizer, EMA and step count go to
`resume_path` (atomically), so Ctrl-C loses at most that much work.
"""

import os
import time

import numpy as np
from tqdm import tqdm

from . import distributed, io, optim


def epoch_batches(n, batch_size, seed):
    """batch_for_step(step) -> index array: a fresh permutation of range(n) per epoch."""
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
    save_every=100,
    desc="train",
    batch_size=None,
    progress=True,
):
    """Run `steps` optimizer steps; return {"final_loss", "wall_s", "images_per_s", "steps"}.

    loss_fn(batch) -> scalar Tensor; batch_for_step(step) -> whatever loss_fn takes.
    lr_at(step) -> learning rate (optional). batch_size is used for the images/s figure.
    Data parallel (see tinysd.distributed): batch_for_step gives the global batch, loss_fn
    takes its rank's shard of it; only rank 0 shows progress and writes the resume file.
    """
    start = _load_resume(resume_path, model, optimizer, ema) if resume_path else 0
    # Data parallel (after distributed.init(); no-ops otherwise): every rank starts from rank 0's
    # weights at the same step, and averages its gradients with the others' after each backward().
    distributed.check_same({"resume step": start}, f"where {desc} starts")
    distributed.broadcast_parameters(model.state_dict().values())
    model.train()
    losses, t0, seen = [], time.perf_counter(), 0
    show = progress and distributed.is_main()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not show, leave=False)
    for step in bar:
        if lr_at is not None:
            optimizer.lr = lr_at(step)
        loss = loss_fn(batch_for_step(step))
        optimizer.zero_grad()
        loss.backward()
        loss_value = distributed.average_gradients(model.parameters(), loss.item())
        if clip_norm is not None:
            optim.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        losses.append(loss_value)
        seen += batch_size or 0
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", img_s=f"{rate:.0f}")
        if resume_path and ((step + 1) % save_every == 0) and distributed.is_main():
            _save_resume(resume_path, model, optimizer, ema, step + 1)
    bar.close()
    wall = time.perf_counter() - t0
    final = float(np.mean(losses[-50:])) if losses else float("nan")
    return {"final_loss": final, "wall_s": wall, "images_per_s": seen / wall if wall > 0 else 0.0, "steps": steps}


def _save_resume(path, model, optimizer, ema, step):
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"optim.{k}": v for k, v in optimizer.state_dict().items()})
    if ema is not None:
        state.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    io.save_file(state, path, metadata={"step": str(step)})


def _load_resume(path, model, optimizer, ema):
    """Restore a resume checkpoint if there is one; return the step to continue from."""
    if not os.path.exists(path):
        return 0
    state, metadata = io.load_file(path), io.load_metadata(path)

    def part(prefix):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    model.load_state_dict(part("model."))
    optimizer.load_state_dict(part("optim."))
    if ema is not None:
        ema.load_state_dict(part("ema."))
    step = int(metadata.get("step", 0))
    print(f"resuming from {path} at step {step}")
    return step
