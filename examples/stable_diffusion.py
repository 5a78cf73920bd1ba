"""Draw an image with a real Stable Diffusion 1.x/2.x checkpoint, on tinysd alone.

Download the weights yourself (nothing downloads at run time), e.g.

    huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir sd15 \\
        --include "model_index.json" "*/config.json" "scheduler/*" "tokenizer/*" \\
        "unet/diffusion_pytorch_model.safetensors" "vae/diffusion_pytorch_model.safetensors" \\
        "text_encoder/model.safetensors"

then

    python examples/stable_diffusion.py --model sd15 --prompt "a photo of an astronaut riding a horse"

Same arguments and samplers as diffusers' StableDiffusionPipeline: with the same initial
noise (--latents FILE.npy) tinysd and diffusers draw the same picture.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tinysd  # noqa: E402  (first: it sets OpenBLAS's thread timeout before NumPy loads OpenBLAS)
import numpy as np  # noqa: E402
from tinysd import schedulers  # noqa: E402
from tinysd.io import atomic_write  # noqa: E402

SAMPLERS = {"pndm": schedulers.PNDMScheduler, "ddim": schedulers.DDIMScheduler,
            "euler": schedulers.EulerDiscreteScheduler, "dpm": schedulers.DPMSolverMultistepScheduler}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a diffusers-format Stable Diffusion folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", choices=sorted(SAMPLERS), default="dpm",
                   help="sampler (default dpm: DPM-Solver++ 2M, good at 20-25 steps); the folder's own is usually pndm")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="height and width in pixels (default: the model's, 512)")
    p.add_argument("--latents", default=None, help="a .npy file of initial noise (1, 4, size/8, size/8)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the kernels")
    p.add_argument("--out", default="image.png")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        tinysd.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        pipe = tinysd.StableDiffusionPipeline.from_pretrained(args.model)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"stable_diffusion.py: cannot load {args.model}: {err}")
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s")
    pipe.scheduler = SAMPLERS[args.scheduler].from_config(pipe.scheduler.config)
    if args.device != "cpu":
        pipe.to(args.device)
    latents = np.load(args.latents) if args.latents else None

    step_times = []
    last = [time.perf_counter()]

    def on_step(i, t, latents, decode):
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    start = last[0] = time.perf_counter()
    out = pipe(args.prompt, negative_prompt=args.negative_prompt, height=args.size, width=args.size,
               num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, latents=latents,
               output_type="pil", callback=on_step)
    total = time.perf_counter() - start
    image = out.images[0]
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(args.out, buffer.getvalue())
    print(f"{len(step_times)} steps, median {np.median(step_times):.2f} s per step (UNet x2 for guidance), "
          f"{total:.1f} s in all with the text encoder and the VAE decode; wrote {args.out}")


if __name__ == "__main__":
    main()
