"""Tests for tinysd.schedulers: the schedule math, round trips, sampling with an oracle model,
and agreement with diffusers.

The numbers in DIFFUSERS below were computed with diffusers 0.42.1 (torch 2.13.0, CPU) in a
separate virtual environment, on the inputs SAMPLE, MODEL_OUTPUT and NOISE defined here (NOISE was
passed as DDIM's ``variance_noise`` and patched in for DDPM's random draw).  This file imports
neither diffusers nor torch.
"""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinysd.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    make_betas,
    spaced_timesteps,
)

_k = np.arange(8, dtype=np.float32).reshape(2, 4)
SAMPLE = (np.sin(0.7 * _k + 0.3) * 1.5).astype(np.float32)
MODEL_OUTPUT = np.cos(0.9 * _k - 0.2).astype(np.float32)
NOISE = np.sin(1.3 * _k + 1.1).astype(np.float32)
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}  # Stable Diffusion's betas

# fmt: off
DIFFUSERS = {  # diffusers 0.42.1
    "betas_linear": [9.99999975e-05, 0.000119919918, 0.00507998001, 0.0100599593, 0.0199800804, 0.0199999996],
    "abar_linear": [0.999899983, 0.999780059, 0.521422982, 0.0777966529, 4.11819419e-05, 4.03583035e-05],
    "betas_scaled_linear": [0.000849999953, 0.000854698592, 0.00242776098, 0.00481495354, 0.0119823748, 0.0119999992],
    "abar_scaled_linear": [0.999149978, 0.998296022, 0.673792303, 0.276332468, 0.00471669575, 0.00466009509],
    "betas_squaredcos_cap_v2": [4.12842237e-05, 4.61417512e-05, 0.00132722396, 0.00315569155, 0.749999404, 0.999000013],
    "abar_squaredcos_cap_v2": [0.999958694, 0.99991256, 0.845888019, 0.492285043, 2.42876627e-06, 2.42873499e-09],
    "ts_leading_10_0": [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
    "ts_leading_10_1": [901, 801, 701, 601, 501, 401, 301, 201, 101, 1],
    "ts_leading_7_0": [852, 710, 568, 426, 284, 142, 0],
    "ts_leading_3_0": [666, 333, 0],
    "ts_linspace_10_0": [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
    "ts_linspace_10_1": [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
    "ts_linspace_7_0": [999, 832, 666, 500, 333, 166, 0],
    "ts_linspace_3_0": [999, 500, 0],
    "ts_trailing_10_0": [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
    "ts_trailing_10_1": [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
    "ts_trailing_7_0": [999, 856, 713, 570, 428, 285, 142],
    "ts_trailing_3_0": [999, 666, 332],
    "ddim_sd_ts": [961, 921, 881, 841, 801, 761, 721, 681, 641, 601, 561, 521, 481, 441, 401, 361, 321, 281, 241, 201, 161, 121, 81, 41, 1],
    "ddim_sd_eta0_t961": [0.309146821, 1.38459253, 1.86338687, 1.46371913, 0.318508267, -1.04544842, -1.94629717, -1.8983593],
    "ddim_sd_eta0_x0_t961": [-6.24859619, 5.86120367, 17.7726097, 21.2276173, 12.0193005, -6.07560539, -22.6536369, -27.0102253],
    "ddim_sd_eta05_t961": [0.530194402, 1.55111873, 1.70659542, 1.21425807, 0.367852271, -0.738195777, -1.81824756, -2.15231872],
    "ddim_sd_eta0_t481": [0.373793334, 1.29236841, 1.62778354, 1.19668555, 0.176935673, -0.957202792, -1.65407693, -1.55790603],
    "ddim_sd_eta0_x0_t481": [-0.682697475, 1.13373566, 2.7498157, 3.05990744, 1.58221745, -1.06036675, -3.37867165, -3.90403533],
    "ddim_sd_eta05_t481": [0.522237539, 1.40435958, 1.52653015, 1.03100991, 0.202881083, -0.761562228, -1.5686872, -1.71565771],
    "ddim_sd_eta0_t1": [0.431570143, 1.25345981, 1.48848784, 1.0233556, 0.0741364583, -0.913312793, -1.47261083, -1.33768713],
    "ddim_sd_eta0_x0_t1": [0.403167576, 1.23168433, 1.48997247, 1.04715812, 0.102367111, -0.902010858, -1.48690259, -1.36693549],
    "ddim_sd_eta05_t1": [0.438919604, 1.2589885, 1.48307288, 1.01496887, 0.0761364549, -0.902562737, -1.46832335, -1.34677029],
    "ddim_v_t481": [0.381778777, 1.21245456, 1.48645306, 1.06083226, 0.122082412, -0.891223907, -1.49247909, -1.38349175],
    "ddim_default_t980": [0.970674276, 0.774158239, -0.0198486559, -0.791759014, -0.957406521, -0.410130978, 0.459146529, 0.973875999],
    "ddim_default_x0_t980": [-1, 1, 1, 1, 1, -1, -1, -1],
    "ddpm_full_t999": [0.564732075, 1.34517288, 1.39774418, 0.867527246, 0.0642503798, -0.771805704, -1.38083041, -1.41096735],
    "ddpm_full_t500": [0.52695781, 1.32554233, 1.42866635, 0.914141715, 0.0667471215, -0.818394065, -1.41047823, -1.39059365],
    "ddpm_full_t1": [0.44193843, 1.12416303, 1.21770525, 0.998863995, 0.0703140199, -0.907402694, -1.20827711, -1.15297902],
    "ddpm_full_t0": [0.433500528, 1, 1, 1, 0.0720435306, -0.913824141, -1, -1],
    "ddpm_large_v_t500": [0.527554095, 1.3213439, 1.42693985, 0.914259255, 0.0665821806, -0.814900279, -1.41002512, -1.39158356],
    "ddpm_sd10_ts": [901, 801, 701, 601, 501, 401, 301, 201, 101, 1],
    "ddpm_sd10_t901": [0.424529821, 1.7959044, 2.02089024, 1.69616973, 1.08391714, -0.32900399, -2.44983149, -3.67068386],
    "ddpm_sd10_t1": [0.403167576, 1.23168433, 1.48997247, 1.04715812, 0.102367111, -0.902010858, -1.48690259, -1.36693549],
    "ddpm_sample_t300": [0.515692592, 1.31073976, 1.43567455, 0.926441312, 0.0571388453, -0.838589311, -1.41408932, -1.36413705],
    "add_noise_sd": [0.528332055, 1.32222676, 1.42853498, 0.914534271, 0.0340219513, 0.663475633, 0.0586894155, -1.05105317],
    "velocity_sd": [0.843571723, 0.548755109, -0.672801435, -1.0534358, -0.0549123213, 1.15715206, 1.54841828, 1.06827807],
    "euler_init_sigma_full": 14.6146469,
    "euler_ts": [999, 957.375, 915.75, 874.125, 832.5, 790.875, 749.25, 707.625, 666, 624.375, 582.75, 541.125, 499.5, 457.875, 416.25, 374.625, 333, 291.375, 249.75, 208.125, 166.5, 124.875, 83.25, 41.625, 0],
    "euler_sigmas": [14.6146469, 11.4359417, 9.07680893, 7.30199432, 5.94891834, 4.90377808, 4.08608961, 3.43817949, 2.9183085, 2.49597192, 2.14859533, 1.85935748, 1.61558342, 1.40762293, 1.22806966, 1.07116103, 0.932358384, 0.808024108, 0.695150971, 0.591142297, 0.493553489, 0.399702787, 0.305777878, 0.203489929, 0.0291675348, 0],
    "euler_init_sigma": 14.6146469,
    "euler_scaled_0": [0.0302604828, 0.0861643925, 0.101543829, 0.069165647, 0.00425775861, -0.0626526102, -0.100096479, -0.090463385],
    "euler_step_0": [-2.6720624, -1.1690011, 1.58031356, 3.55979395, 3.13553762, 0.356235147, -2.95557117, -4.45070219],
    "euler_x0_0": [-13.8800468, -9.91569138, 1.91423655, 12.7216244, 14.1917858, 4.93974924, -8.3134985, -15.695303],
    "euler_step_7": [-0.0662278533, 0.864587307, 1.50267708, 1.42968631, 0.56498152, -0.709422946, -1.70986331, -1.83635449],
    "euler_x0_7": [-2.92636442, -1.36745834, 1.58789003, 3.76767015, 3.38639712, 0.460232258, -3.0771389, -4.70583534],
    "euler_step_24": [0.41469422, 1.23989797, 1.48834884, 1.03656244, 0.0905702561, -0.906096399, -1.47996068, -1.35386121],
    "euler_x0_24": [0.41469422, 1.23989797, 1.48834884, 1.03656244, 0.0905702561, -0.906096399, -1.47996068, -1.35386121],
    "euler_lead_ts": [951, 901, 851, 801, 751, 701, 651, 601, 551, 501, 451, 401, 351, 301, 251, 201, 151, 101, 51, 1],
    "euler_lead_init_sigma": 11.0735807,
    "euler_v_step_3": [0.167942077, 0.87234956, 1.20910585, 0.975573599, 0.238561913, -0.664533615, -1.2774272, -1.26341367],
    "euler_add_noise": [8.5325985, 7.39325619, -3.32172203, -7.69077778, 0.0706695542, -0.440066606, -1.21901453, -1.67060721],
}
# fmt: on


def close(got, name, rtol=2e-5, atol=2e-6):
    """Our float32 results agree with diffusers' to float32 rounding (we do the scalar math in
    float64, diffusers in float32)."""
    np.testing.assert_allclose(np.ravel(got), DIFFUSERS[name], rtol=rtol, atol=atol, err_msg=name)


ALL = (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler)


# ---------------------------------------------------------------------------------------------
# The tables: betas, alphas, alphas_cumprod
# ---------------------------------------------------------------------------------------------


def test_betas_follow_their_formulas():
    T = 1000
    i = np.arange(T)
    linear = 0.0001 + (0.02 - 0.0001) * i / (T - 1)
    np.testing.assert_allclose(make_betas("linear", T, 0.0001, 0.02), linear, rtol=1e-6)
    scaled = (0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / (T - 1)) ** 2
    np.testing.assert_allclose(make_betas("scaled_linear", T, 0.00085, 0.012), scaled, rtol=1e-6)
    abar = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    cosine = np.minimum(1 - abar[1:] / abar[:-1], 0.999)
    np.testing.assert_allclose(make_betas("squaredcos_cap_v2", T, 0.0001, 0.02), cosine, rtol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_tables(schedule):
    kw = SD if schedule == "scaled_linear" else {"beta_schedule": schedule}
    s = DDPMScheduler(**kw)
    assert s.betas.dtype == s.alphas_cumprod.dtype == np.float32
    np.testing.assert_allclose(s.alphas, 1 - s.betas)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - s.betas.astype(np.float64)), rtol=1e-5)
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    idx = [0, 1, 250, 500, 998, 999]
    close(s.betas[idx], f"betas_{schedule}")
    close(s.alphas_cumprod[idx], f"abar_{schedule}", atol=0)


# ---------------------------------------------------------------------------------------------
# Timestep spacing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spacing, offset, expected",
    [
        ("leading", 0, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("leading", 1, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
        ("linspace", 0, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),  # 999 * k / 9
        ("linspace", 1, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),  # offset: leading only
        ("trailing", 0, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        ("trailing", 1, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ],
)
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_spacing_by_hand(cls, spacing, offset, expected):
    s = cls(timestep_spacing=spacing, steps_offset=offset)
    assert s.num_inference_steps is None and len(s.timesteps) == 1000 and s.timesteps[0] == 999
    s.set_timesteps(10)
    assert s.timesteps.dtype == np.int64
    assert s.timesteps.tolist() == expected
    assert s.num_inference_steps == 10


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("n, offset", [(10, 0), (10, 1), (7, 0), (3, 0)])
def test_spacing_matches_diffusers(spacing, n, offset):
    s = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    s.set_timesteps(n)
    assert s.timesteps.tolist() == DIFFUSERS[f"ts_{spacing}_{n}_{offset}"]


def test_spacing_errors():
    with pytest.raises(ValueError, match="num_inference_steps"):
        spaced_timesteps(1000, 1001, "leading")
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMScheduler(timestep_spacing="uniform")


# ---------------------------------------------------------------------------------------------
# Same numbers as diffusers
# ---------------------------------------------------------------------------------------------


def test_ddim_matches_diffusers():
    # the Stable Diffusion v1 configuration: 1000 -> 25 steps, leading spacing, steps_offset=1
    s = DDIMScheduler(**SD, set_alpha_to_one=False, clip_sample=False, steps_offset=1)
    s.set_timesteps(25)
    assert s.timesteps.tolist() == DIFFUSERS["ddim_sd_ts"]
    for t in (961, 481, 1):
        close(s.step(MODEL_OUTPUT, t, SAMPLE, eta=0.0).prev_sample, f"ddim_sd_eta0_t{t}")
        close(s.step(MODEL_OUTPUT, t, SAMPLE).pred_original_sample, f"ddim_sd_eta0_x0_t{t}")
        out = s.step(MODEL_OUTPUT, t, SAMPLE, eta=0.5, variance_noise=NOISE)
        close(out.prev_sample, f"ddim_sd_eta05_t{t}")
    v = DDIMScheduler(**SD, set_alpha_to_one=False, clip_sample=False, steps_offset=1, prediction_type="v_prediction")
    v.set_timesteps(25)
    close(v.step(MODEL_OUTPUT, 481, SAMPLE).prev_sample, "ddim_v_t481")
    d = DDIMScheduler()  # defaults: linear betas, clip_sample=True
    d.set_timesteps(50)
    out = d.step(MODEL_OUTPUT, 980, SAMPLE)
    close(out.prev_sample, "ddim_default_t980")
    close(out.pred_original_sample, "ddim_default_x0_t980")
    assert np.abs(out.pred_original_sample).max() <= 1.0


def test_ddpm_matches_diffusers():
    s = DDPMScheduler()  # defaults: linear, fixed_small, clip_sample=True, all 1000 steps
    for t in (999, 500, 0):
        close(s.step(MODEL_OUTPUT, t, SAMPLE, variance_noise=NOISE).prev_sample, f"ddpm_full_t{t}")
    # near t = 0, 1 - abar_t is tiny and diffusers' float32 scalar math loses digits: looser atol
    close(s.step(MODEL_OUTPUT, 1, SAMPLE, variance_noise=NOISE).prev_sample, "ddpm_full_t1", atol=1e-4)
    s = DDPMScheduler(variance_type="fixed_large", prediction_type="v_prediction", clip_sample=False)
    close(s.step(MODEL_OUTPUT, 500, SAMPLE, variance_noise=NOISE).prev_sample, "ddpm_large_v_t500")
    s = DDPMScheduler(prediction_type="sample", clip_sample=False)
    close(s.step(MODEL_OUTPUT, 300, SAMPLE, variance_noise=NOISE).prev_sample, "ddpm_sample_t300")
    s = DDPMScheduler(**SD, clip_sample=False, steps_offset=1)
    s.set_timesteps(10)
    assert s.timesteps.tolist() == DIFFUSERS["ddpm_sd10_ts"]
    assert s.previous_timestep(901) == 801 and s.previous_timestep(1) == -1
    close(s.step(MODEL_OUTPUT, 901, SAMPLE, variance_noise=NOISE).prev_sample, "ddpm_sd10_t901")
    close(s.step(MODEL_OUTPUT, 1, SAMPLE, variance_noise=NOISE).prev_sample, "ddpm_sd10_t1")


def test_add_noise_and_velocity_match_diffusers():
    s = DDPMScheduler(**SD)
    t = np.array([10, 700])
    close(s.add_noise(SAMPLE, NOISE, t), "add_noise_sd")
    close(s.get_velocity(SAMPLE, NOISE, t), "velocity_sd")


def test_euler_matches_diffusers():
    e = EulerDiscreteScheduler(**SD)
    close(e.init_noise_sigma, "euler_init_sigma_full")
    e.set_timesteps(25)
    assert e.timesteps.dtype == np.float32 and e.sigmas.shape == (26,) and e.sigmas[-1] == 0
    close(e.timesteps, "euler_ts", atol=0)
    close(e.sigmas, "euler_sigmas")
    close(e.init_noise_sigma, "euler_init_sigma")
    ts = e.timesteps
    close(e.scale_model_input(SAMPLE, ts[0]), "euler_scaled_0")
    for i in (0, 7, 24):
        out = e.step(MODEL_OUTPUT, ts[i], SAMPLE)
        close(out.prev_sample, f"euler_step_{i}")
        close(out.pred_original_sample, f"euler_x0_{i}")
    close(e.add_noise(SAMPLE, NOISE, ts[[2, 20]]), "euler_add_noise")
    v = EulerDiscreteScheduler(**SD, prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1)
    v.set_timesteps(20)
    close(v.timesteps, "euler_lead_ts", atol=0)
    close(v.init_noise_sigma, "euler_lead_init_sigma")  # sqrt(sigma_max^2 + 1) for leading
    close(v.step(MODEL_OUTPUT, v.timesteps[3], SAMPLE).prev_sample, "euler_v_step_3")


# ---------------------------------------------------------------------------------------------
# Round trips and conversions between epsilon, sample and v
# ---------------------------------------------------------------------------------------------


def model_output_for(kind, scheduler, x0, noise, t):
    """What a perfect model would output at (x_t, t) for each prediction_type."""
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    return scheduler.get_velocity(x0, noise, t)


def _make(cls, kind):
    kw = {} if cls is EulerDiscreteScheduler else {"clip_sample": False}
    s = cls(prediction_type=kind, **kw)
    if cls is DDIMScheduler:
        s.set_timesteps(1000)
    return s


@settings(max_examples=100, deadline=None)
@given(
    cls=st.sampled_from(ALL),
    kind=st.sampled_from(["epsilon", "v_prediction", "sample"]),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    data=st.data(),
)
def test_add_noise_then_step_recovers_x0(cls, kind, shape, data):
    s = _make(cls, kind)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x0 = rng.standard_normal(shape)
    noise = rng.standard_normal(shape)
    t = data.draw(st.integers(0, 999))
    # add_noise with one timestep per batch element; check element 0 against the formula
    ts = np.array([t] + [int(u) for u in rng.integers(0, 1000, shape[0] - 1)])
    noisy = s.add_noise(x0, noise, ts)
    assert noisy.shape == x0.shape and noisy.dtype == x0.dtype
    abar = float(s.alphas_cumprod[t])
    if cls is EulerDiscreteScheduler:  # sigma units: x = x0 + sigma eps
        expected0 = x0[0] + ((1 - abar) / abar) ** 0.5 * noise[0]
    else:
        expected0 = abar**0.5 * x0[0] + (1 - abar) ** 0.5 * noise[0]
    np.testing.assert_allclose(noisy[0], expected0, rtol=1e-5, atol=1e-5)
    # step with the perfect model output at timestep t recovers x0
    x_t = s.add_noise(x0, noise, np.array(t))
    out = s.step(model_output_for(kind, s, x0, noise, np.array(t)), t, x_t)
    np.testing.assert_allclose(out.pred_original_sample, x0, rtol=1e-6, atol=1e-6)
    assert out.prev_sample.shape == x0.shape


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_prediction_types_agree(kind):
    """The same true (x0, eps), expressed as eps, x0 or v, gives the same DDIM and Euler steps."""
    rng = np.random.default_rng(0)
    x0, eps = rng.uniform(-1, 1, (3, 2, 4, 4)), rng.standard_normal((3, 2, 4, 4))
    for cls in (DDIMScheduler, EulerDiscreteScheduler):
        ref, other = _make(cls, "epsilon"), _make(cls, kind)
        for s in (ref, other):
            s.set_timesteps(20)
        t = ref.timesteps[5]
        x_t = ref.add_noise(x0, eps, np.array(t))
        a = ref.step(model_output_for("epsilon", ref, x0, eps, t), t, x_t)
        b = other.step(model_output_for(kind, other, x0, eps, t), t, x_t)
        np.testing.assert_allclose(b.pred_original_sample, a.pred_original_sample, atol=1e-9)
        np.testing.assert_allclose(b.prev_sample, a.prev_sample, atol=1e-9)


def test_velocity_identities():
    """v = sqrt(abar) eps - sqrt(1-abar) x0, so x0 = sqrt(abar) x_t - sqrt(1-abar) v and
    eps = sqrt(abar) v + sqrt(1-abar) x_t."""
    s = DDPMScheduler(**SD)
    rng = np.random.default_rng(1)
    x0, eps = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    t = np.array([0, 10, 500, 999])
    x_t, v = s.add_noise(x0, eps, t), s.get_velocity(x0, eps, t)
    a = np.sqrt(s.alphas_cumprod[t].astype(np.float64))[:, None]
    b = np.sqrt(1 - s.alphas_cumprod[t].astype(np.float64))[:, None]
    np.testing.assert_allclose(a * x_t - b * v, x0, atol=1e-6)
    np.testing.assert_allclose(a * v + b * x_t, eps, atol=1e-6)
    np.testing.assert_allclose(v**2 + x_t**2, x0**2 + eps**2, atol=1e-6)  # a rotation


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def oracle(scheduler, x0):
    """A "model" that knows x0 and returns the true epsilon of whatever it is given."""

    def predict(x_t, t):
        abar = float(scheduler.alphas_cumprod[round(float(t))])
        return (x_t - abar**0.5 * x0) / (1 - abar) ** 0.5

    return predict


@pytest.mark.parametrize("cls, kw", [(DDPMScheduler, {}), (DDIMScheduler, {"eta": 0.0}), (DDIMScheduler, {"eta": 1.0})])
def test_sampling_with_oracle_lands_on_x0(cls, kw):
    x0 = np.random.default_rng(2).uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    s = cls(**SD)
    s.set_timesteps(50)
    model = oracle(s, x0)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(x0.shape).astype(np.float32) * s.init_noise_sigma
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), t), t, x, generator=rng, **kw).prev_sample
        assert x.dtype == np.float32
    np.testing.assert_allclose(x, x0, atol=2e-3)


def test_euler_sampling_with_oracle_lands_on_x0():
    x0 = np.random.default_rng(2).uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    s = EulerDiscreteScheduler(**SD)
    s.set_timesteps(20)
    x = np.random.default_rng(3).standard_normal(x0.shape).astype(np.float32) * s.init_noise_sigma
    for t in s.timesteps:
        # the network sees x_t = x / sqrt(sigma^2 + 1); its epsilon is the same in both units
        x_t = s.scale_model_input(x, t)
        abar = float(np.interp(t, np.arange(1000), s.alphas_cumprod))
        np.testing.assert_allclose(np.sqrt(abar) * x, x_t, rtol=1e-4)
        eps = (x_t - abar**0.5 * x0) / (1 - abar) ** 0.5
        x = s.step(eps, t, x).prev_sample
    np.testing.assert_allclose(x, x0, atol=2e-3)


def test_ddim_eta0_is_deterministic_and_eta_adds_noise():
    s = DDIMScheduler(**SD)
    s.set_timesteps(10)
    a = s.step(MODEL_OUTPUT, 500, SAMPLE, eta=0.0, generator=np.random.default_rng(1)).prev_sample
    b = s.step(MODEL_OUTPUT, 500, SAMPLE, eta=0.0, generator=np.random.default_rng(2)).prev_sample
    np.testing.assert_array_equal(a, b)
    c = s.step(MODEL_OUTPUT, 500, SAMPLE, eta=0.5, generator=np.random.default_rng(1)).prev_sample
    d = s.step(MODEL_OUTPUT, 500, SAMPLE, eta=0.5, generator=np.random.default_rng(2)).prev_sample
    assert not np.allclose(c, d)


def test_ddim_eta1_all_steps_is_ddpm():
    """With every timestep and eta = 1, DDIM's update is exactly DDPM's posterior sample."""
    rng = np.random.default_rng(4)
    x_t, eps, z = rng.standard_normal((3, 2, 5))
    ddpm, ddim = DDPMScheduler(clip_sample=False), DDIMScheduler(clip_sample=False)
    ddim.set_timesteps(1000)
    for t in (999, 600, 17, 1):
        a = ddpm.step(eps, t, x_t, variance_noise=z).prev_sample
        b = ddim.step(eps, t, x_t, eta=1.0, variance_noise=z).prev_sample
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_ddpm_noise_uses_generator():
    s = DDPMScheduler()
    a = s.step(MODEL_OUTPUT, 500, SAMPLE, generator=np.random.default_rng(7)).prev_sample
    b = s.step(MODEL_OUTPUT, 500, SAMPLE, generator=np.random.default_rng(7)).prev_sample
    c = s.step(MODEL_OUTPUT, 500, SAMPLE).prev_sample  # a fresh default_rng
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # no noise at t = 0
    d = s.step(MODEL_OUTPUT, 0, SAMPLE, generator=np.random.default_rng(1)).prev_sample
    e = s.step(MODEL_OUTPUT, 0, SAMPLE, generator=np.random.default_rng(2)).prev_sample
    np.testing.assert_array_equal(d, e)


def test_fixed_large_variance_is_beta():
    rng = np.random.default_rng(5)
    small, large = DDPMScheduler(clip_sample=False), DDPMScheduler(clip_sample=False, variance_type="fixed_large")
    x, eps, z = rng.standard_normal((3, 4))
    t = 400
    diff = large.step(eps, t, x, variance_noise=z).prev_sample - small.step(eps, t, x, variance_noise=z).prev_sample
    abar, abar_prev = float(small.alphas_cumprod[t]), float(small.alphas_cumprod[t - 1])
    beta = float(small.betas[t])
    expected = (beta**0.5 - ((1 - abar_prev) / (1 - abar) * beta) ** 0.5) * z
    np.testing.assert_allclose(diff, expected, rtol=1e-4, atol=1e-7)


def test_timestep_may_be_a_0d_array_and_scale_model_input():
    for cls in (DDPMScheduler, DDIMScheduler):
        s = cls()
        s.set_timesteps(10)
        t = s.timesteps[3]  # a NumPy int64 scalar
        a = s.step(MODEL_OUTPUT, np.array(t), SAMPLE, variance_noise=NOISE).prev_sample
        b = s.step(MODEL_OUTPUT, int(t), SAMPLE, variance_noise=NOISE).prev_sample
        np.testing.assert_array_equal(a, b)
        assert s.scale_model_input(SAMPLE, t) is SAMPLE
        assert s.init_noise_sigma == 1.0
    e = EulerDiscreteScheduler()
    e.set_timesteps(10)
    t = e.timesteps[4]
    sigma = e.sigmas[4]
    np.testing.assert_allclose(e.scale_model_input(SAMPLE, np.array(t)), SAMPLE / np.sqrt(sigma**2 + 1), rtol=1e-6)


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMScheduler(beta_schedule="sigmoidal")
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="variance_type"):
        DDPMScheduler(variance_type="learned")
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMScheduler().step(MODEL_OUTPUT, 10, SAMPLE)
    with pytest.raises(ValueError, match="shape"):
        DDPMScheduler().step(MODEL_OUTPUT[:1], 10, SAMPLE)
    with pytest.raises(ValueError, match="outside"):
        DDPMScheduler().step(MODEL_OUTPUT, 1000, SAMPLE)
    with pytest.raises(ValueError, match="integers"):
        DDPMScheduler().add_noise(SAMPLE, NOISE, np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="lie in"):
        DDIMScheduler().add_noise(SAMPLE, NOISE, np.array([0, 1000]))
    e = EulerDiscreteScheduler()
    e.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of"):
        e.step(MODEL_OUTPUT, 5.5, SAMPLE)
    s = DDPMScheduler()
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of"):
        s.step(MODEL_OUTPUT, 950, SAMPLE)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

# Stable Diffusion v1.5's scheduler_config.json, as shipped (a PNDM config)
SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def test_config_holds_constructor_args():
    s = DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    assert s.config["beta_schedule"] == "squaredcos_cap_v2"
    assert s.config["clip_sample"] is True and s.config["timestep_spacing"] == "leading"
    assert DDPMScheduler().config["variance_type"] == "fixed_small"
    assert EulerDiscreteScheduler().config["timestep_spacing"] == "linspace"
    for cls in ALL:
        s = cls()
        assert cls.from_config(s.config).config == s.config


def test_from_config_json(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD15_CONFIG))
    ddim = DDIMScheduler.from_config(path)
    assert ddim.config["beta_schedule"] == "scaled_linear" and ddim.config["steps_offset"] == 1
    assert ddim.config["set_alpha_to_one"] is False and ddim.config["clip_sample"] is False
    # keys DDIM does not take stay in its config, as in diffusers, for schedulers made from it
    assert "_class_name" not in ddim.config and ddim.config["skip_prk_steps"] is True
    ddim.set_timesteps(25)
    assert ddim.timesteps.tolist() == DIFFUSERS["ddim_sd_ts"]
    assert ddim.final_alpha_cumprod == pytest.approx(0.99915, abs=1e-5)
    euler = EulerDiscreteScheduler.from_config(str(path))
    assert euler.config["steps_offset"] == 1 and euler.config["timestep_spacing"] == "linspace"
    ddpm = DDPMScheduler.from_config(SD15_CONFIG)
    assert ddpm.config["clip_sample"] is False
    np.testing.assert_array_equal(ddpm.betas, ddim.betas)


def test_from_config_refuses_features_we_lack():
    with pytest.raises(ValueError, match="thresholding"):
        DDPMScheduler.from_config({**SD15_CONFIG, "thresholding": True})
    with pytest.raises(ValueError, match="trained_betas"):
        DDIMScheduler.from_config({**SD15_CONFIG, "trained_betas": [0.1] * 1000})
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        EulerDiscreteScheduler.from_config({**SD15_CONFIG, "use_karras_sigmas": True})
    # turned off, they are fine
    DDPMScheduler.from_config({**SD15_CONFIG, "thresholding": False, "rescale_betas_zero_snr": False})


# ---------------------------------------------------------------------------------------------
# CuPy (skipped without it)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("cls", ALL)
def test_cupy_arrays_match_numpy(cls):
    cp = pytest.importorskip("cupy")
    try:
        cp.zeros(1)
    except Exception:  # cupy installed but no usable GPU
        pytest.skip("no CUDA device")
    s = cls(**SD)
    s.set_timesteps(10)
    t = s.timesteps[2]
    kw = {} if cls is EulerDiscreteScheduler else {"variance_noise": cp.asarray(NOISE)}
    gpu = s.step(cp.asarray(MODEL_OUTPUT), t, cp.asarray(SAMPLE), **kw)
    cpu = s.step(MODEL_OUTPUT, t, SAMPLE, **({} if cls is EulerDiscreteScheduler else {"variance_noise": NOISE}))
    assert isinstance(gpu.prev_sample, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(gpu.prev_sample), cpu.prev_sample, rtol=1e-5, atol=1e-6)
    ts = s.timesteps[[0, 5]]
    noisy = s.add_noise(cp.asarray(SAMPLE), cp.asarray(NOISE), cp.asarray(ts))
    np.testing.assert_allclose(cp.asnumpy(noisy), s.add_noise(SAMPLE, NOISE, ts), rtol=1e-5, atol=1e-6)
    if cls is DDPMScheduler:  # noise drawn with NumPy, moved to the GPU
        out = s.step(cp.asarray(MODEL_OUTPUT), t, cp.asarray(SAMPLE), generator=np.random.default_rng(0))
        assert isinstance(out.prev_sample, cp.ndarray)
