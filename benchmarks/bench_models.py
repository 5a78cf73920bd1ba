"""Whole-model benchmarks: a training step of each model of the main job, and the UNet's
sampling forward, in tinysd and in PyTorch with the same architecture and the same weights.

    python benchmarks/bench_models.py                     # table + bench_models_cpu.json
    python benchmarks/bench_models.py --threads 1 --clock cpu  # one thread, CPU time (busy machine)
    python benchmarks/bench_models.py --quick --no-memory # tiny batches: a smoke run, not a measurement

Rows (configurations and batch sizes of examples/mnist_digits.py):

    classifier  DigitClassifier, batch 128 of 1x32x32, cross-entropy
    vae         AutoencoderKL, batch 32 of 1x32x32, MSE + 1e-4 KL (posterior sampled)
    clip        CLIPModel, batch 256 (captions of 16 tokens + images), contrastive loss, grad clip 1.0
    unet        UNet2DConditionModel, batch 128 of 4x8x8 latents, 16x64 text states, MSE, grad clip 1.0
    unet sample the same UNet, forward only under no_grad, batch 500 (250 prompts, doubled by
                classifier-free guidance), as TextToImage runs it

A training step is: forward, loss, zero_grad, backward, (clip), AdamW step, with each
stage's lr and weight decay. PyTorch runs diffusers' UNet2DConditionModel and
AutoencoderKL configured to the same architecture, and plain torch modules for the
classifier and CLIP; our weights are loaded into them (same state_dict keys), and
before anything is timed the outputs and every parameter's gradient are checked to
agree (a row whose models disagree gets no torch column, and the reason is printed).
The library never imports torch; without torch (or diffusers) the torch column is
left empty.

Timing is bench_ops.py's: one process, every implementation warmed up, then rounds of
turns (a pause of --settle seconds, one untimed call, --per-turn timed calls), the
starting implementation rotated; medians. --clock cpu times CPU seconds of the process
(time.process_time) instead of wall time: with --threads 1 it leaves out the time other
programs hold the core, the steadier measure on a shared machine. Peak memory: one training step (or sampling
forward) in a fresh process per (row, implementation), after a small-batch warm-up that
compiles the kernels: the growth of the resident set's high-water mark (VmHWM) over the
resident set after the model, optimizer and batch are built (bench_ops._cpu_peak_bytes).
It includes AdamW's first-step state (2 floats per parameter) on both sides.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from anywhere
sys.path.insert(0, HERE)

import bench_ops  # noqa: E402  (timing, thread settings, memory helpers)

import tinysd  # noqa: E402
import tinysd.nn.functional as F  # noqa: E402
from tinysd import optim  # noqa: E402
from tinysd.models import AutoencoderKL, CLIPModel, DigitClassifier, UNet2DConditionModel  # noqa: E402
from tinysd.tokenizer import Tokenizer, digit_captions  # noqa: E402

torch = bench_ops.torch
try:
    import diffusers
except ImportError:
    diffusers = None

IMPLS = ("ours", "torch")
TOKENIZER = Tokenizer()


# ---- the same architectures in PyTorch (baselines only) ------------------------------------------------
def torch_classifier():
    nn, tF = torch.nn, torch.nn.functional

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.conv3 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1), \
                nn.Conv2d(32, 64, 3, padding=1)
            self.fc1, self.fc2 = nn.Linear(64 * 16, 128), nn.Linear(128, 10)

        def forward(self, x):
            for conv in (self.conv1, self.conv2, self.conv3):
                x = tF.max_pool2d(tF.relu(conv(x)), 2)
            return self.fc2(tF.relu(self.fc1(x.flatten(1))))

    return Classifier()


def torch_clip(ours):
    """CLIPModel's layers with the same names (text: pre-LN causal transformer; image: small CNN)."""
    nn, tF = torch.nn, torch.nn.functional
    text, width = ours.text_model, ours.text_model.width
    heads = text.encoder.layers[0].self_attn.heads

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.to_v = (nn.Linear(width, width) for _ in range(3))
            self.to_out = nn.ModuleList([nn.Linear(width, width)])

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (f(x).reshape(b, s, heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
            out = tF.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.to_out[0](out.transpose(1, 2).reshape(b, s, width))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.self_attn = Attention()
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

        def forward(self, x):
            x = x + self.self_attn(self.layer_norm1(x))
            return x + self.mlp.fc2(tF.gelu(self.mlp.fc1(self.layer_norm2(x))))

    class CLIP(nn.Module):
        def __init__(self):
            super().__init__()
            t = self.text_model = nn.Module()
            t.embeddings = nn.Module()
            t.embeddings.token_embedding = nn.Embedding(*text.embeddings.token_embedding.weight.shape)
            t.embeddings.position_embedding = nn.Embedding(*text.embeddings.position_embedding.weight.shape)
            t.encoder = nn.Module()
            t.encoder.layers = nn.ModuleList([Layer() for _ in text.encoder.layers])
            t.final_layer_norm = nn.LayerNorm(width)
            t.text_projection = nn.Linear(width, text.text_projection.out_features, bias=False)
            v = self.vision_model = nn.Module()
            c1, c2, w = width // 4, width // 2, width
            v.encoder = nn.Sequential(
                nn.Conv2d(1, c1, 3, padding=1), nn.SiLU(),
                nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GroupNorm(8, c2), nn.SiLU(),
                nn.Conv2d(c2, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU(),
            )  # fmt: skip
            v.post_layernorm = nn.LayerNorm(w)
            v.visual_projection = nn.Linear(w, ours.vision_model.visual_projection.out_features, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(0.0))

        def forward(self, ids, images, positives):
            t, v = self.text_model, self.vision_model
            x = t.embeddings.token_embedding(ids) + t.embeddings.position_embedding(torch.arange(ids.shape[1]))
            for layer in t.encoder.layers:
                x = layer(x)
            hidden = t.final_layer_norm(x)
            pooled = hidden[torch.arange(ids.shape[0]), (ids == TOKENIZER.eos_id).int().argmax(1)]
            txt = tF.normalize(t.text_projection(pooled), dim=-1)
            img = v.visual_projection(v.post_layernorm(v.encoder(images).mean(dim=(2, 3))))
            logits = self.logit_scale.exp() * (tF.normalize(img, dim=-1) @ txt.T)
            rows = positives / positives.sum(1, keepdim=True)
            cols = positives.T / positives.T.sum(1, keepdim=True)
            return (tF.cross_entropy(logits, rows) + tF.cross_entropy(logits.T, cols)) / 2

    return CLIP()


def diffusers_vae(ours):
    blocks = tuple(b.resnets[0].out_channels for b in ours.encoder.down_blocks)
    vae = diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
        layers_per_block=len(ours.encoder.down_blocks[0].resnets), latent_channels=ours.latent_channels,
        norm_num_groups=ours.encoder.conv_norm_out.num_groups,
    )  # fmt: skip
    for block in vae.encoder.down_blocks:  # ours pads stride-2 convs by 1 on every side, diffusers' VAE by (0, 1, 0, 1)
        for down in block.downsamplers or []:
            down.padding, down.conv.padding = 1, (1, 1)
    return vae


def diffusers_unet(ours):
    """diffusers' UNet2DConditionModel with our default's shape (ff width set to ours after building)."""
    channels = tuple(b.resnets[0].out_channels for b in ours.down_blocks)
    heads = tuple(b.attentions[0].transformer_blocks[0].attn1.heads for b in ours.down_blocks)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=ours.in_channels, out_channels=ours.out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels),
        block_out_channels=channels, layers_per_block=len(ours.down_blocks[0].resnets),
        cross_attention_dim=ours.cross_attention_dim, attention_head_dim=heads,
        norm_num_groups=ours.conv_norm_out.num_groups, norm_eps=1e-6, use_linear_projection=True,
    )  # fmt: skip
    from diffusers.models.attention import FeedForward

    ours_modules = dict(ours.named_modules())
    for name, module in unet.named_modules():
        if name.endswith("transformer_blocks.0"):  # diffusers' UNet config has no ff_mult: take ours
            proj_out = ours_modules[name].ff.net[2]
            module.ff = FeedForward(proj_out.out_features, mult=proj_out.in_features / proj_out.out_features,
                                    activation_fn="geglu")
    return unet


# ---- the rows ------------------------------------------------------------------------------------------
class ModelCase:
    """One row. `build(impl, device)` -> a callable running one step; bench_ops.time_case times it."""

    def __init__(self, name, shape, make_models, data, ours_loss, torch_loss, optimizer=None, train=True,
                 check_output=None):
        self.op, self.shape, self.key, self.check_output = name, shape, name, check_output
        self.make_models, self.data = make_models, data  # make_models(impl) -> (ours_model, other model or None)
        self.ours_loss, self.torch_loss, self.optimizer, self.train = ours_loss, torch_loss, optimizer, train

    def ours(self):
        model = self.make_models("ours")[0]
        inputs = [tinysd.tensor(a) for a in self.data()]
        return model, inputs

    def torch_model(self):
        ours, theirs = self.make_models("torch")
        state = {k: torch.from_numpy(np.array(v.numpy())) for k, v in ours.state_dict().items()}
        theirs.load_state_dict(state, strict=True)
        return ours, theirs

    def build(self, impl, device):
        if impl == "torch":
            _, model = self.torch_model()
            inputs = [torch.from_numpy(np.array(a)) for a in self.data()]
            return self._torch_step(model, inputs)
        model, inputs = self.ours()
        return self._ours_step(model, inputs)

    def _ours_step(self, model, inputs):
        if not self.train:
            def forward():
                with tinysd.no_grad():
                    self.ours_loss(model, *inputs)
            return forward
        lr, wd, clip = self.optimizer
        opt = optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)

        def step():
            loss = self.ours_loss(model, *inputs)
            opt.zero_grad()
            loss.backward()
            if clip:
                optim.clip_grad_norm_(model.parameters(), clip)
            opt.step()

        return step

    def _torch_step(self, model, inputs):
        if not self.train:
            def forward():
                with torch.no_grad():
                    self.torch_loss(model, *inputs)
            return forward
        lr, wd, clip = self.optimizer
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)

        def step():
            loss = self.torch_loss(model, *inputs)
            opt.zero_grad()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()

        return step

    def check_agreement(self, check=None):
        """Same weights, same inputs: outputs (and, for a training row, every parameter's gradient) agree.

        `check(impl, model, inputs)` -> the output to compare (default: the loss; a row whose loss is
        random, the VAE's, passes a deterministic one). Returns the largest relative difference."""
        ours, theirs = self.torch_model()
        data = self.data()
        def loss(impl, model, inputs):
            return (self.ours_loss if impl == "ours" else self.torch_loss)(model, *inputs)

        fn = check or loss
        if not self.train:
            with tinysd.no_grad():
                a = fn("ours", ours, [tinysd.tensor(x) for x in data]).numpy()
            with torch.no_grad():
                b = fn("torch", theirs, [torch.from_numpy(np.array(x)) for x in data]).numpy()
            return _rel(a, b)
        a = fn("ours", ours, [tinysd.tensor(x) for x in data])
        b = fn("torch", theirs, [torch.from_numpy(np.array(x)) for x in data])
        a.backward()
        b.backward()
        worst = _rel(a.numpy(), b.detach().numpy())
        grads = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            worst = max(worst, _rel(p.grad.numpy(), grads[name].grad.numpy()))
        return worst


def _rel(a, b):
    """max |a - b| relative to max |b| (1 floor for tiny values)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-3))


def _images(rng, n):
    return np.tanh(rng.standard_normal((n, 1, 32, 32))).astype(np.float32)


def classifier_case(batch):
    def data():
        rng = np.random.default_rng(0)
        return [_images(rng, batch), rng.integers(0, 10, batch)]

    def models(impl):
        tinysd.manual_seed(0)
        return DigitClassifier(), torch_classifier() if impl == "torch" else None

    return ModelCase("classifier", f"train step, batch {batch} of 1x32x32", models, data,
                     lambda m, x, y: F.cross_entropy(m(x), y),
                     lambda m, x, y: torch.nn.functional.cross_entropy(m(x), y), (3e-3, 1e-4, None))  # fmt: skip


def vae_case(batch, kl_weight=1e-4):
    def data():
        return [_images(np.random.default_rng(1), batch)]

    def models(impl):
        tinysd.manual_seed(1)
        ours = AutoencoderKL()
        return ours, diffusers_vae(ours) if impl == "torch" else None

    def ours_loss(model, x):
        posterior = model.encode(x)
        return F.mse_loss(model.decode(posterior.sample()), x) + kl_weight * posterior.kl().mean()

    def torch_loss(model, x):
        posterior = model.encode(x).latent_dist
        recon = model.decode(posterior.sample()).sample
        return torch.nn.functional.mse_loss(recon, x) + kl_weight * posterior.kl().mean()

    return ModelCase("vae", f"train step, batch {batch} of 1x32x32", models, data, ours_loss, torch_loss,
                     (2e-3, 0.0, None), check_output=_vae_deterministic(kl_weight))


def _vae_deterministic(kl_weight):
    """The VAE's loss through the posterior's mean (the sampled one draws different noise on each side)."""

    def check(impl, model, inputs):
        (x,) = inputs
        if impl == "ours":
            posterior = model.encode(x)
            return F.mse_loss(model.decode(posterior.mode()), x) + kl_weight * posterior.kl().mean()
        posterior = model.encode(x).latent_dist
        recon = model.decode(posterior.mode()).sample
        return torch.nn.functional.mse_loss(recon, x) + kl_weight * posterior.kl().mean()

    return check


def clip_case(batch):
    def data():
        rng = np.random.default_rng(2)
        labels = rng.integers(0, 10, batch)
        ids = TOKENIZER([digit_captions(int(d), rng) for d in labels])
        return [np.asarray(ids, dtype=np.int64), _images(rng, batch), labels[:, None] == labels[None, :]]

    def models(impl):
        tinysd.manual_seed(2)
        ours = CLIPModel(vocab_size=TOKENIZER.vocab_size, context_length=TOKENIZER.context_length)
        return ours, torch_clip(ours) if impl == "torch" else None

    def torch_loss(model, ids, images, positives):
        return model(ids, images, positives.float())

    return ModelCase("clip", f"train step, batch {batch} ({TOKENIZER.context_length} tokens + 1x32x32)", models,
                     data, lambda m, ids, images, pos: m(ids, images, positives=pos.numpy()), torch_loss,
                     (2e-3, 0.01, 1.0))  # fmt: skip


def _unet_models(impl):
    tinysd.manual_seed(3)
    ours = UNet2DConditionModel(cross_attention_dim=64)
    for p in ours.parameters():  # the zero-initialised conv_out would make every other gradient zero
        if not p.data.any():
            p.data[...] = np.random.default_rng(5).standard_normal(p.shape).astype(np.float32) * 0.02
    return ours, diffusers_unet(ours) if impl == "torch" else None


def unet_case(batch):
    def data():
        rng = np.random.default_rng(3)
        return [rng.standard_normal((batch, 4, 8, 8), dtype=np.float32), rng.integers(0, 1000, batch),
                rng.standard_normal((batch, TOKENIZER.context_length, 64), dtype=np.float32),
                rng.standard_normal((batch, 4, 8, 8), dtype=np.float32)]  # fmt: skip

    return ModelCase("unet", f"train step, batch {batch} of 4x8x8, {TOKENIZER.context_length}x64 text", _unet_models,
                     data, lambda m, x, t, s, noise: F.mse_loss(m(x, t, s), noise),
                     lambda m, x, t, s, noise: torch.nn.functional.mse_loss(m(x, t, s).sample, noise),
                     (2e-3, 0.0, 1.0))  # fmt: skip


def unet_sample_case(batch):
    def data():
        rng = np.random.default_rng(4)
        return [rng.standard_normal((batch, 4, 8, 8), dtype=np.float32), np.array(500),
                rng.standard_normal((batch, TOKENIZER.context_length, 64), dtype=np.float32)]  # fmt: skip

    return ModelCase("unet sample", f"forward, no grad, batch {batch} (CFG of {batch // 2} prompts)", _unet_models,
                     data, lambda m, x, t, s: m(x, t, s), lambda m, x, t, s: m(x, t, s).sample, train=False)


def cases(quick):
    if quick:
        return [classifier_case(4), vae_case(2), clip_case(6), unet_case(2), unet_sample_case(4)]
    return [classifier_case(128), vae_case(32), clip_case(256), unet_case(128), unet_sample_case(500)]


# ---- running --------------------------------------------------------------------------------------------
def torch_missing(case):
    if torch is None:
        return "PyTorch is not installed"
    if case.op in ("vae", "unet", "unet sample") and diffusers is None:
        return "diffusers is not installed"
    return None


def measure_memory_here(key, impl, quick, threads):
    """In this (fresh) process: peak bytes of one step of row `key` with `impl`."""
    bench_ops.setup_device("cpu", threads)
    small = {c.key: c for c in cases(quick=True)}[key]
    small.build(impl, "cpu")()  # compile (Numba) / initialise (torch) on a small batch first
    run = {c.key: c for c in cases(quick)}[key].build(impl, "cpu")
    return bench_ops._cpu_peak_bytes(run)


def measure_memory(case, impl, quick, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", case.key, impl]
    cmd += (["--quick"] if quick else []) + (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["bytes"], result["method"]


def run_row(case, args, repeat):
    impls, errors = ["ours"], {}
    missing = torch_missing(case)
    if missing:
        errors["torch"] = missing
    else:
        try:
            diff = case.check_agreement(case.check_output)
            if diff > args.agree:
                raise RuntimeError(f"outputs/gradients differ from ours by {diff:.2e} (relative) > {args.agree}")
            impls.append("torch")
        except Exception as e:  # noqa: BLE001 (report and time ours alone)
            errors["torch"] = f"{type(e).__name__}: {e}"
            diff = None
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    ms, timing_errors = bench_ops.time_case(case, impls, "cpu", repeat, args.per_turn, args.settle, 1, clock)
    errors.update(timing_errors)
    row = {"op": case.op, "shape": case.shape, "ms": ms, "errors": errors, "agreement": diff if not missing else None,
           "ours_over_torch": bench_ops._ratio(ms.get("ours"), ms.get("torch"))}  # fmt: skip
    if not args.no_memory:
        measured = {impl: measure_memory(case, impl, args.quick, args.threads) for impl in ms}
        row["memory_bytes"] = {impl: nbytes for impl, (nbytes, _) in measured.items()}
        row["memory_method"] = {impl: method for impl, (_, method) in measured.items()}
        row["memory_ours_over_torch"] = bench_ops._ratio(row["memory_bytes"].get("ours"),
                                                         row["memory_bytes"].get("torch"))
    progress = ", ".join(f"{impl} {t:.3g} ms" for impl, t in ms.items())
    print(f"  {case.key}: {progress}" + "".join(f"  [{k}: {v}]" for k, v in errors.items()), file=sys.stderr)
    return row


def format_table(rows):
    head = ("model", "what", "ours ms", "torch ms", "ours/torch", "mem ours/torch")
    lines = [head]
    for r in rows:
        ms, mem, mem_ratio = r["ms"], r.get("memory_bytes") or {}, r.get("memory_ours_over_torch")
        mem_text = "-" if mem_ratio is None else \
            f"{mem_ratio:.2f}x ({bench_ops._fmt_mib(mem['ours'])}/{bench_ops._fmt_mib(mem['torch'])} MiB)"
        ratio = "-" if r["ours_over_torch"] is None else f"{r['ours_over_torch']:.2f}x"
        lines.append((r["op"], r["shape"], bench_ops._fmt_ms(ms.get("ours")), bench_ops._fmt_ms(ms.get("torch")),
                      ratio, mem_text))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    lines.insert(1, ["-" * w for w in widths])
    return "\n".join(
        "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))) for line in lines
    )


def blas_info():
    try:
        from threadpoolctl import threadpool_info

        return [{k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture", "filepath")}
                for p in threadpool_info()]  # fmt: skip
    except ImportError:
        return None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default="bench_models_cpu.json", help="write the results here")
    p.add_argument("--repeat", type=int, default=None, help="rounds of turns (default 5, quick 1)")
    p.add_argument("--per-turn", type=int, default=2, help="timed calls per implementation and round (default 2)")
    p.add_argument("--settle", type=float, default=0.2, help="seconds of pause before each turn (default 0.2)")
    p.add_argument("--quick", action="store_true", help="tiny batches: a smoke run, not a measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for Numba, BLAS and torch")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or CPU time of the process (steadier on a loaded machine; use with --threads 1)")
    p.add_argument("--only", default=None, help="only rows whose name contains this text")
    p.add_argument("--agree", type=float, default=1e-3, help="largest relative difference accepted (default 1e-3)")
    p.add_argument("--memory-of", nargs=2, metavar=("ROW", "IMPL"), help=argparse.SUPPRESS)  # internal
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.memory_of:  # we are the subprocess of one memory measurement
        nbytes, method = measure_memory_here(*args.memory_of, args.quick, args.threads)
        print(json.dumps({"bytes": int(nbytes), "method": method}))
        return 0
    repeat = args.repeat or (1 if args.quick else 5)
    settings = bench_ops.setup_device("cpu", args.threads)
    settings.update(repeat=repeat, quick=args.quick, clock=args.clock, per_turn=args.per_turn, settle_s=args.settle,
                    blas=blas_info(),
                    python=platform.python_version(), numpy=np.__version__,
                    torch=None if torch is None else torch.__version__,
                    diffusers=None if diffusers is None else diffusers.__version__)  # fmt: skip
    rows = [run_row(case, args, repeat) for case in cases(args.quick) if not args.only or args.only in case.key]
    print(format_table(rows))
    print(f"\n{settings}")
    if not args.no_memory:
        print("memory: peak of one step in a fresh process per (row, impl): " + bench_ops.MEMORY_NOTE["cpu"])
    with open(args.json, "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
