"""Every random path against its formula, with the very draws the generator gives.

"Same seed, same result" cannot tell a sample of the wrong spread, or dropout applied
in the wrong place, from the right one. Here each random output is rebuilt by hand
from a copy of the generator (same seed, same calls), and the statistics of many
draws are checked against the distribution's mean and spread, within about five
standard errors (a correct implementation fails about once in a million runs, and
the seeds are fixed, so it either always passes or always fails).
"""

import numpy as np
import pytest

import tinysd
import tinysd.nn.functional as F
from tinysd import Tensor
from tinysd.models.blocks import FeedForward, ResnetBlock2D
from tinysd.models.vae import AutoencoderKL, DiagonalGaussian
from tinysd.schedulers import DDIMScheduler, DDPMScheduler
from helpers import load_script


# ---- the VAE's reparameterised sample ---------------------------------------------------------
def test_posterior_sample_is_mean_plus_std_times_the_generators_eps():
    rng = np.random.default_rng(0)
    params = rng.standard_normal((2, 6, 3, 3))  # mean: channels 0-2, logvar: channels 3-5
    params[:, 3:] = np.clip(params[:, 3:], -2, 2)
    moments = tinysd.tensor(params, requires_grad=True)
    z = DiagonalGaussian(moments).sample(np.random.default_rng(7))
    eps = np.random.default_rng(7).standard_normal((2, 3, 3, 3))
    mean, std = params[:, :3], np.exp(0.5 * params[:, 3:])
    np.testing.assert_allclose(z.numpy(), mean + std * eps, rtol=1e-12)
    # the reparameterisation trick: dz/dmean = 1, dz/dlogvar = eps * std / 2
    g = rng.standard_normal(z.shape)
    z.backward(tinysd.tensor(g))
    np.testing.assert_allclose(moments.grad.numpy()[:, :3], g, rtol=1e-12)
    np.testing.assert_allclose(moments.grad.numpy()[:, 3:], g * eps * std / 2, rtol=1e-12)


def test_posterior_samples_have_the_posteriors_mean_and_std():
    n = 20_000
    mean, logvar = np.array([1.0, -2.0, 0.0]), np.log(np.array([0.25, 4.0, 1.0]))
    params = np.broadcast_to(np.concatenate([mean, logvar])[None, :, None, None], (n, 6, 1, 1))
    z = DiagonalGaussian(tinysd.tensor(params)).sample(np.random.default_rng(1)).numpy()[:, :, 0, 0]
    std = np.exp(0.5 * logvar)
    assert np.all(np.abs(z.mean(axis=0) - mean) < 5 * std / np.sqrt(n)), (z.mean(axis=0), mean)
    assert np.all(np.abs(z.std(axis=0) / std - 1) < 5 / np.sqrt(2 * n)), (z.std(axis=0), std)


def test_vae_forward_decodes_the_sampled_latent():
    tinysd.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(4, 8), latent_channels=2, norm_num_groups=2)
    x = tinysd.randn(2, 1, 8, 8)
    recon, posterior = vae(x, generator=np.random.default_rng(3))
    eps = np.random.default_rng(3).standard_normal(posterior.mean.shape)
    z = posterior.mean.numpy() + posterior.std.numpy() * eps
    np.testing.assert_allclose(recon.numpy(), vae.decode(tinysd.tensor(z.astype(np.float32))).numpy(),
                               rtol=1e-5, atol=1e-6)
    mode, _ = vae(x, sample_posterior=False)
    np.testing.assert_allclose(mode.numpy(), vae.decode(posterior.mean).numpy(), rtol=1e-6)


# ---- dropout -----------------------------------------------------------------------------------
def keep_mask(seed, shape, p):
    """The mask F.dropout draws after tinysd.manual_seed(seed): keep where u >= p, u ~ U[0, 1)."""
    return np.random.default_rng(seed).random(shape) >= p


def test_dropout_is_the_hand_built_mask_scaled_by_one_over_keep():
    x = tinysd.tensor(np.random.default_rng(0).standard_normal((4, 50)), requires_grad=True)
    tinysd.manual_seed(5)
    y = F.dropout(x, p=0.3)
    keep = keep_mask(5, x.shape, 0.3)
    np.testing.assert_allclose(y.numpy(), x.numpy() * keep / 0.7, rtol=1e-12)
    g = np.random.default_rng(1).standard_normal(x.shape)
    y.backward(tinysd.tensor(g))
    np.testing.assert_allclose(x.grad.numpy(), g * keep / 0.7, rtol=1e-12)


def test_dropout_statistics():
    n, p = 200_000, 0.3
    y = F.dropout(tinysd.ones(n, dtype=np.float64), p=p).numpy()
    dropped = np.mean(y == 0)
    assert abs(dropped - p) < 5 * np.sqrt(p * (1 - p) / n), dropped
    assert abs(y.mean() - 1) < 5 * np.sqrt(p / (1 - p) / n), y.mean()  # the expectation is kept
    assert set(np.unique(y)) == {0.0, 1 / (1 - p)}


def test_attention_dropout_drops_attention_weights():
    """dropout_p acts on softmax(q k^T / sqrt(d)), before the product with v (as in PyTorch)."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    tinysd.manual_seed(9)
    out = F.scaled_dot_product_attention(tinysd.tensor(q), tinysd.tensor(k), tinysd.tensor(v), dropout_p=0.4)
    s = q @ k.swapaxes(-1, -2) / 2.0
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    keep = keep_mask(9, (6, 5, 5), 0.4).reshape(2, 3, 5, 5)
    np.testing.assert_allclose(out.numpy(), (w * keep / 0.6) @ v, rtol=1e-10)


def test_resnet_block_dropout_sits_between_the_second_norm_and_conv():
    tinysd.manual_seed(0)
    block = ResnetBlock2D(4, 8, temb_channels=6, groups=2, dropout=0.5).double()
    x, temb = tinysd.randn(2, 4, 5, 5, dtype=np.float64), tinysd.randn(2, 6, dtype=np.float64)
    tinysd.manual_seed(11)
    y = block(x, temb)
    with tinysd.no_grad():  # diffusers' order: norm1, SiLU, conv1, + temb, norm2, SiLU, dropout, conv2, + shortcut
        h = block.conv1(F.silu(block.norm1(x))) + block.time_emb_proj(F.silu(temb)).reshape(2, 8, 1, 1)
        h = F.silu(block.norm2(h))
        h = h * Tensor(keep_mask(11, h.shape, 0.5) / 0.5)
        expected = block.conv_shortcut(x) + block.conv2(h)
    np.testing.assert_allclose(y.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)


def test_feed_forward_dropout_sits_after_the_activation():
    tinysd.manual_seed(0)
    ff = FeedForward(4, mult=2, dropout=0.5).double()
    x = tinysd.randn(2, 3, 4, dtype=np.float64)
    tinysd.manual_seed(3)
    y = ff(x)
    with tinysd.no_grad():
        h = ff.net[0](x)
        expected = ff.net[2](h * Tensor(keep_mask(3, h.shape, 0.5) / 0.5))
    np.testing.assert_allclose(y.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)


# ---- scheduler noise ---------------------------------------------------------------------------
def test_add_noise_is_the_closed_form_with_the_noise_given():
    s = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    rng = np.random.default_rng(0)
    x0, noise, t = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2, 4)), np.array([0, 500, 999])
    abar = s.alphas_cumprod[t].astype(np.float64)[:, None, None]  # the table itself is checked in test_schedulers
    np.testing.assert_allclose(s.add_noise(x0, noise, t), np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise, rtol=1e-12)


def test_add_noise_statistics_over_many_draws():
    s = DDPMScheduler()
    n, t = 50_000, np.array(300)
    abar = float(s.alphas_cumprod[t])
    x0 = np.full(n, 2.0)
    x_t = s.add_noise(x0, np.random.default_rng(2).standard_normal(n), t)
    assert abs(x_t.mean() - 2.0 * abar**0.5) < 5 * np.sqrt((1 - abar) / n)
    assert abs(x_t.std() / np.sqrt(1 - abar) - 1) < 5 / np.sqrt(2 * n)


@pytest.mark.parametrize("cls, kw", [(DDPMScheduler, {}), (DDIMScheduler, {"eta": 0.7})])
def test_step_noise_is_the_generators_draw(cls, kw):
    s = cls()
    if cls is DDIMScheduler:
        s.set_timesteps(50)
    rng = np.random.default_rng(0)
    out, x = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    t = int(s.timesteps[10])
    drawn = s.step(out, t, x, generator=np.random.default_rng(4), **kw).prev_sample
    given = s.step(out, t, x, variance_noise=np.random.default_rng(4).standard_normal((2, 3)), **kw).prev_sample
    np.testing.assert_array_equal(drawn, given)


def test_ddpm_step_spread_is_the_posterior_std():
    s = DDPMScheduler()
    n, t = 50_000, 400
    abar_t, abar_prev = float(s.alphas_cumprod[t]), float(s.alphas_cumprod[t - 1])
    beta = 1 - abar_t / abar_prev
    var = (1 - abar_prev) / (1 - abar_t) * beta  # fixed_small: the posterior variance (DDPM eq. 7)
    x = np.zeros(n)
    steps = s.step(np.zeros(n), t, x, generator=np.random.default_rng(3)).prev_sample
    assert abs(steps.mean()) < 5 * np.sqrt(var / n)
    assert abs(steps.std() / np.sqrt(var) - 1) < 5 / np.sqrt(2 * n)


# ---- the main job's training loop --------------------------------------------------------------
def test_mnist_unet_stage_trains_on_the_noise_it_adds(monkeypatch):
    """examples/mnist_digits.py: the UNet sees x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at t,
    and its MSE target is that same eps, standard normal, each sample's error weighted by min-SNR-5."""
    from types import SimpleNamespace

    example = load_script("examples/mnist_digits.py")

    added, seen, targets = [], [], []

    class SpyScheduler(example.DDPMScheduler):
        def add_noise(self, original_samples, noise, timesteps):
            out = super().add_noise(original_samples, noise, timesteps)
            added.append((original_samples, noise, np.asarray(timesteps), out, self.alphas_cumprod))
            return out

    unet_forward = example.UNet2DConditionModel.forward

    def spy_forward(self, sample, timestep, *args, **kw):
        seen.append((sample.numpy().copy(), np.asarray(timestep.numpy()).copy()))
        return unet_forward(self, sample, timestep, *args, **kw)

    mse_loss = F.mse_loss

    errors, losses = [], []

    def spy_mse(input, target, *args, **kw):
        targets.append(target.numpy().copy())
        out = mse_loss(input, target, *args, **kw)
        errors.append(out.numpy().copy())
        return out

    real_train = example.train

    def spy_train(model, opt, loss_fn, *args, **kw):
        def recorded(idx):
            loss = loss_fn(idx)
            losses.append(float(loss.numpy()))
            return loss
        return real_train(model, opt, recorded, *args, **kw)

    monkeypatch.setattr(example, "DDPMScheduler", SpyScheduler)
    monkeypatch.setattr(example.UNet2DConditionModel, "forward", spy_forward)
    monkeypatch.setattr(example.F, "mse_loss", spy_mse)
    monkeypatch.setattr(example, "train", spy_train)

    tinysd.manual_seed(0)
    images = np.random.default_rng(0).uniform(-1, 1, (8, 1, 16, 16)).astype(np.float32)  # 4x4 latents
    run = SimpleNamespace(
        args=SimpleNamespace(seed=0), device="cpu", train_images=images, train_labels=np.arange(8),
        budget={"unet": dict(steps=2, batch=4, lr=1e-3, min_snr_gamma=5.0)}, tensor=lambda a: tinysd.tensor(a),
        begin=lambda name: tinysd.manual_seed(0), stage=lambda name, model, fit: fit(None, ""),
    )
    tokenizer = example.Tokenizer()
    clip = example.CLIPModel(vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length)
    example.stage_unet(run, example.AutoencoderKL(), clip, tokenizer)

    assert len(added) == len(seen) == len(targets) == 2
    noises = []
    for (x0, noise, t, x_t, abar), (model_input, model_t), target in zip(added, seen, targets):
        a = abar[t].reshape(-1, 1, 1, 1).astype(np.float64)
        np.testing.assert_allclose(x_t, np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(model_input, x_t)
        np.testing.assert_array_equal(model_t, t)
        np.testing.assert_array_equal(target, noise)
        noises.append(noise.ravel())
        assert t.shape == (4,) and 0 <= t.min() and t.max() < 1000
    # min-SNR-5: each sample's mean squared error weighs min(SNR_t, 5) / SNR_t, SNR = abar / (1 - abar)
    for (_, _, t, _, abar), error, loss in zip(added, errors, losses):
        snr = abar[t].astype(np.float64) / (1 - abar[t].astype(np.float64))
        weight = np.minimum(snr, 5.0) / snr
        assert weight.min() < 1.0 or snr.max() <= 5.0
        np.testing.assert_allclose(loss, np.mean(weight * error.reshape(4, -1).mean(axis=1)), rtol=1e-5)
    eps = np.concatenate(noises)
    assert abs(eps.mean()) < 5 / np.sqrt(eps.size) and abs(eps.std() - 1) < 5 / np.sqrt(2 * eps.size)
