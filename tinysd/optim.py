"""Optimizers, gradient clipping, an EMA of the weights, learning-rate schedules.

An optimizer holds a list of parameters and a learning rate `lr` (a schedule
sets `optimizer.lr` before each step). `step()` updates every parameter that
has a gradient, in place on `p.data` (the Parameter objects never change), and
keeps per-parameter state (momentum, Adam's moments). `state_dict()` is a flat
dict of NumPy arrays, so it can be saved with `tinysd.io.save_file`; loading it
into a fresh optimizer over the same parameters resumes training exactly.
"""

import contextlib
import math

import numpy as np

import kernels

from . import backend
from .tensor import Tensor


def _to_numpy(array):
    """A NumPy copy of an array from any device."""
    return array.get() if backend.is_cupy_array(array) else np.array(array, copy=True)


class Optimizer:
    """Base class: subclasses set `state_names` and implement `_update(p, grad, state)`."""

    state_names = ()  # the per-parameter arrays kept in self.state[i]

    def __init__(self, params, lr):
        unique = {}
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"{type(self).__name__}: parameters must be Tensors, got {type(p).__name__}")
            unique.setdefault(id(p), p)
        if not unique:
            raise ValueError(f"{type(self).__name__}: got an empty list of parameters")
        if lr < 0:
            raise ValueError(f"{type(self).__name__}: invalid learning rate {lr}")
        self.params = list(unique.values())
        self.lr = lr
        self.state = [{} for _ in self.params]  # per parameter: name -> array, and "step" -> int

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad.data[...] = 0

    def step(self):
        """Update every parameter that has a gradient."""
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            for name, value in state.items():  # follow a model moved by .to(device) after some steps
                if name != "step" and backend.device_of(value) != p.device:
                    state[name] = backend.to_device(value, p.device)
            self._update(p, p.grad.data, state)
            p.bump_version_()

    def _update(self, p, grad, state):
        raise NotImplementedError

    # ---- saving and resuming ---------------------------------------------------------
    def state_dict(self):
        """{"lr": 0-d array, "state.<i>.<name>": array, ...}: NumPy copies, ready for tinysd.io.save_file."""
        out = {"lr": np.array(self.lr, dtype=np.float64)}
        for i, state in enumerate(self.state):
            for name, value in state.items():
                out[f"state.{i}.{name}"] = np.array(value, dtype=np.int64) if name == "step" else _to_numpy(value)
        return out

    def load_state_dict(self, state_dict):
        """Restore what state_dict() returned (arrays may come from a safetensors file)."""
        name = type(self).__name__
        if "lr" not in state_dict:
            raise ValueError(f"{name}.load_state_dict: no 'lr' entry, keys are {sorted(state_dict)}")
        new_state = [{} for _ in self.params]
        for key, value in state_dict.items():
            if key == "lr":
                continue
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or parts[2] not in self.state_names:
                raise ValueError(f"{name}.load_state_dict: unexpected key {key!r}")
            i, field = int(parts[1]), parts[2]
            if i >= len(self.params):
                raise ValueError(
                    f"{name}.load_state_dict: key {key!r} is for parameter {i}, "
                    f"but this optimizer has {len(self.params)} parameters"
                )
            p = self.params[i]
            value = value.data if isinstance(value, Tensor) else value
            if field == "step":
                new_state[i][field] = int(value)
                continue
            if tuple(value.shape) != p.shape:
                raise ValueError(f"{name}.load_state_dict: {key} has shape {tuple(value.shape)}, parameter {p.shape}")
            new_state[i][field] = backend.to_device(value, p.device).astype(p.dtype, copy=True)
        self.lr = float(state_dict["lr"])
        self.state = new_state


class SGD(Optimizer):
    """Stochastic gradient descent with PyTorch's momentum rule.

        g = grad + weight_decay * p
        b = g                                 (first step)
        b = momentum * b + (1 - dampening) g  (later steps)
        g = g + momentum * b  if nesterov,  else  g = b
        p = p - lr * g
    """

    state_names = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr)
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: momentum {momentum} and weight_decay {weight_decay} must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov momentum needs momentum > 0 and dampening = 0")
        self.momentum, self.dampening = momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov

    def _update(self, p, grad, state):
        g = grad + self.weight_decay * p.data if self.weight_decay else grad
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p.data -= self.lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov and Hutter), PyTorch's update:

        p = p * (1 - lr * weight_decay)
        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2      (amsgrad: v_max = max(v_max, v), used as v)
        p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    t counts this parameter's steps from 1. The whole update is one fused
    kernel per parameter, `adamw_step` (kernels/reference.py says what it computes).
    """

    state_names = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, lr)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"AdamW: eps {eps} and weight_decay {weight_decay} must be >= 0")
        self.betas, self.eps, self.weight_decay, self.amsgrad = tuple(betas), eps, weight_decay, amsgrad

    def _update(self, p, grad, state):
        if not state:
            xp = backend.array_module(p.data)
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
            if self.amsgrad:
                state["max_exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1
        kernels.for_array(p.data).adamw_step(
            p.data, grad, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
            state["step"], self.lr, self.betas[0], self.betas[1], self.eps, self.weight_decay,
        )


def grad_norm(params):
    """sqrt(sum over parameters of sum(grad^2)) as a float (0.0 when no parameter has a gradient);
    NaN or infinite when any gradient element is."""
    grads = [p.grad.data for p in params if p.grad is not None]
    return math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))


def clip_grad_norm_(params, max_norm):
    """Scale all gradients by max_norm / total_norm when the total L2 norm is above max_norm.

    total_norm = sqrt(sum over parameters of sum(grad^2)); returns it (before clipping) as a float.
    """
    params = list(params)
    total = grad_norm(params)
    grads = [p.grad.data for p in params if p.grad is not None]
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g *= scale
    return total


class EMA:
    """An exponential moving average of a model's parameters, for evaluation and sampling.

        shadow = d * shadow + (1 - d) * p        after every optimizer step

    With warmup (diffusers' default) d = min(decay, (1 + n) / (10 + n)) at the
    n-th update (n = 0, 1, ...), so a short run is not dominated by the random
    initial weights; without warmup d = decay.
    """

    def __init__(self, model, decay=0.999, warmup=True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow = {name: p.data.copy() for name, p in model.named_parameters()}

    def current_decay(self):
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _pairs(self, model):
        """(parameter, shadow array) for each parameter, moving shadows to the parameter's device if needed."""
        params = dict(model.named_parameters())
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())
            extra = sorted(params.keys() - self.shadow.keys())
            raise ValueError(f"EMA: model parameters differ from the averaged ones: missing {missing}, new {extra}")
        for name, p in params.items():
            if self.shadow[name].shape != p.shape:
                raise ValueError(f"EMA: {name} has shape {p.shape}, its average {self.shadow[name].shape}")
            if backend.device_of(self.shadow[name]) != p.device:
                self.shadow[name] = backend.to_device(self.shadow[name], p.device)
            yield p, self.shadow[name]

    def update(self, model):
        d = self.current_decay()
        for p, shadow in self._pairs(model):
            shadow -= (1.0 - d) * (shadow - p.data)
        self.num_updates += 1

    def copy_to(self, model):
        """Overwrite the model's parameters with the averages."""
        for p, shadow in self._pairs(model):
            p.data[...] = shadow
            p.bump_version_()

    @contextlib.contextmanager
    def average_parameters(self, model):
        """Inside the block the model holds the averaged weights; its own come back afterwards."""
        backup = [p.data.copy() for p in model.parameters()]
        self.copy_to(model)
        try:
            yield model
        finally:
            for p, saved in zip(model.parameters(), backup):
                p.data[...] = saved
                p.bump_version_()

    def state_dict(self):
        out = {"num_updates": np.array(self.num_updates, dtype=np.int64)}
        out.update({f"shadow.{name}": _to_numpy(s) for name, s in self.shadow.items()})
        return out

    def load_state_dict(self, state_dict):
        shadow = {k[len("shadow."):]: v for k, v in state_dict.items() if k.startswith("shadow.")}
        if shadow.keys() != self.shadow.keys():
            raise ValueError(
                f"EMA.load_state_dict: missing {sorted(self.shadow.keys() - shadow.keys())}, "
                f"unexpected {sorted(shadow.keys() - self.shadow.keys())}"
            )
        for name, value in shadow.items():
            value = value.data if isinstance(value, Tensor) else value
            if tuple(value.shape) != self.shadow[name].shape:
                raise ValueError(
                    f"EMA.load_state_dict: {name} has shape {tuple(value.shape)}, expected {self.shadow[name].shape}"
                )
            self.shadow[name][...] = backend.to_device(value, backend.device_of(self.shadow[name]))
        self.num_updates = int(state_dict.get("num_updates", 0))


# ---- learning-rate schedules ---------------------------------------------------------
def _cosine(start, end, fraction):
    """From start (fraction 0) to end (fraction 1) along half a cosine."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def warmup_cosine_lr(step, base_lr, warmup_steps, total_steps, min_lr=0.0):
    """Linear warmup to base_lr, then a cosine down to min_lr at total_steps (and min_lr after).

        step < warmup_steps:  base_lr * (step + 1) / warmup_steps
        otherwise:            min_lr + (base_lr - min_lr) * (1 + cos(pi * t)) / 2,
                              t = (step - warmup_steps) / (total_steps - warmup_steps), capped at 1
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    fraction = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return _cosine(base_lr, min_lr, fraction)


def one_cycle_lr(step, max_lr, total_steps, pct_start=0.3, div_factor=25.0, final_div_factor=1e4):
    """PyTorch's OneCycleLR (cosine annealing, two phases).

    From max_lr / div_factor at step 0 up to max_lr at step pct_start * total_steps - 1,
    then down to max_lr / div_factor / final_div_factor at step total_steps - 1 (and after).
    """
    initial = max_lr / div_factor
    peak_step = pct_start * total_steps - 1
    last_step = total_steps - 1
    if step <= peak_step:
        return _cosine(initial, max_lr, step / peak_step if peak_step > 0 else 1.0)
    fraction = min(1.0, (step - peak_step) / (last_step - peak_step)) if last_step > peak_step else 1.0
    return _cosine(max_lr, initial / final_div_factor, fraction)


class _Schedule:
    """Sets optimizer.lr = lr_at(step): at construction for step 0, then once per step() call."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.last_step = 0
        optimizer.lr = self.lr_at(0)

    def lr_at(self, step):
        raise NotImplementedError

    def get_lr(self):
        return self.lr_at(self.last_step)

    def step(self):
        self.last_step += 1
        self.optimizer.lr = self.lr_at(self.last_step)

    def state_dict(self):
        return {"last_step": np.array(self.last_step, dtype=np.int64)}

    def load_state_dict(self, state_dict):
        self.last_step = int(state_dict["last_step"])
        self.optimizer.lr = self.lr_at(self.last_step)


class WarmupCosine(_Schedule):
    """warmup_cosine_lr with base_lr = the optimizer's lr when the schedule is made."""

    def __init__(self, optimizer, warmup_steps, total_steps, min_lr=0.0):
        self.base_lr, self.warmup_steps, self.total_steps, self.min_lr = optimizer.lr, warmup_steps, total_steps, min_lr
        super().__init__(optimizer)

    def lr_at(self, step):
        return warmup_cosine_lr(step, self.base_lr, self.warmup_steps, self.total_steps, self.min_lr)


class OneCycle(_Schedule):
    """one_cycle_lr as a schedule (the learning rate only; PyTorch also cycles momentum)."""

    def __init__(self, optimizer, max_lr, total_steps, pct_start=0.3, div_factor=25.0, final_div_factor=1e4):
        self.max_lr, self.total_steps, self.pct_start = max_lr, total_steps, pct_start
        self.div_factor, self.final_div_factor = div_factor, final_div_factor
        super().__init__(optimizer)

    def lr_at(self, step):
        return one_cycle_lr(
            step, self.max_lr, self.total_steps, self.pct_start, self.div_factor, self.final_div_factor
        )
