"""Text -> image: the Stable Diffusion sampling loop, with classifier-free guidance.

    pipe = TextToImage(vae, tokenizer, text_encoder, unet, scheduler)
    images = pipe(["a handwritten 7", "the digit three"], num_inference_steps=25, guidance_scale=3.0, seed=0)
    # images: NumPy (2, 1, 32, 32) in [0, 1]

The loop:
  1. encode the prompts with the text encoder (per-token features, (N, S, width)),
     and the unconditional prompt "" (or the negative prompt);
  2. start from pure noise latents x_T ~ N(0, init_noise_sigma^2 I);
  3. for each timestep t the scheduler picked: predict the noise for the conditional
     and the unconditional prompt in ONE batched UNet call, and combine them with
     classifier-free guidance (Ho & Salimans 2022),

         eps = eps_uncond + s * (eps_cond - eps_uncond)

     (s = 1: just the conditional prediction; s > 1 pushes further away from "any
     digit" toward "this prompt"), then let the scheduler take one step x_t -> x_t';
  4. decode the final latents with the VAE and map [-1, 1] to [0, 1].

`img2img` starts instead from an existing image noised part of the way (`strength`).
`StableDiffusionPipeline` (below) runs the same loop on a real Stable Diffusion 1.x/2.x folder
in diffusers' format, with diffusers' call signature.
Everything runs under no_grad, on the device of the UNet's parameters.

Build the scheduler with `clip_sample=False` (diffusers' DDPM/DDIM default, True,
clamps every x_0 estimate to [-1, 1], which suits pixels but distorts unit-variance
latents) and with the same beta schedule the UNet was trained with.
"""

import math
import os
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from . import backend, ops, pretrained, schedulers
from .clip_tokenizer import CLIPTokenizer
from .tensor import Tensor, no_grad


def _check_components(owner, **parts):
    missing = [name for name, part in parts.items() if part is None]
    if missing:
        raise TypeError(f"{owner}: {', '.join(missing)} must be given, got None")


def _check_prompts(prompts):
    """A str or a non-empty list of str, as a list."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"TextToImage: prompts must be a str or a list of str, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("TextToImage: no prompts given")
    return list(prompts)


class TextToImage:
    """vae (AutoencoderKL), tokenizer (tinysd.tokenizer.Tokenizer), text_encoder
    (CLIPTextModel), unet (UNet2DConditionModel), scheduler (DDPM, DDIM or Euler)."""

    def __init__(self, vae, tokenizer, text_encoder, unet, scheduler):
        _check_components(type(self).__name__, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
                          scheduler=scheduler)
        self.vae, self.tokenizer, self.text_encoder = vae, tokenizer, text_encoder
        self.unet, self.scheduler = unet, scheduler

    @property
    def device(self):
        return self.unet.conv_in.weight.device

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    # ---- the pieces ----------------------------------------------------------------------
    def encode_prompt(self, prompts):
        """list of N strings -> text features (N, S, width), a Tensor on the UNet's device."""
        hidden, _ = self.text_encoder(self.tokenizer(list(prompts)))
        return hidden.to(self.device).to(self.dtype)

    def guided_noise(self, latents, timestep, text_embeds, uncond_embeds=None, guidance_scale=1.0):
        """The noise prediction for `latents` (an array) at `timestep`, as an array.

        With uncond_embeds, one UNet call on the batch [latents; latents] with
        [uncond; text] features, combined as eps_u + guidance_scale * (eps_c - eps_u).
        """
        xp = backend.array_module(latents)
        model_input = latents if uncond_embeds is None else xp.concatenate([latents, latents])
        model_input = self.scheduler.scale_model_input(model_input, timestep)
        context = text_embeds if uncond_embeds is None else ops.cat([uncond_embeds, text_embeds])
        eps = self.unet(Tensor(model_input), timestep, encoder_hidden_states=context).data
        if uncond_embeds is None:
            return eps
        eps_uncond, eps_cond = eps[: len(latents)], eps[len(latents):]
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def decode_latents(self, latents):
        """Latents (array, scaled as the UNet sees them) -> images, NumPy (N, C, H, W) in [0, 1]."""
        with no_grad():
            x = self.vae.decode(Tensor(latents / self.vae.scaling_factor))
        return np.clip((x.numpy() + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)

    def _conditions(self, prompts, negative_prompt, guidance_scale):
        """Text features for the prompts, and for the unconditional/negative prompt when guiding."""
        prompts = _check_prompts(prompts)
        if not math.isfinite(guidance_scale):
            raise ValueError(f"TextToImage: guidance_scale must be a finite number, got {guidance_scale}")
        text_embeds = self.encode_prompt(prompts)
        if guidance_scale == 1.0:
            return prompts, text_embeds, None
        negative = negative_prompt if negative_prompt is not None else ""
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negative) != len(prompts):
            raise ValueError(f"TextToImage: {len(negative)} negative prompts for {len(prompts)} prompts")
        return prompts, text_embeds, self.encode_prompt(negative)

    def _denoise(self, latents, timesteps, text_embeds, uncond_embeds, guidance_scale, rng, callback, progress):
        """Steps 3 and 4 of every pipeline here (1. encode the prompt, 2. draw the starting noise come first)."""
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="denoising", leave=False)):
            # 3. iterative denoising: predict the noise (guided), let the scheduler remove a little of it
            eps = self.guided_noise(latents, t, text_embeds, uncond_embeds, guidance_scale)
            latents = self.scheduler.step(eps, t, latents, generator=rng).prev_sample
            if callback is not None:
                callback(i, t, latents, self.decode_latents)
        # 4. decode: latents -> pixels with the VAE's decoder
        return self.decode_latents(latents)

    def _to_device(self, array):
        return backend.to_device(np.asarray(array, dtype=self.dtype), self.device)

    # ---- entry points --------------------------------------------------------------------
    def __call__(self, prompts, num_inference_steps=25, guidance_scale=3.0, negative_prompt=None, seed=None,
                 callback=None, progress=True, height=32, width=32):
        """Generate one image per prompt: NumPy (N, C, height, width) in [0, 1].

        callback(step, timestep, latents, decode_fn) is called after every step;
        decode_fn(latents) turns the intermediate latents into images (to animate denoising).
        seed: an int for reproducible noise (None: fresh noise).
        """
        f = self.vae.downscale_factor
        if height % f or width % f:
            raise ValueError(f"TextToImage: height {height} and width {width} must be multiples of {f}")
        with no_grad():
            # 1. encode the prompt (and the negative one, for classifier-free guidance)
            prompts, text_embeds, uncond_embeds = self._conditions(prompts, negative_prompt, guidance_scale)
            # 2. the starting noise, scaled for the scheduler, and its timesteps
            rng = np.random.default_rng(seed)
            shape = (len(prompts), self.unet.in_channels, height // f, width // f)
            self.scheduler.set_timesteps(num_inference_steps)
            latents = self._to_device(rng.standard_normal(shape) * self.scheduler.init_noise_sigma)
            # 3.-4. denoise, decode
            return self._denoise(latents, self.scheduler.timesteps, text_embeds, uncond_embeds, guidance_scale,
                                 rng, callback, progress)

    def img2img(self, images, prompts, strength=0.6, num_inference_steps=25, guidance_scale=3.0,
                negative_prompt=None, seed=None, callback=None, progress=True):
        """Redraw `images` (N, C, H, W) in [0, 1] toward `prompts`: NumPy (N, C, H, W) in [0, 1].

        The images are encoded, noised to the timestep a fraction `strength` of the way
        along the schedule (0: unchanged, 1: pure noise, like text-to-image), and denoised
        from there: only the last strength * num_inference_steps steps run.
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"TextToImage.img2img: strength must be in [0, 1], got {strength}")
        images = images.numpy() if isinstance(images, Tensor) else np.asarray(images)
        with no_grad():
            prompts, text_embeds, uncond_embeds = self._conditions(prompts, negative_prompt, guidance_scale)
            if len(images) != len(prompts):
                raise ValueError(f"TextToImage.img2img: {len(images)} images for {len(prompts)} prompts")
            rng = np.random.default_rng(seed)
            x = Tensor(self._to_device(images * 2.0 - 1.0))
            latents = self.vae.encode(x).mode().data * self.vae.scaling_factor
            self.scheduler.set_timesteps(num_inference_steps)
            steps = min(int(round(num_inference_steps * strength)), num_inference_steps)
            timesteps = self.scheduler.timesteps[num_inference_steps - steps:]
            if steps == 0:
                return self.decode_latents(latents)
            noise = self._to_device(rng.standard_normal(latents.shape))
            latents = self.scheduler.add_noise(latents, noise, np.full(len(latents), timesteps[0]))
            return self._denoise(latents, timesteps, text_embeds, uncond_embeds, guidance_scale,
                                 rng, callback, progress)


# ---- Stable Diffusion 1.x / 2.x from a diffusers folder ------------------------------------------
SCHEDULERS = {
    cls.__name__: cls for cls in (schedulers.PNDMScheduler, schedulers.DDIMScheduler, schedulers.DDPMScheduler,
                                  schedulers.EulerDiscreteScheduler, schedulers.DPMSolverMultistepScheduler)
}
# the part folders model_index.json must list, with the class each must be
PARTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
         "tokenizer": "CLIPTokenizer", "scheduler": None}


@dataclass
class StableDiffusionOutput:
    """images: a list of PIL images, or an (N, H, W, 3) float32 array in [0, 1] (output_type="np")."""

    images: object


class StableDiffusionPipeline(TextToImage):
    """Text -> image with a Stable Diffusion 1.x/2.x checkpoint, shaped like diffusers' pipeline:

        pipe = StableDiffusionPipeline.from_pretrained("path/to/stable-diffusion-v1-5")
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)   # optional
        image = pipe("a photo of an astronaut riding a horse", num_inference_steps=25, seed=0).images[0]

    The loop is TextToImage's; this class adds reading the folder, diffusers' arguments
    (num_images_per_prompt, latents, output_type) and images as (H, W, 3).
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, sample_size=64):
        super().__init__(vae, tokenizer, text_encoder, unet, scheduler)
        self.default_size = sample_size * vae.downscale_factor  # the UNet's training size in pixels

    @classmethod
    def from_pretrained(cls, folder, dtype=np.float32, variant=None):
        """Read a diffusers-format folder (see tinysd.pretrained). Nothing is downloaded:
        `folder` is a local path, e.g. what `huggingface-cli download` wrote."""
        folder = os.fspath(folder)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(
                f"{folder}: no model_index.json; give the folder of a diffusers-format Stable Diffusion pipeline "
                "(e.g. downloaded with `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 "
                "--local-dir FOLDER`)"
            )
        index = pretrained.read_json(index_path)
        if index.get("_class_name") not in ("StableDiffusionPipeline", None):
            raise ValueError(f"{folder}: model_index.json says {index.get('_class_name')}, not StableDiffusionPipeline")
        for part, expected in PARTS.items():
            listed = index.get(part)
            if not listed or listed[1] is None:
                raise ValueError(f"{folder}: model_index.json lists no {part}")
            if expected and listed[1] != expected:
                raise ValueError(f"{folder}: {part} is a {listed[1]}; tinysd reads {expected}")
            if not os.path.isdir(os.path.join(folder, part)):
                raise FileNotFoundError(f"{folder}: the {part}/ folder is missing")
        scheduler_name = index["scheduler"][1]
        if scheduler_name not in SCHEDULERS:
            raise ValueError(f"{folder}: scheduler {scheduler_name} is not one of {sorted(SCHEDULERS)}")
        scheduler_config = os.path.join(folder, "scheduler", "scheduler_config.json")
        if not os.path.isfile(scheduler_config):
            raise FileNotFoundError(f"{folder}: missing scheduler/scheduler_config.json")
        parts = {part: pretrained.load_part(folder, part, dtype, variant) for part in ("unet", "vae", "text_encoder")}
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
        scheduler = SCHEDULERS[scheduler_name].from_config(scheduler_config)
        sample_size = pretrained.read_json(os.path.join(folder, "unet", "config.json")).get("sample_size", 64)
        return cls(parts["vae"], parts["text_encoder"], tokenizer, parts["unet"], scheduler, sample_size)

    def to(self, device):
        """Move the three models to "cpu" or "cuda"; returns the pipeline."""
        for model in (self.unet, self.vae, self.text_encoder):
            model.to(device)
        return self

    def encode_prompt(self, prompts):
        """Prompts -> the text encoder's last hidden states (N, 77, width), on the UNet's device."""
        ids = self.tokenizer(list(prompts))
        hidden, _ = self.text_encoder(backend.to_device(ids, self.text_encoder.final_layer_norm.weight.device))
        return hidden.to(self.device).to(self.dtype)

    def __call__(self, prompt, height=None, width=None, num_inference_steps=50, guidance_scale=7.5,
                 negative_prompt=None, num_images_per_prompt=1, generator=None, seed=None, latents=None,
                 output_type="pil", callback=None, progress=True):
        """Draw num_images_per_prompt images per prompt; returns StableDiffusionOutput(images).

        height, width: multiples of 8 (default: the UNet's training size, 512 for SD 1.5).
        generator (a numpy.random.Generator) or seed (an int) draws the starting noise;
        latents (N, 4, height/8, width/8) gives it instead, as in diffusers: the pipeline
        multiplies it by the scheduler's init_noise_sigma. guidance_scale > 1 runs
        classifier-free guidance against negative_prompt ("" when None).
        callback(step, timestep, latents, decode_fn) after every step.
        """
        if output_type not in ("pil", "np"):
            raise ValueError(f"StableDiffusionPipeline: output_type must be 'pil' or 'np', got {output_type!r}")
        f = self.vae.downscale_factor
        height, width = height or self.default_size, width or self.default_size
        if height % f or width % f:
            raise ValueError(f"StableDiffusionPipeline: height {height} and width {width} must be multiples of {f}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            negative_prompt = [n for n in negative_prompt for _ in range(num_images_per_prompt)]
        shape = (len(prompts), self.unet.in_channels, height // f, width // f)
        rng = generator if generator is not None else np.random.default_rng(seed)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)
        else:
            latents = latents.numpy() if isinstance(latents, Tensor) else backend.to_device(latents, "cpu")
            if tuple(latents.shape) != shape:
                raise ValueError(f"StableDiffusionPipeline: latents {tuple(latents.shape)}, expected {shape}")
        with no_grad():
            prompts, text_embeds, uncond_embeds = self._conditions(
                prompts, negative_prompt, guidance_scale if guidance_scale > 1.0 else 1.0)
            self.scheduler.set_timesteps(num_inference_steps)
            latents = self._to_device(np.asarray(latents, dtype=np.float32) * self.scheduler.init_noise_sigma)
            images = self._denoise(latents, self.scheduler.timesteps, text_embeds, uncond_embeds, guidance_scale,
                                   rng, callback, progress)
        images = images.transpose(0, 2, 3, 1)  # (N, H, W, 3)
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]
        return StableDiffusionOutput(images=images)
