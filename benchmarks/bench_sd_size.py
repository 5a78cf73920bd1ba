"""Stable Diffusion 1.5 at full size, random weights: tinysd against diffusers (memory and time).

    python benchmarks/bench_sd_size.py build  --folder /tmp/sd15_random   # diffusers makes the weights
    python benchmarks/bench_sd_size.py memory --folder /tmp/sd15_random --library tinysd
    python benchmarks/bench_sd_size.py memory --folder /tmp/sd15_random --library diffusers
    python benchmarks/bench_sd_size.py time   --folder /tmp/sd15_random --rounds 2

`build` creates SD 1.5's UNet and VAE from their configs (random weights: the shapes are what
cost) and saves them as float32 safetensors. `memory` (one library per process, so peaks are
its own) reports the peak resident memory while loading, during one guided UNet step
(batch 2 x 4 x 64 x 64, text 2 x 77 x 768) and during a VAE decode to 512 x 512, each as the
rise of the process's peak RSS (VmHWM, reset before each phase). `time` loads both libraries
in one process and alternates them, reporting medians (the machine may be shared).
Needs torch and diffusers; the library never imports them.
"""

import argparse
import json
import os
import sys
import time

# tinysd asks OpenMP to let idle threads sleep (tinysd/__init__.py, when imported first); torch shares that OpenMP
# runtime, which reads the setting once, when torch is imported first. Without this line tinysd's
# parallel kernels would spin under torch's default (a 512 x 512 SD VAE decode: 23 s instead of 14.5 s);
# torch itself ran 0-9% slower with it at SD size. OMP_WAIT_POLICY=ACTIVE in the environment overrides it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as tinysd/__init__.py sets it when imported before NumPy

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "norm_eps": 1e-5, "norm_num_groups": 32,
    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "center_input_sample": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1,
}
VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512, "act_fn": "silu",
}


def peak_rss_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB -> GB
    raise RuntimeError(field)


class Phase:
    """Peak RSS above the RSS at entry, and wall time, of a `with` block."""

    def __init__(self, name, report):
        self.name, self.report = name, report

    def __enter__(self):
        peak_rss_reset()
        self.base, self.start = rss("VmRSS"), time.perf_counter()

    def __exit__(self, *exc):
        self.report[self.name] = {"seconds": round(time.perf_counter() - self.start, 2),
                                  "peak_gb_above_start": round(rss("VmHWM") - self.base, 3),
                                  "rss_after_gb": round(rss("VmRSS"), 3)}
        print(self.name, self.report[self.name], flush=True)


def inputs():
    g = np.random.default_rng(0)
    return (g.standard_normal((2, 4, 64, 64)).astype(np.float32), g.standard_normal((2, 77, 768)).astype(np.float32),
            g.standard_normal((1, 4, 64, 64)).astype(np.float32))


def build(folder):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    for name, cls, config in (("unet", UNet2DConditionModel, UNET_CONFIG), ("vae", AutoencoderKL, VAE_CONFIG)):
        model = cls(**config)
        model.save_pretrained(os.path.join(folder, name), safe_serialization=True)
        print(name, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")
        del model


def load_ours(folder, report):
    from tinysd import pretrained

    with Phase("load_unet", report):
        unet = pretrained.load_part(folder, "unet")
    with Phase("load_vae", report):
        vae = pretrained.load_part(folder, "vae")
    return unet, vae


def load_diffusers(folder, report):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with Phase("load_unet", report):
        unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=torch.float32).eval()
    with Phase("load_vae", report):
        vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), torch_dtype=torch.float32).eval()
    return unet, vae


def ours_step(unet, vae):
    from tinysd import Tensor, no_grad

    sample, text, latents = inputs()

    def unet_step():
        with no_grad():
            return unet(Tensor(sample), 500, encoder_hidden_states=Tensor(text)).numpy()

    def decode():
        with no_grad():
            return vae.decode(Tensor(latents)).numpy()

    return unet_step, decode


def diffusers_step(unet, vae):
    import torch

    sample, text, latents = inputs()

    def unet_step():
        with torch.no_grad():
            return unet(torch.from_numpy(sample), 500, encoder_hidden_states=torch.from_numpy(text)).sample.numpy()

    def decode():
        with torch.no_grad():
            return vae.decode(torch.from_numpy(latents)).sample.numpy()

    return unet_step, decode


def memory(folder, library, threads):
    report = {"library": library}
    if library == "tinysd":
        import tinysd

        tinysd.set_num_threads(threads)
        unet, vae = load_ours(folder, report)
        unet_step, decode = ours_step(unet, vae)
    else:
        import torch

        torch.set_num_threads(threads)
        unet, vae = load_diffusers(folder, report)
        unet_step, decode = diffusers_step(unet, vae)
    weights = sum(os.path.getsize(os.path.join(folder, p, "diffusion_pytorch_model.safetensors")) for p in ("unet", "vae"))
    report["weights_gb"] = round(weights / 2**30, 3)
    with Phase("unet_step_batch2_64x64", report):
        unet_step()
    with Phase("vae_decode_512", report):
        decode()
    print(json.dumps(report))


def timing(folder, rounds, threads):
    import torch

    import tinysd

    torch.set_num_threads(threads)
    tinysd.set_num_threads(threads)
    ours, theirs = ours_step(*load_ours(folder, {})), diffusers_step(*load_diffusers(folder, {}))
    times = {k: [] for k in ("ours_unet", "diffusers_unet", "ours_decode", "diffusers_decode")}
    for round_ in range(rounds):
        outputs = {}
        for key, fn in (("ours_unet", ours[0]), ("diffusers_unet", theirs[0]), ("ours_decode", ours[1]),
                        ("diffusers_decode", theirs[1])):
            start = time.perf_counter()
            outputs[key] = fn()
            times[key].append(time.perf_counter() - start)
            print(key, round(times[key][-1], 2), flush=True)
        if round_ == 0:  # the same numbers?
            for what in ("unet", "decode"):
                a, b = outputs[f"ours_{what}"], outputs[f"diffusers_{what}"]
                print(f"{what}: max |ours - diffusers| = {float(np.abs(a - b).max()):.3g} "
                      f"of max |diffusers| = {float(np.abs(b).max()):.3g}", flush=True)
    medians = {k: round(float(np.median(v)), 2) for k, v in times.items()}
    medians["unet_ratio"] = round(medians["ours_unet"] / medians["diffusers_unet"], 2)
    medians["decode_ratio"] = round(medians["ours_decode"] / medians["diffusers_decode"], 2)
    print(json.dumps(medians))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["build", "memory", "time"])
    p.add_argument("--folder", default="/tmp/sd15_random")
    p.add_argument("--library", choices=["tinysd", "diffusers"], default="tinysd")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.what == "build":
        build(args.folder)
    elif args.what == "memory":
        memory(args.folder, args.library, args.threads)
    else:
        timing(args.folder, args.rounds, args.threads)


if __name__ == "__main__":
    main()
