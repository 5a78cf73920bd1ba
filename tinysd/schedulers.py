"""Noise schedulers: how to add noise for training and how to remove it for sampling.

The forward (noising) process is fixed.  For t = 0 .. T-1 we pick betas beta_t and set

    alpha_t = 1 - beta_t,        abar_t = alpha_0 * alpha_1 * ... * alpha_t     ("alphas_cumprod")

so that a noisy sample can be drawn in one shot from a clean one:

    q(x_t | x_0) = N( sqrt(abar_t) x_0,  (1 - abar_t) I )
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,      eps ~ N(0, I)

A network is trained to predict eps (or x_0, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0)
from x_t and t.  A scheduler turns that prediction into a slightly less noisy sample:

* ``DDPMScheduler``: ancestral sampling with the true posterior q(x_{t-1} | x_t, x_0).
* ``DDIMScheduler``: the DDIM update, deterministic when eta = 0, so it can skip steps.
* ``EulerDiscreteScheduler``: Euler's method on the probability-flow ODE, in sigma units.

The names and semantics follow Hugging Face diffusers (config keys, ``set_timesteps``,
``scale_model_input``, ``step``, ``add_noise``) and give the same numbers for the same
configuration, so a ``scheduler_config.json`` from a diffusers checkpoint can be loaded with
``from_config``.  Everything here is plain array code: it runs on NumPy arrays and, unchanged,
on CuPy arrays (the array module is picked from the input).  There is no autograd here.

Left out (a clear ValueError if a config asks for them): dynamic thresholding, trained_betas,
zero-terminal-SNR rescaling, learned variances, Karras/exponential sigmas and Euler "churn".
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def array_module(x):
    """The array module of ``x``: ``cupy`` for CuPy arrays, ``numpy`` for everything else.

    CuPy is imported only when a CuPy array is actually seen, so NumPy users never need it.
    """
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


@dataclass
class SchedulerOutput:
    """What ``step`` returns: the sample for the next (less noisy) timestep, and the
    scheduler's current estimate of the clean sample x_0."""

    prev_sample: object
    pred_original_sample: object


# ----------------------------------------------------------------------------------------------
# The schedule math, written once
# ----------------------------------------------------------------------------------------------


def make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end):
    """The betas beta_0 .. beta_{T-1} of a named schedule, as float32 (like diffusers).

    linear:             beta_i = beta_start + (beta_end - beta_start) * i / (T - 1)
    scaled_linear:      beta_i = (sqrt(beta_start) + (sqrt(beta_end) - sqrt(beta_start)) * i / (T - 1))^2
                        (the schedule Stable Diffusion was trained with)
    squaredcos_cap_v2:  beta_i = min(1 - abar(i + 1) / abar(i), 0.999),
                        abar(i) = cos((i / T + 0.008) / 1.008 * pi / 2)^2
                        (the cosine schedule of Nichol & Dhariwal; beta_start/beta_end are unused)
    """
    T = num_train_timesteps
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T) ** 2
    elif beta_schedule == "squaredcos_cap_v2":

        def abar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")
    return betas.astype(np.float32)


def spaced_timesteps(num_train_timesteps, num_inference_steps, timestep_spacing, steps_offset=0):
    """Which training timesteps a sampler with ``num_inference_steps`` steps visits, largest first.

    The three spacings of "Common Diffusion Noise Schedules and Sample Steps are Flawed"
    (Lin et al. 2023, table 2), for T training steps and n inference steps:

    linspace:  n evenly spaced values from T-1 down to 0 (not rounded here)
    leading:   0, k, 2k, ..., (n-1)k  with k = T // n, plus ``steps_offset``, reversed
               (1000/10: 900, 800, ..., 0; with steps_offset=1: 901, 801, ..., 1)
    trailing:  round(T, T - T/n, ..., T/n) - 1
               (1000/10: 999, 899, ..., 99: always starts at the noisiest step T-1)

    Returns float64; DDPM/DDIM round to integers, Euler keeps them as floats.
    """
    T, n = num_train_timesteps, num_inference_steps
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
        raise TypeError(f"set_timesteps: num_inference_steps must be an int, got {n!r} ({type(n).__name__})")
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be between 1 and num_train_timesteps={T}, got {n}")
    if timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if timestep_spacing == "leading":
        return (np.arange(n) * (T // n))[::-1].astype(np.float64) + steps_offset
    if timestep_spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}")


class SchedulerBase:
    """What all schedulers share: the config, the beta/alpha tables, ``add_noise``,
    ``get_velocity`` and converting a model output into estimates of x_0 and eps.

    Attributes: ``betas``, ``alphas``, ``alphas_cumprod`` (float32 NumPy arrays of length T),
    ``timesteps`` (the timesteps ``step`` will be called with, largest first),
    ``num_inference_steps`` (None until ``set_timesteps``), ``init_noise_sigma`` (the standard
    deviation of the starting noise) and ``config`` (a dict of the constructor arguments).
    """

    # config keys that diffusers knows but tinysd does not implement, with the only value we accept
    _unsupported = {"trained_betas": None, "rescale_betas_zero_snr": False}

    init_noise_sigma = 1.0  # x_T ~ N(0, I) for DDPM and DDIM; Euler overrides this

    def _setup(self, args):
        """Store the constructor arguments as ``config`` and build the beta/alpha tables."""
        self.config = {k: v for k, v in args.items() if k != "self" and not k.startswith("__")}
        c = self.config
        if c["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(
                f"{type(self).__name__}: unknown prediction_type {c['prediction_type']!r}; "
                f"expected one of {PREDICTION_TYPES}"
            )
        if c["timestep_spacing"] not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"{type(self).__name__}: unknown timestep_spacing {c['timestep_spacing']!r}; "
                f"expected one of {TIMESTEP_SPACINGS}"
            )
        self.num_train_timesteps = T = int(c["num_train_timesteps"])
        self.betas = make_betas(c["beta_schedule"], T, c["beta_start"], c["beta_end"])
        self.alphas = (np.float32(1.0) - self.betas).astype(np.float32)
        self.alphas_cumprod = np.cumprod(self.alphas, dtype=np.float32)
        self.num_inference_steps = None
        self.timesteps = np.arange(T - 1, -1, -1, dtype=np.int64)

    def __len__(self):
        return self.num_train_timesteps

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"

    @classmethod
    def from_config(cls, config):
        """Build a scheduler from a dict or from a path to a diffusers ``scheduler_config.json``.

        Keys this scheduler does not take (``_class_name``, ``_diffusers_version``,
        ``skip_prk_steps``, another scheduler's options, ...) are ignored, as diffusers does.
        Keys naming a feature tinysd leaves out raise a ValueError unless they hold the value
        that turns the feature off (e.g. ``thresholding: false``, ``trained_betas: null``).
        """
        if isinstance(config, (str, os.PathLike)):
            with open(config, encoding="utf-8") as f:
                config = json.load(f)
        for key, off in cls._unsupported.items():
            if key in config and config[key] != off:
                raise ValueError(
                    f"{cls.__name__}.from_config: {key}={config[key]!r} is not implemented in tinysd "
                    f"(only {key}={off!r})"
                )
        known = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in config.items() if k in known and k != "self"})

    # -- helpers ------------------------------------------------------------------------------

    def _abar_like(self, timesteps, like):
        """abar_t for each batch element, as an array of ``like``'s module and dtype, shaped
        (B, 1, 1, ...) so that it broadcasts against ``like`` (B, C, H, W, ...)."""
        xp = array_module(like)
        t = xp.asarray(timesteps)
        if t.dtype.kind not in "iu":
            raise ValueError(f"{type(self).__name__}: timesteps must be integers, got dtype {t.dtype}")
        if t.size and not (0 <= int(t.min()) and int(t.max()) < self.num_train_timesteps):
            raise ValueError(f"{type(self).__name__}: timesteps must lie in [0, {self.num_train_timesteps})")
        values = xp.asarray(self.alphas_cumprod)[t].astype(like.dtype)
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    def _check_step_args(self, model_output, sample):
        if model_output.shape != sample.shape:
            raise ValueError(
                f"{type(self).__name__}.step: model_output shape {tuple(model_output.shape)} "
                f"does not match sample shape {tuple(sample.shape)}"
            )

    def _int_timestep(self, timestep):
        t = int(timestep)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(
                f"{type(self).__name__}: timestep {t} is outside [0, {self.num_train_timesteps})"
            )
        return t

    def _x0_and_eps(self, model_output, sample, abar_t):
        """Turn the model output at x_t into estimates of (x_0, eps), using
        x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps  and  v = sqrt(abar) eps - sqrt(1 - abar) x_0:

        epsilon:       x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        sample:        eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)
        v_prediction:  x_0 = sqrt(abar) x_t - sqrt(1 - abar) v,   eps = sqrt(abar) v + sqrt(1 - abar) x_t
        """
        a, b = abar_t**0.5, (1 - abar_t) ** 0.5
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return (sample - b * model_output) / a, model_output
        if kind == "sample":
            return model_output, (sample - a * model_output) / b
        return a * sample - b * model_output, a * model_output + b * sample  # v_prediction

    def _draw_noise(self, like, generator):
        """Standard normal noise shaped like ``like``, drawn with a NumPy Generator (a fresh
        ``default_rng()`` when None) and moved to ``like``'s array module and dtype."""
        rng = np.random.default_rng() if generator is None else generator
        xp = array_module(like)
        return xp.asarray(rng.standard_normal(like.shape), dtype=like.dtype)

    # -- training -----------------------------------------------------------------------------

    def add_noise(self, original_samples, noise, timesteps):
        """Sample q(x_t | x_0):  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise.

        ``timesteps`` holds one integer timestep per batch element (or a single one for all);
        it is broadcast over the remaining dimensions.
        """
        abar = self._abar_like(timesteps, original_samples)
        return abar**0.5 * original_samples + (1 - abar) ** 0.5 * noise

    def get_velocity(self, sample, noise, timesteps):
        """The "v" training target (Salimans & Ho 2022): v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0,
        where ``sample`` is the clean x_0."""
        abar = self._abar_like(timesteps, sample)
        return abar**0.5 * noise - (1 - abar) ** 0.5 * sample

    # -- sampling -----------------------------------------------------------------------------

    def scale_model_input(self, sample, timestep=None):
        """The model sees x_t unchanged for DDPM and DDIM (Euler overrides this)."""
        return sample

    def set_timesteps(self, num_inference_steps):
        """Choose the ``num_inference_steps`` integer timesteps to sample with (see
        ``spaced_timesteps`` for the spacings)."""
        c = self.config
        t = spaced_timesteps(self.num_train_timesteps, num_inference_steps, c["timestep_spacing"], c["steps_offset"])
        self.timesteps = np.round(t).astype(np.int64)
        self.num_inference_steps = int(num_inference_steps)


class DDPMScheduler(SchedulerBase):
    """Denoising Diffusion Probabilistic Models (Ho et al. 2020): ancestral sampling.

    Given the model's estimate of x_0, step from x_t to x_{t'} (t' the previous timestep of the
    schedule, t - 1 when all T steps are used) by sampling the posterior

        q(x_{t'} | x_t, x_0) = N(mu, var I)
        mu  = sqrt(abar_{t'}) beta / (1 - abar_t) * x_0  +  sqrt(alpha) (1 - abar_{t'}) / (1 - abar_t) * x_t
        var = (1 - abar_{t'}) / (1 - abar_t) * beta                      ("fixed_small")
          or  beta                                                       ("fixed_large")

    with alpha = abar_t / abar_{t'} and beta = 1 - alpha (the one-step values, which are
    alpha_t and beta_t when t' = t - 1), and abar_{-1} = 1.  No noise is added at t = 0.
    ``clip_sample`` clamps the x_0 estimate to [-clip_sample_range, clip_sample_range] first.
    """

    _unsupported = {**SchedulerBase._unsupported, "thresholding": False}

    def __init__(
        self,
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type="fixed_small",
        clip_sample=True,
        prediction_type="epsilon",
        clip_sample_range=1.0,
        timestep_spacing="leading",
        steps_offset=0,
    ):
        self._setup(locals())
        if variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(
                f"DDPMScheduler: variance_type {variance_type!r} is not supported; "
                "expected 'fixed_small' or 'fixed_large'"
            )

    def previous_timestep(self, timestep):
        """The timestep ``step`` moves to: the next entry of ``timesteps`` after
        ``set_timesteps`` (-1 after the last), else t - 1."""
        t = self._int_timestep(timestep)
        if self.num_inference_steps is None:
            return t - 1
        where = np.flatnonzero(self.timesteps == t)
        if where.size == 0:
            raise ValueError(f"DDPMScheduler.step: timestep {t} is not one of scheduler.timesteps")
        i = int(where[0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None):
        """One ancestral step x_t -> x_{t'}; see the class docstring for the math.

        ``generator`` is a ``numpy.random.Generator`` for the posterior noise; ``variance_noise``
        (an array shaped like ``sample``) replaces that draw, for reproducible tests.
        """
        self._check_step_args(model_output, sample)
        c = self.config
        t = self._int_timestep(timestep)
        prev_t = self.previous_timestep(t)
        abar_t = float(self.alphas_cumprod[t])
        abar_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        alpha = abar_t / abar_prev
        beta = 1 - alpha

        x0, _ = self._x0_and_eps(model_output, sample, abar_t)
        if c["clip_sample"]:
            r = c["clip_sample_range"]
            x0 = array_module(x0).clip(x0, -r, r)

        coef_x0 = abar_prev**0.5 * beta / (1 - abar_t)
        coef_xt = alpha**0.5 * (1 - abar_prev) / (1 - abar_t)
        mean = coef_x0 * x0 + coef_xt * sample
        prev_sample = mean
        if t > 0:
            if c["variance_type"] == "fixed_small":
                var = max((1 - abar_prev) / (1 - abar_t) * beta, 1e-20)
            else:  # fixed_large
                var = beta
            noise = self._draw_noise(sample, generator) if variance_noise is None else variance_noise
            prev_sample = mean + var**0.5 * noise
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class DDIMScheduler(SchedulerBase):
    """Denoising Diffusion Implicit Models (Song et al. 2021).

    With t' = t - T // num_inference_steps, x_0 and eps estimated from the model output:

        x_{t'} = sqrt(abar_{t'}) x_0  +  sqrt(1 - abar_{t'} - sigma_t^2) eps  +  sigma_t z,   z ~ N(0, I)
        sigma_t = eta * sqrt((1 - abar_{t'}) / (1 - abar_t)) * sqrt(1 - abar_t / abar_{t'})

    eta = 0 gives the deterministic DDIM sampler; eta = 1 has the DDPM posterior variance.
    For t' < 0 we use abar = 1 if ``set_alpha_to_one`` else abar_0.
    ``clip_sample`` clamps the x_0 estimate to [-clip_sample_range, clip_sample_range]
    (the eps estimate is not recomputed from the clipped x_0, as in diffusers' default).
    """

    _unsupported = {**SchedulerBase._unsupported, "thresholding": False}

    def __init__(
        self,
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        clip_sample_range=1.0,
        timestep_spacing="leading",
    ):
        self._setup(locals())
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])

    def step(self, model_output, timestep, sample, eta=0.0, generator=None, variance_noise=None):
        """One DDIM step x_t -> x_{t'}; see the class docstring for the math.

        For eta > 0, noise z is drawn with ``generator`` (a ``numpy.random.Generator``)
        unless ``variance_noise`` gives it.
        """
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler.step: call set_timesteps(num_inference_steps) first")
        self._check_step_args(model_output, sample)
        c = self.config
        t = self._int_timestep(timestep)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        abar_t = float(self.alphas_cumprod[t])
        abar_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod

        x0, eps = self._x0_and_eps(model_output, sample, abar_t)
        if c["clip_sample"]:
            r = c["clip_sample_range"]
            x0 = array_module(x0).clip(x0, -r, r)

        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
        prev_sample = abar_prev**0.5 * x0 + max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
        if eta > 0:
            z = self._draw_noise(sample, generator) if variance_noise is None else variance_noise
            prev_sample = prev_sample + sigma * z
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class EulerDiscreteScheduler(SchedulerBase):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, "EDM"), in sigma units.

    Divide x_t by sqrt(abar_t) and the forward process becomes  x = x_0 + sigma eps  with

        sigma_t = sqrt((1 - abar_t) / abar_t).

    Sampling starts from x ~ N(0, sigma_max^2 I) (``init_noise_sigma``) and follows
    dx/dsigma = (x - x_0_hat) / sigma from each sigma to the next (the last one is 0):

        x_next = x + (x - x_0_hat) / sigma * (sigma_next - sigma)

    The network was trained on x_t = x / sqrt(sigma^2 + 1), so ``scale_model_input`` divides by
    that before calling it.  The x_0 estimate from the output: epsilon: x - sigma eps;
    v_prediction: x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v;  sample: the output itself.

    Unlike DDPM/DDIM, ``timesteps`` are float32 (as in diffusers: with "linspace" spacing they
    need not be integers) and ``sigmas`` (length num_inference_steps + 1) holds the sigma of each.
    ``step`` finds its place by looking ``timestep`` up in ``timesteps`` (the first match), so it
    must be one of them.  Stochastic "churn" (s_churn) and Karras sigmas are left out.
    """

    _unsupported = {
        **SchedulerBase._unsupported,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    }

    def __init__(
        self,
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        timestep_spacing="linspace",
        steps_offset=0,
    ):
        self._setup(locals())
        abar = self.alphas_cumprod
        self.train_sigmas = ((1 - abar) / abar) ** np.float32(0.5)  # float32, index = timestep
        self.timesteps = np.arange(self.num_train_timesteps - 1, -1, -1).astype(np.float32)
        self.sigmas = np.append(self.train_sigmas[::-1], np.float32(0)).astype(np.float32)

    @property
    def init_noise_sigma(self):
        """Standard deviation of the starting noise: sigma_max, or sqrt(sigma_max^2 + 1) for
        "leading" spacing (whose first timestep is below T-1), as diffusers does."""
        s = float(self.sigmas.max())
        return s if self.config["timestep_spacing"] in ("linspace", "trailing") else (s * s + 1) ** 0.5

    def sigma_at(self, timesteps):
        """sigma(t) = sqrt((1 - abar_t) / abar_t), linearly interpolated between integer timesteps."""
        t = np.asarray(timesteps, dtype=np.float64)
        return np.interp(t, np.arange(self.num_train_timesteps), self.train_sigmas).astype(np.float32)

    def set_timesteps(self, num_inference_steps):
        """Pick the timesteps (float32, see ``spaced_timesteps``) and their sigmas, plus a final 0."""
        c = self.config
        t = spaced_timesteps(self.num_train_timesteps, num_inference_steps, c["timestep_spacing"], c["steps_offset"])
        self.timesteps = t.astype(np.float32)
        self.sigmas = np.append(self.sigma_at(self.timesteps), np.float32(0)).astype(np.float32)
        self.num_inference_steps = int(num_inference_steps)

    def index_for_timestep(self, timestep):
        """Position of ``timestep`` in ``timesteps`` (the first match)."""
        where = np.flatnonzero(self.timesteps == np.float32(float(timestep)))
        if where.size == 0:
            raise ValueError(
                f"EulerDiscreteScheduler: timestep {float(timestep)} is not one of scheduler.timesteps"
            )
        return int(where[0])

    def scale_model_input(self, sample, timestep):
        """x_t = x / sqrt(sigma^2 + 1): what the network saw during training."""
        sigma = float(self.sigmas[self.index_for_timestep(timestep)])
        return sample / (sigma**2 + 1) ** 0.5

    def _sigma_like(self, timesteps, like):
        """sigma(t) per batch element, shaped (B, 1, 1, ...) like ``_abar_like``."""
        t = timesteps.get() if array_module(timesteps) is not np else timesteps
        sigma = array_module(like).asarray(self.sigma_at(t), dtype=like.dtype)
        return sigma.reshape(sigma.shape + (1,) * (like.ndim - sigma.ndim))

    def _abar_like(self, timesteps, like):
        """abar_t = 1 / (sigma_t^2 + 1), so that fractional timesteps work too."""
        return 1 / (self._sigma_like(timesteps, like) ** 2 + 1)

    def add_noise(self, original_samples, noise, timesteps):
        """x = x_0 + sigma(t) noise, one timestep per batch element: the noising in this
        scheduler's own (sigma) units, for starting img2img-style sampling part way."""
        return original_samples + noise * self._sigma_like(timesteps, original_samples)

    def step(self, model_output, timestep, sample, generator=None):
        """One Euler step from ``sigmas[i]`` to ``sigmas[i + 1]``; see the class docstring.
        ``generator`` is accepted for a uniform API and unused (no churn)."""
        self._check_step_args(model_output, sample)
        i = self.index_for_timestep(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = sample - sigma * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        else:  # sample
            x0 = model_output
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (sigma_next - sigma)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
