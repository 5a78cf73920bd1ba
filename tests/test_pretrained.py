"""A diffusers-format Stable Diffusion folder draws diffusers' images.

tests/fixtures/tiny_sd is SD-1-shaped with random float16 weights; tiny_sd_expected.npz holds
what diffusers and transformers computed from it (tests/fixtures/make_tiny_sd.py). No torch here.
"""

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy

import tinysd
from tinysd import Tensor, no_grad, pretrained, schedulers
from tinysd.gradcheck import gradcheck
from tinysd.pipeline import StableDiffusionPipeline
from helpers import load_script

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FOLDER = os.path.join(FIXTURES, "tiny_sd")
SAMPLERS = {"pndm": schedulers.PNDMScheduler, "ddim": schedulers.DDIMScheduler,
            "euler": schedulers.EulerDiscreteScheduler, "dpm": schedulers.DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(os.path.join(FIXTURES, "tiny_sd_expected.npz")))


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusionPipeline.from_pretrained(FOLDER)


def test_top_level_name():
    assert tinysd.StableDiffusionPipeline is StableDiffusionPipeline


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_images_match_diffusers(pipe, expected, sampler):
    """10 steps, guidance 7.5, a negative prompt, two prompts: within 1e-4 of diffusers' images."""
    pipe.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    out = pipe(list(expected["prompts"]), negative_prompt=list(expected["negative"]),
               num_inference_steps=int(expected["steps"]), guidance_scale=float(expected["guidance"]),
               latents=expected["latents"], output_type="np", progress=False)
    want = expected[f"images_{sampler}"]
    assert out.images.shape == want.shape == (2, 64, 64, 3)
    assert np.abs(out.images - want).max() < 1e-4
    assert 0.5 < ((want > 0) & (want < 1)).mean()  # most pixels are not clipped: the comparison means something


def test_parts_match_transformers_and_diffusers(pipe, expected):
    with no_grad():
        hidden, pooled = pipe.text_encoder(expected["text_ids"])
        unet_out = pipe.unet(Tensor(expected["unet_sample"]), 501, encoder_hidden_states=Tensor(expected["text_hidden"]))
        posterior = pipe.vae.encode(Tensor(expected["vae_image"]))
        decoded = pipe.vae.decode(Tensor(expected["vae_mean"]))
    np.testing.assert_allclose(hidden.numpy(), expected["text_hidden"], atol=1e-5)
    np.testing.assert_allclose(pooled.numpy(), expected["text_pooled"], atol=1e-5)
    np.testing.assert_allclose(unet_out.numpy(), expected["unet_out"], atol=1e-5)
    np.testing.assert_allclose(posterior.mean.numpy(), expected["vae_mean"], atol=1e-5)
    np.testing.assert_allclose(decoded.numpy(), expected["vae_decoded"], atol=1e-4)


def test_pil_output_seed_and_images_per_prompt(pipe):
    pipe.scheduler = schedulers.DDIMScheduler.from_config(pipe.scheduler.config)
    a = pipe("a cat", num_inference_steps=2, num_images_per_prompt=2, seed=3, progress=False)
    b = pipe("a cat", num_inference_steps=2, num_images_per_prompt=2, seed=3, output_type="np", progress=False)
    assert len(a.images) == 2 and a.images[0].size == (64, 64) and a.images[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(a.images[1]), (b.images[1] * 255).round().astype(np.uint8))
    assert not np.array_equal(b.images[0], b.images[1])  # two different noises


def test_callback_sees_every_step(pipe):
    pipe.scheduler = schedulers.PNDMScheduler.from_config(pipe.scheduler.config)
    seen = []
    pipe("a dog", num_inference_steps=3, guidance_scale=1.0, seed=0, output_type="np", progress=False,
         callback=lambda i, t, latents, decode: seen.append((i, int(t), latents.shape)))
    assert [s[1] for s in seen] == [667, 334, 334, 1] and seen[0][2] == (1, 4, 8, 8)


def _write_converted(src, dst, convert):
    """Copy the fixture folder, rewriting every weight file with `convert(array) -> bytes-ready arrays`."""
    shutil.copytree(src, dst)
    for root, _, files in os.walk(dst):
        for name in files:
            if name.endswith(".safetensors"):
                path = os.path.join(root, name)
                arrays = safetensors.numpy.load_file(path)
                os.remove(path)
                convert(arrays, os.path.join(root, name.replace(".fp16", "")))


def _save_bf16(arrays, path):
    """A bfloat16 safetensors file written by hand (NumPy has no bfloat16): the top 16 bits of float32."""
    header, blobs, offset = {}, [], 0
    for key, value in arrays.items():
        bits = (value.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[key] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(bits)]}
        blobs.append(bits)
        offset += len(bits)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_float32_and_bfloat16_files_load(tmp_path, pipe):
    _write_converted(FOLDER, tmp_path / "fp32", lambda a, p: safetensors.numpy.save_file(
        {k: v.astype(np.float32) for k, v in a.items()}, p))
    fp32 = StableDiffusionPipeline.from_pretrained(tmp_path / "fp32")
    for ours, theirs in zip(fp32.unet.parameters(), pipe.unet.parameters()):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())  # float16 values are exact in float32

    _write_converted(FOLDER, tmp_path / "bf16", _save_bf16)
    bf16 = StableDiffusionPipeline.from_pretrained(tmp_path / "bf16")
    for ours, theirs in zip(bf16.text_encoder.parameters(), pipe.text_encoder.parameters()):
        want = (theirs.numpy().view(np.uint32) >> 16 << 16).view(np.float32)  # bfloat16 truncation
        np.testing.assert_array_equal(ours.numpy(), want)
        assert ours.dtype == np.float32


def test_legacy_vae_attention_names_load(tmp_path, pipe):
    def rename(arrays, path):
        old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
        out = {}
        for key, value in arrays.items():
            if "mid_block.attentions" in key:
                for new, legacy in old.items():
                    key = key.replace(new, legacy)
                if value.ndim == 2:
                    value = value[:, :, None, None]  # the oldest files stored them as 1x1 convs
            out[key] = value
        safetensors.numpy.save_file(out, path)

    _write_converted(FOLDER, tmp_path / "legacy", rename)
    vae = pretrained.load_part(tmp_path / "legacy", "vae")
    for (name, ours), theirs in zip(vae.named_parameters(), pipe.vae.parameters()):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=name)


def test_our_name_table():
    assert pretrained.our_name("text_encoder", "text_model.encoder.layers.3.self_attn.out_proj.weight") == \
        "encoder.layers.3.self_attn.to_out.0.weight"
    assert pretrained.our_name("vae", "encoder.mid_block.attentions.0.query.bias") == \
        "encoder.mid_block.attentions.0.to_q.bias"
    assert pretrained.our_name("unet", "down_blocks.0.attentions.1.proj_in.weight") == \
        "down_blocks.0.attentions.1.proj_in.weight"


# ---- clear errors for folders that are not (complete) SD pipelines ----------------------------
def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        StableDiffusionPipeline.from_pretrained(tmp_path)
    shutil.copytree(FOLDER, tmp_path / "a")
    os.remove(tmp_path / "a" / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    (tmp_path / "a" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="unet.*never unpickles"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    shutil.copytree(FOLDER, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer/ folder is missing"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "b")
    shutil.copytree(FOLDER, tmp_path / "c")
    os.remove(tmp_path / "c" / "tokenizer" / "merges.txt")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "c")


def test_other_architectures_are_refused(tmp_path):
    shutil.copytree(FOLDER, tmp_path / "x")
    index = json.loads((tmp_path / "x" / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (tmp_path / "x" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "x")
    config = json.loads((tmp_path / "x" / "unet" / "config.json").read_text())
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        pretrained.unet_arguments({**config, "addition_embed_type": "text_time"})


def test_mismatched_weights_are_named(tmp_path):
    shutil.copytree(FOLDER, tmp_path / "m")
    path = tmp_path / "m" / "vae" / "diffusion_pytorch_model.fp16.safetensors"
    arrays = safetensors.numpy.load_file(path)
    arrays["decoder.conv_out.weight"] = arrays["decoder.conv_out.weight"][:2]
    del arrays["decoder.conv_in.bias"]
    arrays["decoder.extra.weight"] = np.zeros(3, np.float16)
    safetensors.numpy.save_file(arrays, path)
    with pytest.raises(ValueError, match=r"1 weights missing.*decoder.conv_in.bias.*1 unexpected.*decoder.extra"
                                         r".*decoder.conv_out.weight \(2, 8, 3, 3\) \(ours \(3, 8, 3, 3\)\)"):
        pretrained.load_part(tmp_path / "m", "vae")


# ---- the new pieces' gradients, float64 against finite differences ----------------------------
def _as64(module):
    return module.to(np.float64)


def _check_module(module, x):
    params = module.parameters()

    def fn(*args):
        for p, value in zip(params, args):
            p.data = value.data
        return module(args[-1])

    assert gradcheck(fn, params + [x], mode="directional")


def test_gradcheck_quick_gelu():
    from tinysd.models.clip import quick_gelu

    x = tinysd.randn(3, 5, dtype=np.float64, requires_grad=True)
    assert gradcheck(quick_gelu, [x], mode="full")


def test_gradcheck_right_bottom_padded_downsample():
    from tinysd.models.blocks import Downsample2D

    down = _as64(Downsample2D(3, 4, padding=0))
    x = tinysd.randn(2, 3, 6, 4, dtype=np.float64, requires_grad=True)
    assert down(x).shape == (2, 4, 3, 2)  # as with padding 1 on even sizes
    _check_module(down, x)


def test_gradcheck_conv_projection_transformer():
    from tinysd.models.blocks import Transformer2DModel

    block = _as64(Transformer2DModel(8, heads=2, dim_head=4, cross_attention_dim=None, groups=2,
                                     use_linear_projection=False))
    assert block.proj_in.weight.shape == (8, 8, 1, 1)
    _check_module(block, tinysd.randn(2, 8, 3, 2, dtype=np.float64, requires_grad=True))


def test_conv_and_linear_projections_agree():
    """use_linear_projection only changes how the same per-pixel map is stored."""
    from tinysd.models.blocks import Transformer2DModel

    conv = Transformer2DModel(8, 2, 4, groups=2, use_linear_projection=False)
    linear = Transformer2DModel(8, 2, 4, groups=2, use_linear_projection=True)
    for (name, a), b in zip(linear.named_parameters(), conv.parameters()):
        a.data = b.data.reshape(a.shape)
    x = tinysd.randn(2, 8, 3, 2)
    with no_grad():
        np.testing.assert_allclose(conv(x).numpy(), linear(x).numpy(), atol=1e-5)


def test_example_script(tmp_path, capsys):
    example = load_script("examples/stable_diffusion.py")
    out = tmp_path / "cat.png"
    example.main(["--model", FOLDER, "--prompt", "a cat", "--steps", "2", "--scheduler", "pndm", "--out", str(out)])
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    assert "3 steps" in capsys.readouterr().out  # PNDM redoes its first step: 2 steps are 3 UNet calls
    with pytest.raises(SystemExit, match="no model_index.json"):
        example.main(["--model", str(tmp_path), "--prompt", "a cat"])


def test_attention_in_slices_equals_one_call(monkeypatch):
    from tinysd.nn import modules

    attn = tinysd.nn.Attention(16, heads=4, dim_head=4)
    x, ctx = tinysd.randn(3, 20, 16), tinysd.randn(3, 7, 16)
    with no_grad():
        whole = attn(x, ctx).numpy()
        monkeypatch.setattr(modules, "ATTENTION_SLICE_BYTES", 20 * 7 * 4 * 5)  # 5 heads per slice: 3 slices
        calls, sdpa = [], modules.F.scaled_dot_product_attention
        monkeypatch.setattr(modules.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
        sliced = attn(x, ctx).numpy()
    assert len(calls) == 3
    np.testing.assert_allclose(sliced, whole, atol=1e-6)
