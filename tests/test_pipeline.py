"""TextToImage end to end with tiny random models: shapes, range, callbacks, guidance, img2img."""

import numpy as np
import pytest

import tinysd
from tinysd.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from tinysd.pipeline import TextToImage
from tinysd.schedulers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from tinysd.tokenizer import Tokenizer

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler}


def tiny_pipeline(scheduler="ddim", device="cpu"):
    tokenizer = Tokenizer(context_length=8)
    text = CLIPTextModel(tokenizer.vocab_size, context_length=8, width=8, layers=1, heads=2, projection_dim=4)
    vae = AutoencoderKL(block_out_channels=(4, 8, 8), latent_channels=2, norm_num_groups=2)
    unet = UNet2DConditionModel(in_channels=2, out_channels=2, block_out_channels=(8, 16), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=4, zero_init_out=False)
    for model in (text, vae, unet):
        model.eval().to(device)
    return TextToImage(vae, tokenizer, text, unet, SCHEDULERS[scheduler](num_train_timesteps=100))


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_text_to_image_shapes_range_and_callback(scheduler, device):
    pipe = tiny_pipeline(scheduler, device)
    calls = []

    def callback(step, timestep, latents, decode):
        calls.append((step, int(timestep), latents.shape))
        if step == 0:
            image = decode(latents)
            assert isinstance(image, np.ndarray) and image.shape == (3, 1, 32, 32)

    images = pipe(["a 7", "the digit one", ""], num_inference_steps=4, seed=0, callback=callback, progress=False)
    assert isinstance(images, np.ndarray) and images.shape == (3, 1, 32, 32) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and np.isfinite(images).all()
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    assert [c[1] for c in calls] == [int(t) for t in pipe.scheduler.timesteps]
    assert all(c[2] == (3, 2, 8, 8) for c in calls)


def test_seed_makes_sampling_reproducible():
    pipe = tiny_pipeline("ddpm")
    a = pipe(["a 3", "a 4"], num_inference_steps=3, seed=5, progress=False)
    b = pipe(["a 3", "a 4"], num_inference_steps=3, seed=5, progress=False)
    c = pipe(["a 3", "a 4"], num_inference_steps=3, seed=6, progress=False)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0
    assert pipe("a 3", num_inference_steps=2, height=16, width=24, progress=False).shape == (1, 1, 16, 24)


def test_guidance_scale_one_is_the_conditional_prediction():
    pipe = tiny_pipeline()
    latents = np.random.default_rng(0).standard_normal((2, 2, 8, 8)).astype(np.float32)
    cond, uncond = pipe.encode_prompt(["a 7", "a 1"]), pipe.encode_prompt(["", ""])
    with tinysd.no_grad():
        guided = pipe.guided_noise(latents, 40, cond, uncond, guidance_scale=1.0)
        eps_c = pipe.unet(tinysd.tensor(latents), 40, encoder_hidden_states=cond).numpy()
        eps_u = pipe.unet(tinysd.tensor(latents), 40, encoder_hidden_states=uncond).numpy()
        np.testing.assert_allclose(guided, eps_c, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(pipe.guided_noise(latents, 40, cond), eps_c, rtol=1e-4, atol=1e-5)
        strong = pipe.guided_noise(latents, 40, cond, uncond, guidance_scale=4.0)
        np.testing.assert_allclose(strong, eps_u + 4.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)


def test_one_batched_unet_call_per_step_and_negative_prompts():
    pipe = tiny_pipeline()
    batches = []
    forward = pipe.unet.forward

    def spy(sample, timestep, encoder_hidden_states=None, class_labels=None):
        batches.append(sample.shape[0])
        return forward(sample, timestep, encoder_hidden_states, class_labels)

    pipe.unet.forward = spy
    pipe(["a 1", "a 2"], num_inference_steps=3, guidance_scale=2.0, progress=False)
    assert batches == [4, 4, 4]
    batches.clear()
    pipe(["a 1", "a 2"], num_inference_steps=3, guidance_scale=1.0, progress=False)
    assert batches == [2, 2, 2]
    a = pipe(["a 1"], num_inference_steps=2, seed=0, negative_prompt="a 7", progress=False)
    b = pipe(["a 1"], num_inference_steps=2, seed=0, progress=False)
    assert np.abs(a - b).max() > 0
    with pytest.raises(ValueError, match="negative"):
        pipe(["a 1", "a 2"], num_inference_steps=2, negative_prompt=["x"], progress=False)
    with pytest.raises(ValueError, match="multiples"):
        pipe(["a 1"], num_inference_steps=2, height=30, progress=False)


def test_img2img(device):
    pipe = tiny_pipeline("ddim", device)
    images = np.random.default_rng(0).uniform(0, 1, (2, 1, 32, 32)).astype(np.float32)
    steps = []
    out = pipe.img2img(images, ["a 5", "a 6"], strength=0.5, num_inference_steps=6, seed=0,
                       callback=lambda i, t, latents, decode: steps.append(int(t)), progress=False)
    assert out.shape == (2, 1, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert steps == [int(t) for t in pipe.scheduler.timesteps[3:]]
    unchanged = pipe.img2img(images, ["a 5", "a 6"], strength=0.0, num_inference_steps=6, progress=False)
    np.testing.assert_allclose(unchanged, pipe.decode_latents(
        pipe.vae.encode(tinysd.tensor(images * 2 - 1, device=device)).mode().data * pipe.vae.scaling_factor),
        rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="strength"):
        pipe.img2img(images, ["a", "b"], strength=1.5)
    with pytest.raises(ValueError, match="images"):
        pipe.img2img(images, ["a"], num_inference_steps=2, progress=False)


def test_pipeline_runs_without_gradients():
    pipe = tiny_pipeline()
    pipe(["a 1"], num_inference_steps=2, progress=False)
    assert all(p.grad is None for p in pipe.unet.parameters())
    seen = []
    pipe(["a 1"], num_inference_steps=1, progress=False,
         callback=lambda *a: seen.append(tinysd.is_grad_enabled()))
    assert seen == [False]
