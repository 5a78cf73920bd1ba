"""Text-to-digit latent diffusion on MNIST, from nothing, on tinysd alone.

    python examples/mnist_digits.py                 # the whole job (about 9 minutes on a 2-core CPU)
    python examples/mnist_digits.py --quick         # a smoke run in about a minute
    python examples/mnist_digits.py --prompt "the number 3" --samples-per-digit 100
    python examples/mnist_digits.py --ranks 1       # in this process (the default: one process per core)
    mpiexec -n 2 python examples/mnist_digits.py --data-parallel   # what the default starts, with mpi4py

Stages, each saved to `--out` as a safetensors checkpoint and skipped on the
next run when its checkpoint is there and fits this run (`--retrain STAGE`
redoes it and the stages that depend on it; `--retrain all` redoes all). A
checkpoint records its data's checksum and what produced it (budget, seed,
data, the checksums of the upstream checkpoints it was trained on); one that is
damaged or came from other settings is refused with a message naming the file,
never used. Ctrl-C or a crash mid-stage keeps every finished checkpoint and the
stage's resume file, and the rerun continues exactly where it stopped: it ends
with the same weights and samples, bit for bit, as a run never interrupted.

  1. classifier  the lesson's "magic function" f(x) = p(digit | image); it also scores the samples
  2. vae         compresses 1x32x32 digits to 4x8x8 latents and back
  3. clip        text and image encoders trained so matching caption/image pairs score high
  4. unet        predicts the noise added to latents, given the timestep and CLIP's text states;
                 captions are dropped 10% of the time so one model also learns the unconditional
                 prediction that classifier-free guidance needs
  then: sample   iterative denoising (DDIM by default) for prompts such as "a handwritten digit seven"
"""

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import tinysd  # noqa: E402  (first: it sets OpenBLAS's thread timeout before NumPy loads OpenBLAS)
import numpy as np  # noqa: E402
import tinysd.nn.functional as F  # noqa: E402
from tinysd import distributed, io, optim  # noqa: E402
from tinysd.data import load_dataset, to_float_images  # noqa: E402
from tinysd.metrics import frechet_distance, psnr  # noqa: E402
from tinysd.models import (  # noqa: E402
    AutoencoderKL,
    CLIPModel,
    DigitClassifier,
    UNet2DConditionModel,
)
from tinysd.pipeline import TextToImage  # noqa: E402
from tinysd.schedulers import DDIMScheduler, DDPMScheduler  # noqa: E402
from tinysd.tokenizer import DIGIT_WORDS, Tokenizer, digit_captions  # noqa: E402
from tinysd.training import NonFiniteError, ResumeMismatchError, epoch_batches, train  # noqa: E402

STAGES = ("classifier", "vae", "clip", "unet")


class JobError(Exception):
    """A problem the user can fix (a checkpoint that does not fit, a NaN loss): printed without a traceback."""


def upstream_of(stage, args):
    """The stages whose checkpoints `stage` is trained on (the VAE reads the classifier only
    for the perceptual loss; the UNet trains on the VAE's latents and CLIP's text states)."""
    return {"classifier": (), "vae": ("classifier",) if args.perceptual_weight else (),
            "clip": (), "unet": ("vae", "clip")}[stage]


def stages_to_retrain(asked, args):
    """The stages asked for plus every stage downstream of them."""
    todo = set(STAGES) if "all" in asked else set(asked)
    for stage in STAGES:  # in training order, so upstream stages are settled first
        if todo & set(upstream_of(stage, args)):
            todo.add(stage)
    return todo


def stage_seed(seed, name):
    """A stage's own random stream, from the run's seed and the stage's name: a stage draws the
    same numbers whether the stages before it were trained now or loaded from checkpoints."""
    return int(np.random.SeedSequence([seed, *name.encode()]).generate_state(1)[0])

# Training budgets, chosen by measurement on a 2-core CPU (see the README for why).
FULL = dict(
    classifier=dict(steps=1000, batch=128, lr=3e-3),
    vae=dict(steps=900, batch=32, lr=2e-3, kl_weight=1e-4),
    clip=dict(steps=300, batch=256, lr=2e-3),
    unet=dict(steps=1500, batch=128, lr=2e-3, min_snr_gamma=5.0),
    train_subset=None,
)
QUICK = dict(
    classifier=dict(steps=20, batch=64, lr=3e-3),
    vae=dict(steps=20, batch=64, lr=2e-3, kl_weight=1e-4),
    clip=dict(steps=20, batch=64, lr=2e-3),
    unet=dict(steps=20, batch=64, lr=2e-3, min_snr_gamma=5.0),
    train_subset=2048,
)


def busy_cores(seconds=0.3):
    """How many cores other programs keep busy right now, from two readings of /proc/stat
    (Linux) while this process sleeps; None where there is no /proc/stat."""

    def reading():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    try:
        (total0, idle0), _, (total1, idle1) = reading(), time.sleep(seconds), reading()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / elapsed) if elapsed > 0 else 0.0


def int_in(low, high=None):
    """An argparse type: an int in [low, high] (no upper bound when high is None)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected {low}..{high or 'any'}")
        return value

    return parse


def finite_float(low):
    """An argparse type: a finite float >= low (not NaN, not infinite)."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not np.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"{text} must be a finite number >= {low}")
        return value

    return parse


def nonempty_text(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty prompt; the empty prompt is already the unconditional one")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="runs/mnist_digits", help="folder for checkpoints and outputs")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run in about a minute")
    p.add_argument("--prompt", action="append", default=[], type=nonempty_text,
                   help="extra free-text prompt (repeatable)")
    p.add_argument("--samples-per-digit", type=int_in(1), default=10)
    p.add_argument("--steps", type=int_in(1, 1000), default=25, help="denoising steps (1..1000)")
    p.add_argument("--guidance", type=finite_float(0.0), default=3.0, help="classifier-free guidance scale")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--retrain", action="append", default=[], choices=[*STAGES, "all"],
                   help="train STAGE again, and the stages that depend on it (repeatable)")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion"])
    p.add_argument("--perceptual-weight", type=finite_float(0.0), default=0.0,
                   help="add this times F.perceptual_loss (the classifier's feature maps) to the VAE's loss")
    p.add_argument("--threads", type=int_in(1, 1024), default=None,
                   help="CPU threads per process (default: 1 per rank, or all cores in one process); see README")
    p.add_argument("--ranks", type=int_in(1, 1024), default=None,
                   help="data-parallel processes on this machine, started with mpiexec (default: one per core "
                        "where mpi4py and mpiexec are installed, else 1); --ranks 1 trains in this process")
    p.add_argument("--data-parallel", action="store_true",
                   help="under mpiexec: split each batch over the ranks, average gradients (needs mpi4py)")
    args = p.parse_args(argv)
    if problem := check_out_folder(args.out):
        p.error(f"argument --out: {problem}")
    if args.device == "cuda" and not tinysd.cuda.is_available():
        p.error("argument --device: cuda was asked for, but CuPy or a GPU is not available")
    return args


def usable_cores():
    """The cores this process may run on (its CPU affinity where the OS tells, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_rank(ranks):
    """Each of `ranks` processes on this machine gets an equal share of the usable cores."""
    return max(1, usable_cores() // ranks)


def start_ranks(argv):
    """From the command line: become `mpiexec -n R python mnist_digits.py ARGS --data-parallel` when
    R = --ranks, by default one rank per core (per --threads cores if given; a power of two, so the
    batches split evenly), is more than 1 and mpi4py and mpiexec are installed; return (one process
    runs) otherwise.

    On the CPU two single-threaded processes beat one process on two threads by far: measured on
    2 cores (benchmarks/bench_data_parallel.py), images/s of 1 process x 1 thread / 1 x 2 threads /
    2 ranks x 1 thread: classifier 1749 / 1909 / 3357, VAE 172 / 180 / 303, CLIP 1145 / 1302 / 2382,
    UNet 289 / 323 / 517. A step of these small models is many small operations, and threads that
    split each one meet at every one of them; ranks meet once per step, to average gradients."""
    args = parse_args(argv)
    if args.data_parallel or args.device != "cpu" or args.ranks == 1:
        return
    launcher = shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    usable = launcher is not None and importlib.util.find_spec("mpi4py") is not None
    if args.ranks is None:  # as many ranks of --threads threads (default 1) as the cores hold
        fit = max(1, min(usable_cores() // (args.threads or 1), 32))
        ranks = 1 << (fit.bit_length() - 1) if usable else 1  # a power of two: 128, 32 and 256 split evenly
        if ranks == 1:
            return
    elif not usable:
        raise JobError(f"--ranks {args.ranks} needs mpi4py and an mpiexec (pip install mpi4py mpich)")
    else:
        ranks = args.ranks
    print(f"[ranks] {ranks} processes, data parallel, {args.threads or threads_per_rank(ranks)} thread(s) each "
          f"(--ranks 1: one process)", flush=True)
    command = [launcher, "-n", str(ranks), sys.executable, str(Path(__file__).resolve()), *argv, "--data-parallel"]
    # this process becomes mpiexec: Ctrl-C reaches the ranks as it would us
    os.execve(launcher, command, distributed.launcher_environment())


def check_out_folder(out):
    """Why `out` cannot hold this run's files (None if it can): it must be a writable folder.
    Found now, not after ten minutes of training."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return f"{out} exists and is not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # per process: data-parallel ranks check at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"cannot write into {out}: {err.strerror or err}"
    return None


class Run:
    """What every stage needs: the output folder, the device, the data, the budgets."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = args.device
        self.budget = QUICK if args.quick else FULL
        self.retrain = stages_to_retrain(args.retrain, args)
        self.metrics = {}
        self.checksums = {}  # stage -> SHA-256 of its checkpoint's data, for the stages downstream
        if distributed.is_main() and (swept := io.sweep_temp_files(self.out)):
            print(f"removed {len(swept)} temporary file(s) left by an interrupted write: {', '.join(swept)}")
        if not distributed.is_main():  # rank 0 downloads and caches the data first, once
            distributed.barrier(f"{args.dataset} download by rank 0")
        images, self.train_labels = load_dataset(args.dataset, "train")
        test_images, self.test_labels = load_dataset(args.dataset, "test")
        if distributed.is_main():
            distributed.barrier(f"{args.dataset} download by rank 0")
        if self.budget["train_subset"]:
            keep = np.random.default_rng(args.seed).permutation(len(images))[: self.budget["train_subset"]]
            images, self.train_labels = images[keep], self.train_labels[keep]
            test_images, self.test_labels = test_images[:1000], self.test_labels[:1000]
        self.train_images = to_float_images(images)  # (N, 1, 32, 32) in [-1, 1]
        self.test_images = to_float_images(test_images)

    def tensor(self, array):
        return tinysd.tensor(array, device=self.device)

    def begin(self, name):
        """Start stage `name`: seed its own random stream (models built after this draw from it)."""
        return tinysd.manual_seed(stage_seed(self.args.seed, name))

    def produced_by(self, name):
        """What a checkpoint of `name` must have been trained with to fit this run."""
        record = {"stage": name, "budget": self.budget[name], "seed": self.args.seed, "dataset": self.args.dataset,
                  "train_subset": self.budget["train_subset"],
                  "upstream": {up: self.checksums[up] for up in upstream_of(name, self.args)}}
        if name == "vae":
            record["perceptual_weight"] = self.args.perceptual_weight
        return record

    def stage(self, name, model, fit):
        """Load `name`'s checkpoint if it exists and fits this run (and no retrain was asked), else fit and save it."""
        path = self.out / f"{name}.safetensors"
        resume = self.out / f"{name}.resume.safetensors"
        produced_by = self.produced_by(name)
        distributed.check_same({"checkpoint exists": path.exists()}, f"{path} (data parallel needs a shared folder)")
        if path.exists() and name not in self.retrain:
            summary = self.load_checked(name, path, model, produced_by)
            resume.unlink(missing_ok=True)  # left by a crash between saving the checkpoint and removing it
            print(f"[{name}] loaded {path}")
        else:
            if name in self.retrain:
                resume.unlink(missing_ok=True)  # every rank, before it looks for one
            fingerprint = json.dumps(produced_by, sort_keys=True)
            try:
                summary = fit(str(resume), fingerprint)
            except NonFiniteError as err:
                kept = f"the last resume file ({resume}) and " if resume.exists() else ""
                raise JobError(f"{err}\nKept: {kept}every finished stage.") from None
            except ResumeMismatchError as err:
                raise JobError(f"{err}; or pass --retrain {name}") from None
            if distributed.is_main():  # data parallel: one rank writes
                io.save_file(model.state_dict(), path,
                             metadata={"summary": json.dumps(summary), "produced_by": json.dumps(produced_by)})
                io.crash_point(f"{name} saved")
                resume.unlink(missing_ok=True)
            distributed.barrier(f"{name} checkpoint written by rank 0")  # the other ranks read its checksum below
            details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
            print(f"[{name}] {details}")
        self.checksums[name] = io.stored_checksum(path)
        self.metrics[name] = summary
        model.eval()
        return summary

    def load_checked(self, name, path, model, produced_by):
        """Load a checkpoint only if it is whole and was produced as this run would produce it."""
        fix = (f"Pass --retrain {name} to train it again (the stages that depend on it are retrained too), "
               f"or choose another --out.")
        try:
            state, metadata = io.load_file_and_metadata(path)
        except ValueError as err:
            raise JobError(f"{err}\n{fix}") from None
        if "produced_by" not in metadata:
            raise JobError(f"{path} does not record what produced it (written by an older tinysd?).\n{fix}")
        differences = describe_differences(json.loads(metadata["produced_by"]), produced_by)
        if differences:
            raise JobError(f"{path} does not fit this run: {'; '.join(differences)}.\n{fix}")
        try:
            model.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError) as err:
            raise JobError(f"{path} does not fit this model: {err}\n{fix}") from None
        return json.loads(metadata.get("summary", "{}"))


def describe_differences(saved, wanted):
    """What differs between the record a checkpoint carries and what this run would train, in words."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if a == b:
            continue
        if key == "upstream":
            for up in sorted(set(a or {}) | set(b or {})):
                if up in (a or {}) and up in (b or {}) and a[up] != b[up]:
                    out.append(f"it was trained on another {up}.safetensors than the one this run uses "
                               f"({up} was retrained or replaced since)")
        else:
            out.append(f"{key} was {json.dumps(a)}, this run has {json.dumps(b)}")
    return out


def batches_of(run, cfg):
    return epoch_batches(len(run.train_images), cfg["batch"], run.args.seed)


def warmup_cosine(cfg):
    warmup = max(1, cfg["steps"] // 20)
    return lambda step: optim.warmup_cosine_lr(step, cfg["lr"], warmup, cfg["steps"])


def evaluate_in_batches(fn, images, batch=500):
    with tinysd.no_grad():
        return np.concatenate([fn(images[i : i + batch]) for i in range(0, len(images), batch)])


# ---- Numba's first compilation, shared out among the ranks ---------------------------------------
def compile_kernels_once(run, tokenizer):
    """Numba compiles each kernel the first time it runs (about 45 s of one core for this job, in a
    fresh clone) and keeps it in its on-disk cache. Data parallel, every rank would compile every
    kernel at the same moment; instead each rank first takes a training step (forward, backward,
    AdamW) of its share of the models, on random data of the shapes training will use, and the ranks
    then find each other's kernels in the cache. With a warm cache this takes about a second."""
    ranks = distributed.world_size()
    if run.device != "cpu" or ranks == 1:
        return
    rng = np.random.default_rng(0)
    batch = {name: max(1, run.budget[name]["batch"] // ranks) for name in STAGES}

    def images(n):
        return run.tensor(rng.uniform(-1, 1, (n, 1, 32, 32)).astype(np.float32))

    def classifier():
        n, model = batch["classifier"], DigitClassifier().to(run.device)
        return model, F.cross_entropy(model(images(n)), run.tensor(rng.integers(0, 10, n)))

    def vae():
        model, x = AutoencoderKL().to(run.device), images(batch["vae"])
        posterior = model.encode(x)
        return model, F.mse_loss(model.decode(posterior.sample()), x) + posterior.kl().mean()

    def clip():
        n = batch["clip"]
        model = clip_model(tokenizer).to(run.device)
        ids = tokenizer([digit_prompt(d) for d in rng.integers(0, 10, n)])
        return model, model(run.tensor(ids), images(n), positives=np.eye(n, dtype=bool))

    def unet():
        n, autoencoder = batch["unet"], AutoencoderKL()  # built for the latents' shape only
        width = clip_model(tokenizer).text_model.width
        size = 32 // autoencoder.downscale_factor
        noisy = rng.standard_normal((n, autoencoder.latent_channels, size, size)).astype(np.float32)
        states = rng.standard_normal((n, tokenizer.context_length, width)).astype(np.float32)
        model = UNet2DConditionModel(cross_attention_dim=width).to(run.device)
        pred = model(run.tensor(noisy), run.tensor(rng.integers(0, 1000, n)), run.tensor(states))
        return model, F.mse_loss(pred, run.tensor(noisy))

    # 2 ranks: UNet and VAE on one, classifier and CLIP on the other (23 s and 22 s from an empty cache)
    for step in [unet, classifier, vae, clip][distributed.rank() :: ranks]:
        model, loss = step()
        loss.backward()
        optim.AdamW(model.parameters()).step()
    distributed.barrier("kernels compiled")


# ---- stage 1: the classifier (the magic function) ----------------------------------------------
def stage_classifier(run):
    run.begin("classifier")
    model = DigitClassifier().to(run.device)
    cfg = run.budget["classifier"]

    def loss_fn(idx):
        idx = distributed.shard(idx)  # data parallel: this rank's slice of the global batch
        return F.cross_entropy(model(run.tensor(run.train_images[idx])), run.tensor(run.train_labels[idx]))

    def fit(resume, fingerprint):
        opt = optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
        s = train(model, opt, loss_fn, batches_of(run, cfg), cfg["steps"], lr_at=warmup_cosine(cfg),
                  resume_path=resume, fingerprint=fingerprint, desc="classifier", batch_size=cfg["batch"])
        model.eval()
        s["test_accuracy"] = classifier_accuracy(run, model, run.test_images, run.test_labels)
        return s

    run.stage("classifier", model, fit)
    return model


def classifier_accuracy(run, model, images, labels):
    logits = evaluate_in_batches(lambda x: model(run.tensor(x)).numpy(), images)
    return float((logits.argmax(1) == labels).mean())


# ---- stage 2: the VAE --------------------------------------------------------------------------
def stage_vae(run, classifier):
    run.begin("vae")
    model = AutoencoderKL().to(run.device)
    cfg = run.budget["vae"]
    perceptual = run.args.perceptual_weight
    if perceptual:
        classifier.requires_grad_(False)  # a fixed judge of what looks like a digit: only the VAE learns

    def loss_fn(idx):
        x = run.tensor(run.train_images[distributed.shard(idx)])
        posterior = model.encode(x)
        recon = model.decode(posterior.sample())
        loss = F.mse_loss(recon, x) + cfg["kl_weight"] * posterior.kl().mean()
        if perceptual:  # also match the classifier's feature maps, not only the pixels
            loss = loss + perceptual * F.perceptual_loss(recon, x, classifier.feature_maps)
        return loss

    def fit(resume, fingerprint):
        opt = optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
        s = train(model, opt, loss_fn, batches_of(run, cfg), cfg["steps"], lr_at=warmup_cosine(cfg),
                  resume_path=resume, fingerprint=fingerprint, desc="vae", batch_size=cfg["batch"])
        model.eval()
        recon = evaluate_in_batches(lambda x: model.decode(model.encode(run.tensor(x)).mode()).numpy(),
                                    run.test_images)
        s["test_psnr_db"] = psnr(crop01(recon), crop01(run.test_images))
        s["test_recon_accuracy"] = classifier_accuracy(run, classifier, recon, run.test_labels)
        s["perceptual_weight"] = perceptual
        # Scale latents to unit variance for the diffusion model, as Stable Diffusion does.
        s["scaling_factor"] = model.estimate_scaling_factor(run.train_images[:5000])
        return s

    summary = run.stage("vae", model, fit)
    model.scaling_factor = summary["scaling_factor"]
    return model


def crop01(images):
    """(N, 1, 32, 32) in [-1, 1] -> (N, 28, 28) in [0, 1]: the digits as MNIST has them."""
    return np.clip((np.asarray(images)[:, 0, 2:30, 2:30] + 1) / 2, 0, 1)


def encode_latents(run, vae, images, batch=500):
    """Latent means, scaled to unit variance as the UNet sees them. Data parallel, each rank encodes
    every R-th batch of `batch` images and the ranks add up their parts (zeros where a batch is
    another rank's): the same latents as one process computes, in 1/R of the time."""
    size = images.shape[2] // vae.downscale_factor, images.shape[3] // vae.downscale_factor
    latents = np.zeros((len(images), vae.latent_channels, *size), np.float32)
    with tinysd.no_grad():
        for i in range(batch * distributed.rank(), len(images), batch * distributed.world_size()):
            latents[i : i + batch] = vae.encode(run.tensor(images[i : i + batch])).mode().numpy()
    distributed.sum_arrays([latents], "latents")
    return latents * vae.scaling_factor


# ---- stage 3: CLIP -----------------------------------------------------------------------------
def clip_model(tokenizer):
    """The main job's CLIP, sized for the tokenizer's vocabulary and context."""
    return CLIPModel(vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length)


def stage_clip(run, tokenizer):
    rng = run.begin("clip")  # the captions are drawn from the stage's stream too
    model = clip_model(tokenizer).to(run.device)
    cfg = run.budget["clip"]

    def loss_fn(idx):
        labels = run.train_labels[idx]
        ids = tokenizer([digit_captions(int(d), rng) for d in labels])
        idx, labels, ids = distributed.shard(idx), distributed.shard(labels), distributed.shard(ids)
        positives = labels[:, None] == labels[None, :]  # captions of the same digit are matches too
        return model(run.tensor(ids), run.tensor(run.train_images[idx]), positives=positives)

    def fit(resume, fingerprint):
        opt = optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
        # Clipping the gradient norm at 1.0 keeps contrastive training from collapsing to loss ln(batch).
        s = train(model, opt, loss_fn, batches_of(run, cfg), cfg["steps"], lr_at=warmup_cosine(cfg), clip_norm=1.0,
                  resume_path=resume, fingerprint=fingerprint, generator=rng, desc="clip", batch_size=cfg["batch"])
        model.eval()
        s["zero_shot_test_accuracy"] = clip_zero_shot_accuracy(run, model, tokenizer)
        return s

    run.stage("clip", model, fit)
    return model


def digit_prompt(d):
    return f"a handwritten digit {DIGIT_WORDS[d]}"


def clip_zero_shot_accuracy(run, model, tokenizer):
    ids = run.tensor(tokenizer([digit_prompt(d) for d in range(10)]))
    predicted = evaluate_in_batches(lambda x: model.zero_shot_classify(run.tensor(x), ids), run.test_images)
    return float((predicted == run.test_labels).mean())


# ---- stage 4: the latent UNet --------------------------------------------------------------------
def stage_unet(run, vae, clip, tokenizer):
    rng = run.begin("unet")  # captions, dropout, noise and timesteps come from the stage's stream
    model = UNet2DConditionModel(cross_attention_dim=clip.text_model.width).to(run.device)
    cfg = run.budget["unet"]
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)

    def fit(resume, fingerprint):
        latents = encode_latents(run, vae, run.train_images)
        captions, caption_of = caption_bank(tokenizer)
        with tinysd.no_grad():
            states = clip.text_model(run.tensor(tokenizer(captions)))[0].numpy()  # (K, S, width)
        distributed.broadcast_arrays([latents, states], "latents")  # rank 0's, bit for bit
        T = scheduler.num_train_timesteps
        # min-SNR-gamma weighting (Hang et al., 2023): a timestep's noise-prediction error weighs
        # min(SNR, gamma) / SNR, SNR = abar / (1 - abar); the nearly clean steps, easy and many, count less
        abar = scheduler.alphas_cumprod.astype(np.float64)
        snr = abar / (1.0 - abar)
        snr_weight = (np.minimum(snr, cfg["min_snr_gamma"]) / snr).astype(np.float32)

        def loss_fn(idx):
            labels = run.train_labels[idx]
            which = np.array([rng.choice(caption_of[d]) for d in labels])
            which[rng.random(len(idx)) < 0.1] = 0  # caption dropout: the empty prompt, for guidance
            x0 = latents[idx]
            noise = rng.standard_normal(x0.shape).astype(np.float32)
            t = rng.integers(0, T, len(idx))
            noisy = scheduler.add_noise(x0, noise, t)
            # Data parallel: the draws above are the global batch's, so a rank's slice is what one process has.
            noisy, t, which, noise = (distributed.shard(a) for a in (noisy, t, which, noise))
            pred = model(run.tensor(noisy), run.tensor(t), run.tensor(states[which]))
            per_sample = F.mse_loss(pred, run.tensor(noise), reduction="none").mean(dim=(1, 2, 3))
            return (per_sample * run.tensor(snr_weight[t])).mean()

        # With warmup (diffusers' rule) the decay is min(0.999, (1 + n) / (10 + n)): at most 0.994 over
        # the 1,500 steps, so this averages roughly the last tenth of the run (measured at 1,400 steps:
        # 0.995, 0.998 and 0.9995 gave the same weights; the raw weights sampled as well).
        ema = optim.EMA(model, decay=0.999)
        opt = optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
        s = train(model, opt, loss_fn, batches_of(run, cfg), cfg["steps"], lr_at=warmup_cosine(cfg),
                  clip_norm=1.0, ema=ema, resume_path=resume, fingerprint=fingerprint, generator=rng,
                  desc="unet", batch_size=cfg["batch"])
        ema.copy_to(model)
        return s

    run.stage("unet", model, fit)
    return model


def caption_bank(tokenizer, per_digit=40, seed=0):
    """A fixed bank of distinct captions: index 0 is the empty prompt, then captions per digit."""
    rng = np.random.default_rng(seed)
    captions, caption_of = [""], {}
    for d in range(10):
        mine = sorted({digit_captions(d, rng) for _ in range(per_digit)} | {digit_prompt(d)})
        caption_of[d] = list(range(len(captions), len(captions) + len(mine)))
        captions += mine
    return captions, caption_of


# ---- sampling and scoring ------------------------------------------------------------------------
def sample_and_score(run, pipe, classifier):
    args = run.args
    prompts = [digit_prompt(d) for d in range(10) for _ in range(args.samples_per_digit)]
    labels = [d for d in range(10) for _ in range(args.samples_per_digit)]
    for text in args.prompt:
        prompts += [text] * args.samples_per_digit
        labels += [digit_in_text(text)] * args.samples_per_digit
    labels = np.array(labels, dtype=np.int64)

    t0 = time.perf_counter()
    images = []
    for i in range(0, len(prompts), 250):
        images.append(pipe(prompts[i : i + 250], num_inference_steps=args.steps, guidance_scale=args.guidance,
                           seed=args.seed + i))
    images = np.concatenate(images)  # (N, 1, 32, 32) in [0, 1]
    sample_s = time.perf_counter() - t0
    digits = images[:, 0, 2:30, 2:30].astype(np.float32)
    with io.atomic_file(run.out / "samples.npz") as f:
        np.savez(f, images=digits, labels=labels, prompts=np.array(prompts))

    as_input = images * 2 - 1
    predicted = evaluate_in_batches(lambda x: classifier(run.tensor(x)).numpy(), as_input).argmax(1)
    known = labels >= 0
    per_digit = {str(d): float((predicted[labels == d] == d).mean()) for d in range(10) if (labels == d).any()}
    features = lambda x: evaluate_in_batches(lambda b: classifier.features(run.tensor(b)).numpy(), x)  # noqa: E731
    split = min(5000, len(run.test_images) // 2)  # the reference: the first 5000 test images
    sample_features, test_features = features(as_input), features(run.test_images[:split])
    # the floor: as many other real test images as there are samples, against the same reference
    real_features = features(run.test_images[split : split + len(prompts)])
    run.metrics["samples"] = {
        "count": len(prompts),
        "wall_s": sample_s,
        "images_per_s": len(prompts) / sample_s,
        "accuracy": float((predicted[known] == labels[known]).mean()) if known.any() else None,
        "accuracy_per_digit": per_digit,
        "frechet_distance_classifier_features": frechet_distance(sample_features, test_features),
        "frechet_distance_real_vs_real": frechet_distance(real_features, test_features),
        "real_vs_real_count": len(real_features),
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
    }
    save_grid(run.out / "samples.png", digits, prompts, args.samples_per_digit)
    save_denoising_gif(run, pipe)


def digit_in_text(text):
    """The digit a free-text prompt asks for (a word or a numeral), or -1."""
    for word in text.lower().replace(".", " ").split():
        if word.isdigit() and len(word) == 1:
            return int(word)
        if word in DIGIT_WORDS:
            return DIGIT_WORDS.index(word)
    return -1


def save_grid(path, digits, prompts, per_row, scale=2):
    """One row per prompt, labelled with its prompt on the left."""
    from PIL import Image, ImageDraw

    rows = len(digits) // per_row
    cols = min(per_row, 20)
    label_w, cell = 190, 28 * scale
    grid = Image.new("L", (label_w + cols * cell, rows * cell), 255)
    draw = ImageDraw.Draw(grid)
    for r in range(rows):
        draw.text((4, r * cell + cell // 2 - 6), prompts[r * per_row][:30], fill=0)
        for c in range(cols):
            tile = Image.fromarray((255 - digits[r * per_row + c] * 255).astype(np.uint8)).resize((cell, cell))
            grid.paste(tile, (label_w + c * cell, r * cell))
    with io.atomic_file(path) as f:
        grid.save(f, format="PNG")


def save_denoising_gif(run, pipe, scale=2):
    """Frames of the denoising of one prompt per digit, from noise to digits."""
    from PIL import Image

    frames = []

    def keep(step, timestep, latents, decode):
        images = decode(latents)[:, 0, 2:30, 2:30]  # (10, 28, 28) in [0, 1]
        strip = np.concatenate(list(images), axis=1)
        frames.append(Image.fromarray((255 - strip * 255).astype(np.uint8)).resize((strip.shape[1] * scale, 28 * scale)))

    pipe([digit_prompt(d) for d in range(10)], num_inference_steps=run.args.steps,
         guidance_scale=run.args.guidance, seed=run.args.seed, callback=keep, progress=False)
    with io.atomic_file(run.out / "denoise.gif") as f:
        frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:] + [frames[-1]] * 8, duration=80)


def main(argv=None):
    """Run the job; problems the user can fix raise JobError (the command line prints it without a traceback)."""
    args = parse_args(argv)
    if args.ranks and args.ranks > 1 and not args.data_parallel:
        raise JobError(f"--ranks {args.ranks} starts its processes from the command line only "
                       f"(python examples/mnist_digits.py --ranks {args.ranks})")
    if args.data_parallel:
        distributed.init(device=args.device)
        args.threads = args.threads or threads_per_rank(distributed.local_world_size())
        if not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # one rank reports; errors still reach stderr
    if args.threads:
        tinysd.set_num_threads(args.threads)
    elif args.device == "cpu" and (busy := busy_cores()) is not None and busy >= 0.5:
        # Threads that meet after every matrix product lose badly to a program holding a core
        # (measured: the VAE stage took 107 s alone, 492 s next to a test run).
        print(f"[threads] other programs keep {busy:.1f} of {os.cpu_count()} cores busy; "
              f"if training is slow, try --threads 1")
    start = time.perf_counter()
    run = Run(args)
    here = Path(__file__).resolve()
    distributed.check_same({
        "arguments": {k: v for k, v in vars(args).items() if k != "threads"},
        "code": distributed.source_digest([here, here.parent.parent / "tinysd", here.parent.parent / "kernels"]),
        "training images": run.train_images, "training labels": run.train_labels,
    }, "the run")
    tokenizer = Tokenizer()
    compile_kernels_once(run, tokenizer)
    classifier = stage_classifier(run)
    vae = stage_vae(run, classifier)
    clip = stage_clip(run, tokenizer)
    unet = stage_unet(run, vae, clip, tokenizer)
    if not distributed.is_main():
        return  # rank 0 samples and writes the outputs
    scheduler_cls = DDIMScheduler if args.scheduler == "ddim" else DDPMScheduler
    scheduler = scheduler_cls(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    pipe = TextToImage(vae, tokenizer, clip.text_model, unet, scheduler)
    run.begin("sample")
    sample_and_score(run, pipe, classifier)
    run.metrics["total_wall_s"] = time.perf_counter() - start
    io.write_json(run.out / "metrics.json", run.metrics)
    s = run.metrics["samples"]
    print(f"[samples] {s['count']} in {s['wall_s']:.1f}s, accuracy {s['accuracy']}, "
          f"Frechet distance {s['frechet_distance_classifier_features']:.3f} (real vs real: "
          f"{s['frechet_distance_real_vs_real']:.3f}); total {run.metrics['total_wall_s']:.0f}s")
    print(f"outputs in {run.out}{os.sep}: samples.png, denoise.gif, samples.npz, metrics.json")


if __name__ == "__main__":
    try:
        start_ranks(sys.argv[1:])
        main()
    except JobError as err:
        sys.exit(f"mnist_digits: {err}")
