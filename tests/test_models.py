"""Models: shapes, diffusers-style state_dict keys, gradients reaching every parameter,
float64 gradient checks of tiny models, and overfitting a tiny fixed batch."""

import math

import numpy as np
import pytest

import tinysd
from tinysd import optim
from tinysd.gradcheck import gradcheck
from tinysd.models import (
    AutoencoderKL,
    CLIPModel,
    CLIPTextModel,
    CLIPVisionModel,
    DigitClassifier,
    UNet2DConditionModel,
    timestep_embedding,
)
from tinysd.nn import functional as F


# ---- tiny configurations (seconds to build, train and check) ---------------------------------------
def tiny_unet(**kw):
    cfg = dict(in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
               cross_attention_dim=6, attention_head_dim=4, norm_num_groups=4, ff_mult=2, zero_init_out=False)
    return UNet2DConditionModel(**{**cfg, **kw})


def tiny_vae(**kw):
    cfg = dict(in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
               latent_channels=2, norm_num_groups=2)
    return AutoencoderKL(**{**cfg, **kw})


def tiny_text(**kw):
    cfg = dict(vocab_size=12, context_length=6, width=8, layers=2, heads=2, projection_dim=4)
    return CLIPTextModel(**{**cfg, **kw})


def token_ids(rng, batch, length=6, vocab=12, eos=2):
    """BOS, random words, EOS, PAD... rows of different lengths."""
    ids = np.zeros((batch, length), np.int64)
    for row in range(batch):
        n = rng.integers(0, length - 1)
        ids[row, 0] = 1
        ids[row, 1:1 + n] = rng.integers(4, vocab, n)
        ids[row, 1 + n] = eos
    return ids


def as64(model):
    return model.double()


# ---- UNet -----------------------------------------------------------------------------------------
UNET_CONFIGS = [
    dict(),
    dict(block_out_channels=(8, 16, 16), layers_per_block=2, attention_levels=(False, True, True)),
    dict(attention_levels=(False, False)),
    dict(cross_attention_dim=None, num_class_embeds=11, gated_ff=False),
    dict(num_class_embeds=10, transformer_layers=2),
]


@pytest.mark.parametrize("cfg", UNET_CONFIGS)
def test_unet_shapes_and_keys(cfg):
    unet = tiny_unet(**cfg)
    levels = len(unet.down_blocks)
    batch, size = 3, 2 ** (levels - 1) * 2
    x = tinysd.randn(batch, 2, size, size)
    ctx = tinysd.randn(batch, 5, 6) if unet.cross_attention_dim else None
    labels = np.arange(batch) if unet.num_class_embeds else None
    out = unet(x, np.array([0, 10, 999]), encoder_hidden_states=ctx, class_labels=labels)
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.isfinite(out.numpy()).all()

    keys = set(unet.state_dict())
    layers = cfg.get("layers_per_block", 1)
    expected = {
        "conv_in.weight", "time_embedding.linear_1.weight", "time_embedding.linear_2.bias",
        "down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.resnets.0.conv1.weight",
        "down_blocks.0.resnets.0.time_emb_proj.weight", "down_blocks.0.resnets.0.norm2.bias",
        "down_blocks.0.resnets.0.conv2.weight", "down_blocks.0.downsamplers.0.conv.weight",
        "down_blocks.1.resnets.0.conv_shortcut.weight", "mid_block.resnets.1.conv2.weight",
        f"up_blocks.0.resnets.{layers}.conv1.weight", "up_blocks.0.upsamplers.0.conv.weight",
        "conv_norm_out.weight", "conv_out.weight", "conv_out.bias",
    }
    assert expected <= keys, expected - keys
    assert not any(k.startswith(f"down_blocks.{levels - 1}.downsamplers") for k in keys)
    assert not any(k.startswith(f"up_blocks.{levels - 1}.upsamplers") for k in keys)
    assert not any(f"resnets.{layers + 1}." in k for k in keys)  # up blocks have layers + 1 resnets
    attention = "mid_block.attentions.0.transformer_blocks.0"
    has_attention = any(cfg.get("attention_levels", (True,)))
    assert (f"{attention}.attn1.to_q.weight" in keys) == has_attention
    assert (f"{attention}.attn2.to_k.weight" in keys) == (has_attention and unet.cross_attention_dim is not None)
    if has_attention:
        for name in ("norm.weight", "proj_in.weight", "proj_out.bias"):
            assert f"mid_block.attentions.0.{name}" in keys
        for name in ("norm1.weight", "norm3.bias", "attn1.to_out.0.weight", "ff.net.0.proj.weight",
                     "ff.net.2.weight"):
            assert f"{attention}.{name}" in keys
    assert ("class_embedding.weight" in keys) == bool(unet.num_class_embeds)


def test_unet_default_configuration():
    unet = UNet2DConditionModel()
    assert 0.5e6 <= unet.num_parameters() <= 1.5e6
    out = unet(tinysd.randn(2, 4, 8, 8), 500, encoder_hidden_states=tinysd.randn(2, 16, 64))
    assert out.shape == (2, 4, 8, 8)
    np.testing.assert_array_equal(out.numpy(), 0.0)  # conv_out starts at zero


def test_unet_timestep_forms_agree():
    unet = tiny_unet()
    x, ctx = tinysd.randn(2, 2, 4, 4), tinysd.randn(2, 3, 6)
    with tinysd.no_grad():
        outs = [unet(x, t, ctx).numpy() for t in (7, np.int64(7), np.array([7, 7]), tinysd.tensor([7, 7]),
                                                  tinysd.tensor(7.0))]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-6, atol=1e-6)


def test_unet_bad_inputs_are_clear_errors():
    unet = tiny_unet()
    x, ctx = tinysd.randn(2, 2, 4, 4), tinysd.randn(2, 3, 6)
    with pytest.raises(ValueError, match="sample"):
        unet(tinysd.randn(2, 3, 4, 4), 1, ctx)
    with pytest.raises(ValueError, match="multiples"):
        unet(tinysd.randn(2, 2, 5, 5), 1, ctx)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        unet(x, 1, None)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        unet(x, 1, tinysd.randn(2, 3, 5))
    with pytest.raises(ValueError, match="timestep"):
        unet(x, np.array([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="class_labels"):
        unet(x, 1, ctx, class_labels=np.array([1, 2]))
    with pytest.raises(ValueError, match="multiples"):
        UNet2DConditionModel(block_out_channels=(24, 48), norm_num_groups=16)
    with pytest.raises(ValueError, match="attention_levels"):
        UNet2DConditionModel(attention_levels=(True,))


def test_timestep_embedding_matches_the_formula():
    t = np.array([0, 1, 500])
    emb = timestep_embedding(t, 8)
    freqs = 10000.0 ** (-np.arange(4) / 4)
    np.testing.assert_allclose(emb, np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], 1))
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_class_labels_change_the_prediction():
    unet = tiny_unet(cross_attention_dim=None, num_class_embeds=10)
    x = tinysd.randn(1, 2, 4, 4)
    with tinysd.no_grad():
        a, b = (unet(x, 3, class_labels=np.array([d])).numpy() for d in (1, 2))
    assert np.abs(a - b).max() > 1e-4


# ---- VAE ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, image", [
    (dict(), (1, 8, 8)),
    (dict(block_out_channels=(4, 8, 8), layers_per_block=2, mid_block_attention=False), (1, 16, 16)),
    (dict(in_channels=3, out_channels=3, latent_channels=3), (3, 4, 8)),
])
def test_vae_shapes_and_keys(cfg, image):
    vae = tiny_vae(**cfg)
    x = tinysd.randn(2, *image)
    posterior = vae.encode(x)
    f = vae.downscale_factor
    latent_shape = (2, vae.latent_channels, image[1] // f, image[2] // f)
    assert posterior.mean.shape == posterior.logvar.shape == latent_shape
    assert posterior.sample().shape == latent_shape
    recon, post = vae(x)
    assert recon.shape == x.shape and post.kl().shape == ()
    keys = set(vae.state_dict())
    expected = {
        "encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.norm1.weight",
        "encoder.down_blocks.0.resnets.0.conv2.bias", "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.mid_block.resnets.0.conv1.weight", "encoder.conv_norm_out.weight", "encoder.conv_out.weight",
        "quant_conv.weight", "post_quant_conv.weight", "decoder.conv_in.weight",
        "decoder.mid_block.resnets.1.norm2.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight",
        f"decoder.up_blocks.0.resnets.{vae.decoder.up_blocks[0].resnets.__len__() - 1}.conv1.weight",
        "decoder.conv_out.bias",
    }
    assert expected <= keys, expected - keys
    assert len(vae.decoder.up_blocks[0].resnets) == cfg.get("layers_per_block", 1) + 1
    assert not any("time_emb_proj" in k for k in keys)
    attention = {"encoder.mid_block.attentions.0.group_norm.weight", "encoder.mid_block.attentions.0.to_q.weight",
                 "decoder.mid_block.attentions.0.to_out.0.weight"}
    assert (attention <= keys) == cfg.get("mid_block_attention", True)
    assert vae.state_dict()["encoder.conv_out.weight"].shape[0] == 2 * vae.latent_channels


def test_vae_default_configuration_and_errors():
    vae = AutoencoderKL()
    assert 0.1e6 <= vae.num_parameters() <= 0.3e6  # 0.17M
    posterior = vae.encode(tinysd.randn(2, 1, 32, 32))
    assert posterior.mean.shape == (2, 4, 8, 8)
    assert vae.decode(posterior.mode()).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="encode"):
        vae.encode(tinysd.randn(2, 1, 30, 30))
    with pytest.raises(ValueError, match="decode"):
        vae.decode(tinysd.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL(block_out_channels=(12, 16), norm_num_groups=8)


def test_vae_posterior_sampling_and_kl():
    vae = tiny_vae()
    posterior = vae.encode(tinysd.randn(4, 1, 8, 8))
    a = posterior.sample(np.random.default_rng(1)).numpy()
    b = posterior.sample(np.random.default_rng(1)).numpy()
    np.testing.assert_array_equal(a, b)
    mean, logvar = posterior.mean.numpy(), posterior.logvar.numpy()
    kl = 0.5 * (mean**2 + np.exp(logvar) - 1 - logvar).reshape(4, -1).sum(1).mean()
    np.testing.assert_allclose(posterior.kl().item(), kl, rtol=1e-5)
    np.testing.assert_array_equal(posterior.mode().numpy(), mean)


def test_vae_scaling_factor_gives_unit_variance_latents():
    vae = tiny_vae()
    images = np.random.default_rng(0).standard_normal((20, 1, 8, 8)).astype(np.float32)
    scale = vae.estimate_scaling_factor(images, batch_size=8)
    assert vae.scaling_factor == scale
    with tinysd.no_grad():
        latents = vae.encode(tinysd.tensor(images)).mean.numpy()
    np.testing.assert_allclose((latents * scale).std(), 1.0, rtol=1e-4)


# ---- CLIP -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(), dict(layers=1, heads=4, width=16, projection_dim=8)])
def test_text_model_shapes_keys_and_eos_pooling(cfg):
    model = tiny_text(**cfg)
    ids = token_ids(np.random.default_rng(0), 5)
    hidden, pooled = model(ids)
    width = cfg.get("width", 8)
    assert hidden.shape == (5, 6, width) and pooled.shape == (5, width)
    eos = (ids == 2).argmax(1)
    np.testing.assert_array_equal(pooled.numpy(), hidden.numpy()[np.arange(5), eos])
    keys = set(model.state_dict())
    assert {
        "embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
        "encoder.layers.0.layer_norm1.weight", "encoder.layers.0.self_attn.to_q.weight",
        "encoder.layers.0.self_attn.to_q.bias", "encoder.layers.0.self_attn.to_out.0.weight",
        "encoder.layers.0.layer_norm2.bias", "encoder.layers.0.mlp.fc1.weight", "encoder.layers.0.mlp.fc2.bias",
        "final_layer_norm.weight", "text_projection.weight",
    } <= keys
    assert "text_projection.bias" not in keys
    assert model.state_dict()["embeddings.token_embedding.weight"].numpy().std() < 0.05  # N(0, 0.02)


def test_text_model_is_causal():
    """Changing a token changes the features at and after it, never before."""
    model = tiny_text()
    ids = np.array([[1, 5, 6, 7, 2, 0]])
    changed = ids.copy()
    changed[0, 3] = 9
    with tinysd.no_grad():
        a, b = model(ids)[0].numpy(), model(changed)[0].numpy()
    np.testing.assert_allclose(a[0, :3], b[0, :3], rtol=1e-6, atol=1e-6)
    assert np.abs(a[0, 3:] - b[0, 3:]).max() > 1e-4


def test_text_model_errors():
    model = tiny_text()
    with pytest.raises(ValueError, match="EOS"):
        model(np.array([[1, 5, 6, 0, 0, 0]]))
    with pytest.raises(ValueError, match="context_length"):
        model(np.array([[1, 5, 6, 7, 8, 9, 2]]))
    with pytest.raises(ValueError, match="integers"):
        model(np.zeros((2, 6), np.float32))


def test_clip_model_loss_features_and_zero_shot():
    clip = CLIPModel(tiny_text(), CLIPVisionModel(width=16, projection_dim=4, groups=4))
    rng = np.random.default_rng(0)
    ids, images = token_ids(rng, 4), tinysd.randn(4, 1, 32, 32)
    assert clip.get_text_features(ids).shape == (4, 4) and clip.get_image_features(images).shape == (4, 4)
    np.testing.assert_allclose(clip.logit_scale.item(), math.log(1 / 0.07), rtol=1e-6)
    labels = np.array([3, 3, 1, 2])
    loss = clip(ids, images, labels=labels)
    same = clip(ids, images, positives=labels[:, None] == labels[None, :])
    np.testing.assert_allclose(loss.item(), same.item(), rtol=1e-6)
    assert clip(ids, images).item() != pytest.approx(loss.item())
    predicted = clip.zero_shot_classify(images, ids[:3])
    similarity = clip.similarity(images, ids[:3])
    assert similarity.shape == (4, 3) and np.abs(similarity).max() <= 1 + 1e-5
    np.testing.assert_array_equal(predicted, similarity.argmax(1))


def test_clip_model_builds_default_encoders():
    clip = CLIPModel(vocab_size=30, context_length=8)
    assert clip.text_model.context_length == 8 and clip.text_model.width == 64
    ids = np.array([[1, 5, 2, 0, 0, 0, 0, 0]] * 2)
    assert clip.get_image_features(tinysd.randn(2, 1, 32, 32)).shape == clip.get_text_features(ids).shape
    with pytest.raises(ValueError, match="vocab_size"):
        CLIPModel()
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPModel(tiny_text(), CLIPVisionModel(projection_dim=5))


# ---- classifier -----------------------------------------------------------------------------------
def test_classifier_shapes():
    model = DigitClassifier()
    x = tinysd.randn(3, 1, 32, 32)
    assert model(x).shape == (3, 10) and model.features(x).shape == (3, 128)
    maps = model.feature_maps(x)
    assert [m.shape for m in maps] == [(3, 16, 16, 16), (3, 32, 8, 8), (3, 64, 4, 4)]
    expected = F.relu(model.fc1(maps[-1].flatten(1)))
    np.testing.assert_array_equal(model.features(x).numpy(), expected.numpy())
    assert DigitClassifier(image_size=24)(tinysd.randn(2, 1, 24, 24)).shape == (2, 10)
    with pytest.raises(ValueError, match="32"):
        model(tinysd.randn(2, 1, 28, 28))
    assert model.num_parameters() < 0.3e6


# ---- gradients reach every parameter ---------------------------------------------------------------
def unet_loss(unet, batch=2, size=4):
    x, ctx = tinysd.randn(batch, 2, size, size), tinysd.randn(batch, 3, 6)
    labels = np.arange(batch) if unet.num_class_embeds else None
    return F.mse_loss(unet(x, np.array([5, 700][:batch]), ctx if unet.cross_attention_dim else None, labels), x)


def vae_loss(vae, x):
    recon, posterior = vae(x, generator=np.random.default_rng(0))
    return F.mse_loss(recon, x) + 0.1 * posterior.kl()


def clip_loss(clip, rng):
    return clip(token_ids(rng, 4), tinysd.randn(4, 1, 32, 32), labels=np.array([0, 1, 0, 2]))


@pytest.mark.parametrize("name", ["unet", "unet_classes", "vae", "clip", "classifier"])
def test_every_parameter_gets_a_gradient(name):
    rng = np.random.default_rng(0)
    if name == "unet":
        model = tiny_unet(num_class_embeds=4)
        loss = unet_loss(model)
    elif name == "unet_classes":
        model = tiny_unet(cross_attention_dim=None, num_class_embeds=4)
        loss = unet_loss(model)
    elif name == "vae":
        model = tiny_vae()
        loss = vae_loss(model, tinysd.randn(2, 1, 8, 8))
    elif name == "clip":
        model = CLIPModel(tiny_text(), CLIPVisionModel(width=16, projection_dim=4, groups=4))
        loss = clip_loss(model, rng)
    else:
        model = DigitClassifier(channels=(4, 4, 8), hidden=8)
        loss = F.cross_entropy(model(tinysd.randn(4, 1, 32, 32)), np.array([0, 1, 2, 3]))
    loss.backward()
    for key, p in model.named_parameters():
        assert p.grad is not None, f"{key} got no gradient"
        assert p.grad.shape == p.shape and np.isfinite(p.grad.numpy()).all(), key
        assert np.abs(p.grad.numpy()).max() > 0, f"{key} got an all-zero gradient"


# ---- float64 gradient checks of whole (tiny) models --------------------------------------------------
def check_model(model, make_output, inputs=()):
    """gradcheck over all parameters (and `inputs`): fn swaps the perturbed values into the model."""
    params = model.parameters()

    def fn(*args):
        for p, value in zip(params, args):
            p.data = value.data
        return make_output(*args[len(params):])

    assert gradcheck(fn, params + list(inputs), mode="directional")


def test_gradcheck_unet():
    unet = as64(tiny_unet(num_class_embeds=3))
    x = tinysd.randn(2, 2, 4, 4, dtype=np.float64, requires_grad=True)
    ctx = tinysd.randn(2, 3, 6, dtype=np.float64, requires_grad=True)
    check_model(unet, lambda x, ctx: unet(x, np.array([3, 800]), ctx, class_labels=np.array([0, 2])), [x, ctx])


def test_gradcheck_vae():
    vae = as64(tiny_vae())
    x = tinysd.randn(2, 1, 8, 8, dtype=np.float64, requires_grad=True)

    def output(x):
        recon, posterior = vae(x, generator=np.random.default_rng(0))  # the same noise every call
        return recon * posterior.kl()

    check_model(vae, output, [x])


def test_gradcheck_clip():
    text = as64(tiny_text())
    ids = token_ids(np.random.default_rng(1), 3)
    check_model(text, lambda: text.text_projection(text(ids)[1]) + text(ids)[0].mean())
    clip = as64(CLIPModel(tiny_text(), CLIPVisionModel(width=8, projection_dim=4, groups=2)))
    images = tinysd.randn(3, 1, 32, 32, dtype=np.float64)
    check_model(clip, lambda: clip(ids, images, labels=np.array([1, 1, 0])))


# ---- each model overfits a tiny fixed batch ----------------------------------------------------------
def overfit(model, loss_fn, steps, lr, clip_norm=None):
    opt = optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        if clip_norm:
            optim.clip_grad_norm_(model.parameters(), clip_norm)
        opt.step()
        losses.append(loss.item())
    return losses


def test_unet_overfits_a_fixed_batch():
    unet = tiny_unet()
    x, ctx, t = tinysd.randn(4, 2, 4, 4), tinysd.randn(4, 3, 6), np.array([1, 200, 500, 900])
    target = tinysd.randn(4, 2, 4, 4)
    losses = overfit(unet, lambda: F.mse_loss(unet(x, t, ctx), target), 60, 1e-2)
    assert losses[-1] < losses[0] / 10, losses


def test_vae_overfits_a_fixed_batch():
    vae = tiny_vae()
    x = tinysd.tensor(np.random.default_rng(0).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32))
    losses = overfit(vae, lambda: F.mse_loss(vae(x, sample_posterior=False)[0], x), 80, 1e-2)
    assert losses[-1] < losses[0] / 10, losses


def test_clip_overfits_a_fixed_batch():
    clip = CLIPModel(tiny_text(), CLIPVisionModel(width=16, projection_dim=4, groups=4))
    ids = np.array([[1, 4 + i, 2, 0, 0, 0] for i in range(6)])
    images = tinysd.randn(6, 1, 32, 32)
    # Without clipping the gradient norm, this run collapses to loss ~ln(6) for dozens of steps.
    losses = overfit(clip, lambda: clip(ids, images), 40, 3e-3, clip_norm=1.0)
    assert losses[-1] < losses[0] / 10, losses


def test_classifier_overfits_a_fixed_batch():
    model = DigitClassifier(channels=(4, 8, 8), hidden=16)
    x, y = tinysd.randn(8, 1, 32, 32), np.arange(8)
    losses = overfit(model, lambda: F.cross_entropy(model(x), y), 40, 1e-2)
    assert losses[-1] < losses[0] / 10, losses


def test_models_run_on_every_device(device):
    """Forward and backward with parameters and inputs on `device`; gradients stay there."""
    text, unet, vae = tiny_text(width=6, heads=2).to(device), tiny_unet().to(device), tiny_vae().to(device)
    ids = token_ids(np.random.default_rng(0), 2)
    ctx = text(ids)[0]
    z = vae.encode(tinysd.randn(2, 1, 8, 8, device=device)).sample()
    assert z.device == device
    loss = F.mse_loss(unet(z[:, :2], np.array([3, 9]), ctx), tinysd.zeros(2, 2, 4, 4, device=device))
    loss.backward()
    for model in (text.embeddings, text.encoder, unet, vae.encoder, vae.quant_conv):
        assert all(p.grad is not None and p.grad.device == device for p in model.parameters())
