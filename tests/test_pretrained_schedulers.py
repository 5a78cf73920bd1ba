"""PNDM and DPM-Solver++ at Stable Diffusion 1.5's scheduler config (numbers from diffusers 0.42)."""

import numpy as np
import pytest

from tinysd import schedulers as S

SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}


def test_pndm_timesteps_repeat_the_second():
    pndm = S.PNDMScheduler.from_config(SD15)
    pndm.set_timesteps(10)
    assert list(pndm.timesteps) == [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_configs_carry_over_as_in_diffusers():
    pndm = S.PNDMScheduler.from_config(SD15)
    ddim = S.DDIMScheduler.from_config(pndm.config)
    assert ddim.config["clip_sample"] is False  # a key PNDM does not use still reaches DDIM
    assert ddim.config["timestep_spacing"] == "leading"
    dpm = S.DPMSolverMultistepScheduler.from_config(pndm.config)
    assert dpm.config["timestep_spacing"] == "linspace"  # PNDM's own default does not carry over
    dpm.set_timesteps(10)
    assert list(dpm.timesteps) == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    np.testing.assert_allclose(dpm.sigmas[[0, 5, 9, 10]], [14.6146, 1.6183, 0.3439, 0.0], atol=1e-4)


def _run(scheduler, x, model, steps):
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("cls", [S.PNDMScheduler, S.DPMSolverMultistepScheduler])
def test_exact_noise_prediction_follows_the_exact_path(cls):
    """Data that is one point x0: the true noise of x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is the same
    eps all along the deterministic path, so both samplers must land exactly on its end:
    x0 for DPM-Solver++ (final sigma 0), sqrt(abar_0) x0 + sqrt(1 - abar_0) eps for PNDM (set_alpha_to_one=False)."""
    scheduler = cls.from_config(SD15)
    abar = scheduler.alphas_cumprod.astype(np.float64)
    x0 = np.random.default_rng(0).standard_normal((1, 4, 4, 4)) * 0.5
    x_start = np.random.default_rng(1).standard_normal(x0.shape)

    def model(x, t):
        a = abar[int(t)]
        return (x - a**0.5 * x0) / (1 - a) ** 0.5

    out = _run(scheduler, x_start, model, 20)
    if cls is S.DPMSolverMultistepScheduler:
        want = x0
    else:
        a = abar[int(scheduler.timesteps[0])]
        eps = (x_start - a**0.5 * x0) / (1 - a) ** 0.5
        want = abar[0] ** 0.5 * x0 + (1 - abar[0]) ** 0.5 * eps
    np.testing.assert_allclose(out, want, atol=1e-4)


def test_pndm_needs_set_timesteps_and_plms():
    with pytest.raises(ValueError, match="skip_prk_steps=True"):
        S.PNDMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        S.PNDMScheduler(skip_prk_steps=True).step(np.zeros(2), 1, np.zeros(2))


def test_dpm_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        S.DPMSolverMultistepScheduler.from_config({**SD15, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="solver_order 3"):
        S.DPMSolverMultistepScheduler(solver_order=3)
