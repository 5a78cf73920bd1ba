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
* ``PNDMScheduler``: pseudo linear multistep (PLMS), what Stable Diffusion 1 folders name.
* ``DPMSolverMultistepScheduler``: DPM-Solver++(2M), good images in 20-25 steps.

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

from .backend import array_module

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


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
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if not k.startswith("_"))
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
        # Keys that the config's own scheduler filled with ITS defaults do not carry over
        # ("_use_default_values", as in diffusers): DPM-Solver made from a PNDM config keeps
        # its own timestep_spacing default instead of inheriting PNDM's.
        defaulted = set(config.get("_use_default_values", ()))
        config = {k: v for k, v in config.items() if k not in defaulted}
        known = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
        scheduler = cls(**{k: v for k, v in config.items() if k in known})
        # keep the other keys too, so a scheduler made from this one's config sees them
        scheduler.config.update({k: v for k, v in config.items() if k not in known and not k.startswith("_")})
        defaulted = [k for k in known if k not in config]
        if defaulted:
            scheduler.config["_use_default_values"] = defaulted
        return scheduler

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

    def _clip_x0(self, x0):
        """With ``clip_sample``, clamp the x_0 estimate to [-clip_sample_range, clip_sample_range]."""
        if not self.config.get("clip_sample"):
            return x0
        r = self.config["clip_sample_range"]
        return array_module(x0).clip(x0, -r, r)

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
        x0 = self._clip_x0(x0)

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
        t = self._int_timestep(timestep)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        abar_t = float(self.alphas_cumprod[t])
        abar_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod

        x0, eps = self._x0_and_eps(model_output, sample, abar_t)
        x0 = self._clip_x0(x0)

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
        # The Euler sample is x_t / sqrt(abar) with sigma^2 = (1 - abar) / abar: the shared formula.
        abar = 1 / (1 + sigma**2)
        x0, _ = self._x0_and_eps(model_output, sample * abar**0.5, abar)
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (sigma_next - sigma)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class PNDMScheduler(SchedulerBase):
    """Pseudo numerical methods for diffusion models (Liu et al. 2022), the PLMS variant
    (``skip_prk_steps=True``, as in Stable Diffusion's configs).

    The DDIM-like transfer from t to t' = t - T // n with a noise estimate e:

        x_{t'} = sqrt(abar_{t'} / abar_t) x_t
                 - (abar_{t'} - abar_t) e / (abar_t sqrt(1 - abar_{t'}) + sqrt(abar_t (1 - abar_t) abar_{t'}))

    and e is a linear multistep (Adams-Bashforth) combination of the last model outputs
    e_k, e_{k-1}, ...: (55 e_k - 59 e_{k-1} + 37 e_{k-2} - 9 e_{k-3}) / 24 once four
    are known, lower orders before. The very first step is done twice: a plain step from
    t to t', then the model is asked again at t' and the step from t is redone with the mean
    of both outputs (a second-order start). That is why ``timesteps`` lists n + 1 entries,
    the second one twice. ``step`` keeps the past outputs: call ``set_timesteps`` before each image.
    Runge-Kutta warm-up steps (``skip_prk_steps=False``) are not implemented.
    """

    def __init__(
        self,
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        skip_prk_steps=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=0,
    ):
        self._setup(locals())
        if not skip_prk_steps:
            raise ValueError("PNDMScheduler: only skip_prk_steps=True (PLMS, Stable Diffusion's setting) is implemented")
        if prediction_type == "sample":
            raise ValueError("PNDMScheduler: prediction_type 'sample' is not supported (epsilon or v_prediction)")
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self._reset()

    def _reset(self):
        self.ets, self.counter, self.cur_sample = [], 0, None

    def set_timesteps(self, num_inference_steps):
        """n spaced timesteps (see ``spaced_timesteps``, rounded), the second largest repeated."""
        c = self.config
        t = spaced_timesteps(self.num_train_timesteps, num_inference_steps, c["timestep_spacing"], c["steps_offset"])
        t = np.round(t).astype(np.int64)  # largest first
        self.timesteps = np.concatenate([t[:1], t[1:2], t[1:]]) if len(t) > 1 else t
        self.num_inference_steps = int(num_inference_steps)
        self._reset()

    def _transfer(self, sample, t, prev_t, eps):
        """The x_t -> x_{t'} formula of the class docstring (v_prediction turned into eps first)."""
        abar_t = float(self.alphas_cumprod[t])
        abar_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        if self.config["prediction_type"] == "v_prediction":
            eps = abar_t**0.5 * eps + (1 - abar_t) ** 0.5 * sample
        denom = abar_t * (1 - abar_prev) ** 0.5 + (abar_t * (1 - abar_t) * abar_prev) ** 0.5
        return (abar_prev / abar_t) ** 0.5 * sample - (abar_prev - abar_t) / denom * eps

    def step(self, model_output, timestep, sample, generator=None):
        """One PLMS step; ``generator`` is accepted for a uniform API and unused."""
        if self.num_inference_steps is None:
            raise ValueError("PNDMScheduler.step: call set_timesteps(num_inference_steps) first")
        self._check_step_args(model_output, sample)
        t = self._int_timestep(timestep)
        stride = self.num_train_timesteps // self.num_inference_steps
        prev_t = t - stride
        if self.counter == 1:  # the repeated first step: redo t -> t' with the mean of two outputs
            t, prev_t = t + stride, t
            eps = (model_output + self.ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        else:
            self.ets = self.ets[-3:] + [model_output]
            e = self.ets[::-1]  # newest first
            if len(e) == 1:
                eps, self.cur_sample = model_output, sample
            elif len(e) == 2:
                eps = (3 * e[0] - e[1]) / 2
            elif len(e) == 3:
                eps = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
            else:
                eps = (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24
        self.counter += 1
        prev_sample = self._transfer(sample, t, prev_t, eps)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=None)


class DPMSolverMultistepScheduler(SchedulerBase):
    """DPM-Solver++ (Lu et al. 2022), multistep, second order ("2M"), in data (x_0) prediction.

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t)
    (half the log signal-to-noise ratio), each step goes from s to t with h = lambda_t - lambda_s:

        first order (DDIM):  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D0
        second order:        the same, plus - 0.5 alpha_t (e^{-h} - 1) D1       ("midpoint")
                             or + alpha_t ((e^{-h} - 1) / h + 1) D1              ("heun")

    where D0 = x0_hat(s), the model's x_0 estimate now, and D1 = (D0 - x0_hat(s_prev)) / r,
    r = h_prev / h, a finite difference with the previous step's estimate (the multistep
    second-order update of the DPM-Solver++ paper). The first step, and with ``lower_order_final`` the last one
    (fewer than 15 steps, or a final sigma of 0), are first order.
    Timesteps and sigmas as in diffusers: sigma = sqrt((1 - abar) / abar) interpolated at
    the timesteps, then the final sigma (0, or sigma_min with final_sigmas_type="sigma_min").
    """

    _unsupported = {
        **SchedulerBase._unsupported,
        "thresholding": False,
        "algorithm_type": "dpmsolver++",
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
        "variance_type": None,
        "lambda_min_clipped": -math.inf,
    }

    def __init__(
        self,
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        solver_order=2,
        prediction_type="epsilon",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
        steps_offset=0,
    ):
        self._setup(locals())
        if solver_order not in (1, 2):
            raise ValueError(f"DPMSolverMultistepScheduler: solver_order {solver_order} is not supported (1 or 2)")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"DPMSolverMultistepScheduler: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(
                f"DPMSolverMultistepScheduler: final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}"
            )
        self.sigmas = None
        self._x0_history, self._step_index = [], None

    def set_timesteps(self, num_inference_steps):
        """n timesteps: for "linspace", round(linspace(0, T - 1, n + 1)) without its 0; for "leading",
        multiples of T // (n + 1) plus steps_offset; "trailing" as in ``spaced_timesteps``."""
        c = self.config
        T, n = self.num_train_timesteps, int(num_inference_steps)
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be between 1 and num_train_timesteps={T}, got {n}")
        if c["timestep_spacing"] == "linspace":
            t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif c["timestep_spacing"] == "leading":
            t = (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + c["steps_offset"]
        else:
            t = spaced_timesteps(T, n, "trailing")
        self.timesteps = t.astype(np.int64)
        abar = self.alphas_cumprod
        train_sigmas = ((1 - abar) / abar) ** np.float32(0.5)
        last = 0.0 if c["final_sigmas_type"] == "zero" else float(train_sigmas[0])
        sigmas = np.interp(self.timesteps, np.arange(T), train_sigmas)
        self.sigmas = np.append(sigmas, last).astype(np.float32)
        self.num_inference_steps = n
        self._x0_history, self._step_index = [], None

    @staticmethod
    def _alpha_sigma(sigma):
        """From sigma = sigma_t / alpha_t back to (alpha_t, sigma_t), alpha_t^2 + sigma_t^2 = 1."""
        alpha = 1.0 / (sigma * sigma + 1.0) ** 0.5
        return alpha, sigma * alpha

    def _lambda(self, sigma):
        alpha, sigma_t = self._alpha_sigma(sigma)
        return math.log(alpha) - math.log(sigma_t) if sigma_t > 0 else math.inf

    def step(self, model_output, timestep, sample, generator=None):
        """One DPM-Solver++ step; see the class docstring. ``generator`` is unused (no SDE variant)."""
        if self.num_inference_steps is None:
            raise ValueError("DPMSolverMultistepScheduler.step: call set_timesteps(num_inference_steps) first")
        self._check_step_args(model_output, sample)
        if self._step_index is None:
            where = np.flatnonzero(self.timesteps == int(timestep))
            if where.size == 0:
                raise ValueError(f"DPMSolverMultistepScheduler: timestep {timestep} is not one of scheduler.timesteps")
            self._step_index = int(where[1] if where.size > 1 else where[0])
        i, n = self._step_index, len(self.timesteps)
        sigma_s, sigma_t = float(self.sigmas[i]), float(self.sigmas[i + 1])
        alpha_s, sigma_s_t = self._alpha_sigma(sigma_s)
        alpha_t, sigma_t_t = self._alpha_sigma(sigma_t)

        # the model's x_0 estimate at s
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = (sample - sigma_s_t * model_output) / alpha_s
        elif kind == "v_prediction":
            x0 = alpha_s * sample - sigma_s_t * model_output
        else:
            x0 = model_output
        self._x0_history = (self._x0_history + [x0])[-2:]

        final = i == n - 1 and (
            (self.config["lower_order_final"] and n < 15) or self.config["final_sigmas_type"] == "zero"
        )
        first_order = self.config["solver_order"] == 1 or len(self._x0_history) < 2 or final
        h = self._lambda(sigma_t) - self._lambda(sigma_s)
        decay = math.expm1(-h) if math.isfinite(h) else -1.0  # e^{-h} - 1
        prev_sample = (sigma_t_t / sigma_s_t) * sample - (alpha_t * decay) * x0
        if not first_order:
            h_prev = self._lambda(sigma_s) - self._lambda(float(self.sigmas[i - 1]))
            d1 = (x0 - self._x0_history[0]) * (h / h_prev)
            if self.config["solver_type"] == "midpoint":
                prev_sample = prev_sample - 0.5 * (alpha_t * decay) * d1
            else:
                prev_sample = prev_sample + (alpha_t * (decay / h + 1.0)) * d1
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample.astype(sample.dtype, copy=False), pred_original_sample=x0)
