"""Inputs: what a careless user can pass gets a clear error naming the op (or the right result),
never a traceback from deep inside NumPy or Numba; the main job checks every flag before training."""

import math
from pathlib import Path

import numpy as np
import pytest

import tinysd
import tinysd.nn.functional as F
from tinysd import nn
from tinysd.models import AutoencoderKL, UNet2DConditionModel
from tinysd.pipeline import TextToImage
from tinysd.schedulers import DDIMScheduler, DDPMScheduler
from tinysd.tokenizer import Tokenizer
from helpers import load_script

ROOT = Path(__file__).resolve().parent.parent


def half(*shape):
    return tinysd.randn(*shape).to(np.float16)


@pytest.mark.parametrize("name, call", [
    ("Conv2d", lambda: F.conv2d(half(1, 2, 5, 5), half(3, 2, 3, 3))),
    ("Softmax", lambda: half(2, 3).softmax(-1)),
    ("LogSoftmax", lambda: F.cross_entropy(half(2, 3), tinysd.tensor(np.array([0, 1])))),
    ("GroupNorm", lambda: F.group_norm(half(2, 4, 3, 3), 2)),
    ("LayerNorm", lambda: F.layer_norm(half(2, 4), (4,))),
    ("Attention", lambda: F.scaled_dot_product_attention(half(1, 2, 3, 4), half(1, 2, 3, 4), half(1, 2, 3, 4))),
    ("SiLU", lambda: F.silu(half(2, 3))),
    ("AvgPool2d", lambda: F.avg_pool2d(half(1, 2, 4, 4), 2)),
])
def test_float16_into_a_kernel_is_refused_naming_the_op(name, call):
    with pytest.raises(TypeError, match=rf"{name}: its kernels run in float32 or float64, got float16"):
        call()


def test_an_empty_batch_goes_through_group_norm_and_the_models_as_in_pytorch():
    norm = nn.GroupNorm(2, 4)
    x = tinysd.randn(0, 4, 3, 3, requires_grad=True)
    y = norm(x)
    assert y.shape == (0, 4, 3, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 4, 3, 3) and np.array_equal(norm.weight.grad.numpy(), np.zeros(4, np.float32))
    unet = UNet2DConditionModel(cross_attention_dim=32)
    out = unet(tinysd.randn(0, 4, 8, 8), tinysd.tensor(np.zeros(0, np.int64)), tinysd.randn(0, 5, 32))
    assert out.shape == (0, 4, 8, 8)
    vae = AutoencoderKL()
    assert vae.decode(vae.encode(tinysd.randn(0, 1, 32, 32)).mode()).shape == (0, 1, 32, 32)


@pytest.mark.parametrize("state", ["model.safetensors", None, 3])
def test_load_state_dict_wants_a_dict(state):
    with pytest.raises(TypeError, match=r"load_state_dict: expected a dict of name -> Tensor or array"):
        nn.Linear(3, 2).load_state_dict(state)


@pytest.mark.parametrize("texts, got", [(None, "NoneType"), (3, "int"), ([None], r"a list holding \['NoneType'\]")])
def test_the_tokenizer_wants_text(texts, got):
    with pytest.raises(TypeError, match=rf"Tokenizer: expected a str or a list of str, got {got}"):
        Tokenizer()(texts)


def test_the_pipeline_wants_every_part_and_text_prompts():
    tok = Tokenizer()
    with pytest.raises(TypeError, match=r"TextToImage: vae, text_encoder must be given, got None"):
        TextToImage(None, tok, None, UNet2DConditionModel(cross_attention_dim=32), DDIMScheduler())
    pipe = TextToImage.__new__(TextToImage)  # only the prompt checks run before any model is used
    with pytest.raises(TypeError, match=r"TextToImage: prompts must be a str or a list of str, got NoneType"):
        pipe._conditions(None, None, 3.0)
    with pytest.raises(ValueError, match="TextToImage: no prompts given"):
        pipe._conditions([], None, 3.0)


@pytest.mark.parametrize("scheduler", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("steps", [2.5, "5", True, None])
def test_set_timesteps_wants_an_int(scheduler, steps):
    with pytest.raises(TypeError, match=r"set_timesteps: num_inference_steps must be an int"):
        scheduler().set_timesteps(steps)


def test_set_timesteps_accepts_numpy_ints():
    s = DDIMScheduler()
    s.set_timesteps(np.int64(5))
    assert len(s.timesteps) == 5


# ---- the main job's command line: refused before any data is loaded or any stage trained -----------
@pytest.fixture(scope="module")
def example():
    return load_script("examples/mnist_digits.py")


@pytest.mark.parametrize("flags, message", [
    (["--samples-per-digit", "0"], "--samples-per-digit: 0 is out of range: expected 1..any"),
    (["--steps", "0"], "out of range: expected 1..1000"),
    (["--steps", "1001"], "out of range: expected 1..1000"),
    (["--steps", "2.5"], "'2.5' is not an integer"),
    (["--seed", "-1"], "out of range: expected 0..4294967295"),
    (["--guidance", "nan"], "nan must be a finite number >= 0.0"),
    (["--guidance", "inf"], "inf must be a finite number >= 0.0"),
    (["--guidance", "-1"], "-1 must be a finite number >= 0.0"),
    (["--perceptual-weight", "nan"], "nan must be a finite number >= 0.0"),
    (["--threads", "0"], "out of range: expected 1..1024"),
    (["--ranks", "0"], "--ranks: 0 is out of range: expected 1..1024"),
    (["--prompt", ""], "an empty prompt"),
    (["--retrain", "everything"], "invalid choice"),
])
def test_bad_flags_are_refused_up_front(example, flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args([*flags, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_out_must_be_a_writable_folder(example, capsys, tmp_path):
    (tmp_path / "a_file").write_text("x")
    for out, message in [(tmp_path / "a_file", "exists and is not a folder"),
                         (tmp_path / "a_file" / "sub", "cannot write into")]:
        with pytest.raises(SystemExit):
            example.parse_args(["--out", str(out)])
        assert message in capsys.readouterr().err


def test_good_flags_pass(example, tmp_path):
    args = example.parse_args(["--out", str(tmp_path / "new"), "--steps", "1000", "--seed", "0", "--guidance", "0",
                               "--threads", "1", "--samples-per-digit", "1"])
    assert args.steps == 1000 and math.isfinite(args.guidance) and (tmp_path / "new").is_dir()
    assert list((tmp_path / "new").iterdir()) == []  # the write test leaves nothing behind
