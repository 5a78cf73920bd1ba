"""Golden values: every model against outputs computed without tinysd, for fixed weights and inputs.

Shapes, gradient checks and "it overfits" all pass for a UNet whose blocks are wired
differently but keep every shape; these numbers do not. tests/fixtures/golden.safetensors
holds tiny weights, inputs and the outputs of diffusers (UNet, VAE), transformers (CLIP's
text encoder) and torch.nn.functional written out (CLIP's image encoder, the classifier),
made by tests/fixtures/make_golden.py, which says what each oracle is. These tests need
none of those libraries. A loop-level NumPy specification of one classifier stage stands
beside them, so at least one block is checked against code that shares nothing with either.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import tinysd
from tinysd import io
from tinysd.models import AutoencoderKL, CLIPTextModel, CLIPVisionModel, DigitClassifier, UNet2DConditionModel

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "golden.safetensors"
TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=2e-4, atol=2e-5)}  # seen: 1e-15, 1e-6


@pytest.fixture(scope="module")
def golden():
    tensors, configs = io.load_file(FIXTURE), io.load_metadata(FIXTURE)

    def part(model, kind):
        prefix = f"{model}.{kind}."
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    def load(model, cls):
        m = cls(**json.loads(configs[model]))
        m.load_state_dict(part(model, "w"))
        return m.eval(), part(model, "in"), part(model, "out")

    return load


def run_in(model, dtype):
    model.to(dtype)
    return lambda a: tinysd.tensor(np.asarray(a, dtype) if np.asarray(a).dtype.kind == "f" else a)


def close(got, expected, dtype, what):
    got = got.numpy() if hasattr(got, "numpy") else got
    assert got.dtype == dtype and got.shape == expected.shape, (what, got.dtype, got.shape, expected.shape)
    np.testing.assert_allclose(got, expected, **TOL[dtype], err_msg=what)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_unet_matches_diffusers(golden, dtype):
    model, inputs, out = golden("unet", UNet2DConditionModel)
    t = run_in(model, dtype)
    with tinysd.no_grad():
        y = model(t(inputs["sample"]), inputs["timestep"], t(inputs["encoder_hidden_states"]))
    close(y, out["sample"], dtype, "unet sample")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_class_conditioned_unet_matches_diffusers(golden, dtype):
    model, inputs, out = golden("unet_classes", UNet2DConditionModel)
    t = run_in(model, dtype)
    with tinysd.no_grad():
        y = model(t(inputs["sample"]), inputs["timestep"], class_labels=inputs["class_labels"])
    close(y, out["sample"], dtype, "class-conditioned unet sample")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_vae_matches_diffusers(golden, dtype):
    model, inputs, out = golden("vae", AutoencoderKL)
    t = run_in(model, dtype)
    with tinysd.no_grad():
        posterior = model.encode(t(inputs["x"]))
        close(posterior.mean, out["mean"], dtype, "vae posterior mean")
        close(posterior.logvar, out["logvar"], dtype, "vae posterior logvar")
        close(model.decode(t(inputs["z"])), out["decoded"], dtype, "vae decoder")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_clip_text_encoder_matches_transformers(golden, dtype):
    model, inputs, out = golden("clip_text", CLIPTextModel)
    run_in(model, dtype)
    with tinysd.no_grad():
        hidden, pooled = model(inputs["input_ids"])
        close(hidden, out["last_hidden_state"], dtype, "clip last_hidden_state")
        close(model.text_projection(pooled), out["text_embeds"], dtype, "clip text_embeds")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_clip_image_encoder_matches_its_torch_transcription(golden, dtype):
    model, inputs, out = golden("clip_vision", CLIPVisionModel)
    t = run_in(model, dtype)
    with tinysd.no_grad():
        features, pooled = model(t(inputs["pixel_values"]))
        close(features, out["features"], dtype, "clip image features")
        close(pooled, out["pooled"], dtype, "clip image pooled")
        close(model.visual_projection(pooled), out["embeds"], dtype, "clip image embeds")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_classifier_matches_its_torch_transcription(golden, dtype):
    model, inputs, out = golden("classifier", DigitClassifier)
    t = run_in(model, dtype)
    with tinysd.no_grad():
        close(model(t(inputs["x"])), out["logits"], dtype, "classifier logits")


# ---- a loop-level specification of one block ----------------------------------------------------
def conv_relu_pool_spec(x, w, b):
    """One classifier stage, written as loops: 3x3 conv (padding 1), ReLU, 2x2 max-pool."""
    n, c, h, wd = x.shape
    out = w.shape[0]
    xp = np.zeros((n, c, h + 2, wd + 2))
    xp[:, :, 1:-1, 1:-1] = x
    conv = np.zeros((n, out, h, wd))
    for i in range(h):
        for j in range(wd):
            window = xp[:, :, i:i + 3, j:j + 3]  # (n, c, 3, 3)
            for o in range(out):
                conv[:, o, i, j] = (window * w[o]).sum(axis=(1, 2, 3)) + b[o]
    act = np.maximum(conv, 0)
    pooled = np.zeros((n, out, h // 2, wd // 2))
    for i in range(h // 2):
        for j in range(wd // 2):
            pooled[:, :, i, j] = act[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(2, 3))
    return pooled


def test_classifier_stages_match_the_loop_specification(golden):
    model, inputs, _ = golden("classifier", DigitClassifier)
    t = run_in(model, np.float64)
    x = inputs["x"].astype(np.float64)
    with tinysd.no_grad():
        maps = model.feature_maps(t(x))
    for conv, got in zip((model.conv1, model.conv2, model.conv3), maps):
        x = conv_relu_pool_spec(x, conv.weight.numpy(), conv.bias.numpy())
        np.testing.assert_allclose(got.numpy(), x, rtol=1e-10, atol=1e-12)
