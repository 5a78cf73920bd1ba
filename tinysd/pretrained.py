"""Read a diffusers-format Stable Diffusion folder into tinysd's own models.

A folder made by `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5`
(or `StableDiffusionPipeline.save_pretrained`) holds:

    model_index.json                 which class each part is
    unet/         config.json + diffusion_pytorch_model[.fp16].safetensors
    vae/          config.json + diffusion_pytorch_model[.fp16].safetensors
    text_encoder/ config.json + model[.fp16].safetensors         (transformers' CLIPTextModel)
    tokenizer/    vocab.json + merges.txt (+ tokenizer_config.json)
    scheduler/    scheduler_config.json

Two tables do the work: each part's config.json -> the arguments of our constructor
(`*_arguments`), and their weight names -> ours (`RENAMES`). Our layer names already follow
diffusers, so the UNet needs no renaming at all. Weights are read one tensor at a time
(safetensors' safe_open) and copied into the model built from the config, so loading
needs about the weights' float32 size once, plus the largest tensor. float32, float16 and
bfloat16 files all load, into float32 (or the dtype asked for). Nothing is downloaded and
no pickle (.bin/.ckpt) is ever opened.
"""

import json
import os

import numpy as np
from safetensors import safe_open

from . import io
from .models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel

# ---- their weight names -> ours ----------------------------------------------------------
# (their text, our text) substitutions, applied in order to every key of the file.
RENAMES = {
    "unet": [],  # our UNet's names are diffusers' own
    "vae": [  # older VAE files name the mid-block attention's projections differently
        (".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0."),
    ],
    "text_encoder": [  # transformers' CLIPTextModel
        ("text_model.", ""), (".q_proj.", ".to_q."), (".k_proj.", ".to_k."), (".v_proj.", ".to_v."),
        (".out_proj.", ".to_out.0."),
    ],
}
# keys in the files that hold nothing we need (a constant buffer, the unused CLIP projection)
IGNORED = {"text_encoder": ("text_model.embeddings.position_ids", "text_projection.weight")}

WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def our_name(part, key):
    """The tinysd parameter name of weight `key` in the `part` folder's file."""
    for theirs, ours in RENAMES[part]:
        key = key.replace(theirs, ours)
    return key


# ---- their configs -> our constructors -------------------------------------------------------
def _require(where, config, expected):
    """Every option in `expected` must hold its value (or be absent): we build nothing else."""
    for key, value in expected.items():
        if key in config and config[key] != value and not (value is None and config[key] in (None, False)):
            raise ValueError(
                f"{where}: {key}={config[key]!r} is not supported; tinysd builds Stable Diffusion 1.x/2.x "
                f"models, which have {key}={value!r}"
            )


UNET_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None,
    "num_class_embeds": None, "time_cond_proj_dim": None, "encoder_hid_dim": None, "only_cross_attention": False,
    "dual_cross_attention": False, "resnet_time_scale_shift": "default", "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_padding": 1, "mid_block_scale_factor": 1, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "time_embedding_type": "positional", "time_embedding_dim": None, "attention_type": "default",
    "cross_attention_norm": None, "resnet_out_scale_factor": 1.0, "transformer_layers_per_block": 1,
}


def unet_arguments(config):
    """unet/config.json -> UNet2DConditionModel(**arguments)."""
    where = "unet/config.json"
    _require(where, config, UNET_FIXED)
    down, up = config["down_block_types"], config["up_block_types"]
    attention = [t.startswith("CrossAttn") for t in down]
    if [t.startswith("CrossAttn") for t in reversed(up)] != attention:
        raise ValueError(f"{where}: up_block_types {up} must mirror down_block_types {down}")
    # diffusers' quirk: SD's "attention_head_dim" is the number of heads when num_attention_heads is unset
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    return dict(
        in_channels=config["in_channels"], out_channels=config["out_channels"],
        block_out_channels=tuple(config["block_out_channels"]), layers_per_block=config["layers_per_block"],
        cross_attention_dim=config["cross_attention_dim"], norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5), attention_levels=tuple(attention),
        num_attention_heads=heads if isinstance(heads, int) else tuple(heads),
        use_linear_projection=config.get("use_linear_projection", False),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True), freq_shift=config.get("freq_shift", 0),
        ff_mult=4, gated_ff=True, zero_init_out=False,
    )


def vae_arguments(config):
    """vae/config.json -> AutoencoderKL(**arguments)."""
    where = "vae/config.json"
    _require(where, config, {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                             "shift_factor": None, "latents_mean": None, "latents_std": None})
    levels = len(config["block_out_channels"])
    if list(config.get("down_block_types", ["DownEncoderBlock2D"] * levels)) != ["DownEncoderBlock2D"] * levels or \
            list(config.get("up_block_types", ["UpDecoderBlock2D"] * levels)) != ["UpDecoderBlock2D"] * levels:
        raise ValueError(f"{where}: only DownEncoderBlock2D / UpDecoderBlock2D levels are supported")
    return dict(
        in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
        block_out_channels=tuple(config["block_out_channels"]), layers_per_block=config.get("layers_per_block", 2),
        latent_channels=config.get("latent_channels", 4), norm_num_groups=config.get("norm_num_groups", 32),
        mid_block_attention=config.get("mid_block_add_attention", True),
        scaling_factor=config.get("scaling_factor", 0.18215), downsample_padding=0,
    )


def text_encoder_arguments(config):
    """text_encoder/config.json (transformers' CLIPTextConfig) -> CLIPTextModel(**arguments)."""
    _require("text_encoder/config.json", config, {"hidden_act": config.get("hidden_act", "quick_gelu")})
    if config.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
        raise ValueError(f"text_encoder/config.json: hidden_act {config['hidden_act']!r} is not supported")
    vocab_size = config["vocab_size"]
    eos = config.get("eos_token_id", 2)
    # transformers' legacy rule for eos_token_id 2 (SD's configs): pool at the LARGEST id of
    # each row, which is EOS (the last entry of CLIP's vocabulary)
    eos = vocab_size - 1 if eos == 2 else eos
    return dict(
        vocab_size=vocab_size, context_length=config.get("max_position_embeddings", 77),
        width=config["hidden_size"], layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
        intermediate_size=config.get("intermediate_size"), hidden_act=config.get("hidden_act", "quick_gelu"),
        layer_norm_eps=config.get("layer_norm_eps", 1e-5), projection_dim=None, eos_token_id=eos,
    )


BUILDERS = {
    "unet": (UNet2DConditionModel, unet_arguments),
    "vae": (AutoencoderKL, vae_arguments),
    "text_encoder": (CLIPTextModel, text_encoder_arguments),
}


# ---- files ----------------------------------------------------------------------------------
def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def weights_path(folder, part, variant=None):
    """The safetensors file of `part`: the plain name first, then the ".fp16" variant
    (or only `variant` when given). A clear error when there is none."""
    base = WEIGHT_FILES[part]
    names = [f"{base}.{variant}.safetensors"] if variant else [f"{base}.safetensors", f"{base}.fp16.safetensors"]
    for name in names:
        path = os.path.join(folder, part, name)
        if os.path.isfile(path):
            return path
    present = sorted(os.listdir(os.path.join(folder, part))) if os.path.isdir(os.path.join(folder, part)) else []
    hint = ""
    if any(n.endswith((".bin", ".ckpt", ".pt")) for n in present):
        hint = " (only PyTorch pickle files are there: tinysd never unpickles; download the .safetensors files)"
    elif any(n.endswith(".index.json") for n in present):
        hint = " (sharded files are not supported)"
    raise FileNotFoundError(f"{os.path.join(folder, part)}: no {' or '.join(names)} (found {present}){hint}")


def _read_bf16(path, name):
    """A bfloat16 tensor as float32 (NumPy has no bfloat16): its 16 bits are the top half of a float32."""
    header, data_start = io.read_header(path)
    info = header[name]
    begin, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        bits = np.frombuffer(f.read(end - begin), dtype="<u2")
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


REOPEN_BYTES = 64 * 2**20


def read_tensors(path):
    """Yield (name, float array) for every tensor of a safetensors file, one at a time.

    safe_open maps the file into memory, and every page read stays counted in the process's
    resident memory until the file is closed: reopening it every REOPEN_BYTES keeps what
    loading holds at about the model's own size."""
    with safe_open(path, framework="numpy") as f:
        keys = list(f.keys())
    done, f = 0, None
    try:
        for key in keys:
            if f is None:
                f = safe_open(path, framework="numpy").__enter__()
            if f.get_slice(key).get_dtype() == "BF16":
                value = _read_bf16(path, key)
            else:
                value = f.get_tensor(key)
            done += value.nbytes
            yield key, value
            if done >= REOPEN_BYTES:  # (after the caller has copied the value)
                f.__exit__(None, None, None)
                f, done = None, 0
    finally:
        if f is not None:
            f.__exit__(None, None, None)


def load_weights(model, path, part, dtype=np.float32):
    """Copy every tensor of the safetensors file at `path` into `model`, one at a time, renamed
    by RENAMES[part]. Errors name missing, unexpected and mis-shaped weights."""
    params = dict(model.state_dict())
    seen, unexpected, wrong = set(), [], []
    for key, value in read_tensors(path):
        if key in IGNORED.get(part, ()):
            continue
        name = our_name(part, key)
        target = params.get(name)
        if target is None:
            unexpected.append(key)
            continue
        if value.ndim == 4 and target.ndim == 2 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # old VAE attention projections stored as 1x1 convs
        seen.add(name)
        if tuple(value.shape) != tuple(target.shape):
            wrong.append(f"{key} {tuple(value.shape)} (ours {tuple(target.shape)})")
            continue
        target.data[...] = value  # in place, cast to the model's dtype
    missing = [name for name in params if name not in seen]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[:3]})")
    if wrong:
        problems.append(f"{len(wrong)} with other shapes (e.g. {wrong[:3]})")
    if problems:
        raise ValueError(f"{path}: does not match the model built from its config.json: " + "; ".join(problems))
    if np.dtype(dtype) != np.float32:
        model.to(np.dtype(dtype))
    return model


def load_part(folder, part, dtype=np.float32, variant=None):
    """Build `part` ("unet", "vae" or "text_encoder") of the pipeline folder from its config.json
    and load its weights."""
    config_path = os.path.join(folder, part, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder}: missing {part}/config.json (is this a diffusers Stable Diffusion folder?)")
    path = weights_path(folder, part, variant)
    cls, arguments = BUILDERS[part]
    model = cls(**arguments(read_json(config_path)))
    return load_weights(model, path, part, dtype).eval()
