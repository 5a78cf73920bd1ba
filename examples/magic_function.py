"""The "magic function": the first idea of the lesson, runnable.

Suppose we had a function f(x) = p(x is a handwritten digit d) for an image x.
Then we could *make* digits: start from a noisy image, ask how p changes when
each pixel changes (the gradient of log p with respect to the pixels), nudge
every pixel a little that way, and repeat. Here f is a small trained classifier
(DigitClassifier), and we compute its gradient two ways:

  finite differences   nudge one pixel by +-eps and run f again:
                       df/dx_i ~ (f(x + eps e_i) - f(x - eps e_i)) / 2 eps,
                       two forward passes per pixel, 2048 for a 32x32 image;
  backward()           one forward and one backward pass give every pixel's
                       derivative at once (the chain rule, run in reverse).

They agree, and backward() is hundreds to thousands of times faster: that is
why all of deep learning runs on it. Then we climb, x <- x + step * grad (the
gradient scaled to a fixed size), and watch p(d) rise. (The pixels change in ways that convince the classifier more
than a person; the lesson's answer is to train a model on noisy digits to
predict the noise itself, which is what examples/mnist_digits.py does.)

    python examples/magic_function.py               # uses runs/mnist_digits/classifier.safetensors if there
    python examples/magic_function.py --digit 7 --steps 40 --noise 0.8
    python examples/magic_function.py --quick       # a smoke run in about 20 seconds
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import tinysd  # noqa: E402
import tinysd.nn.functional as F  # noqa: E402
from tinysd import io, optim  # noqa: E402
from tinysd.data import load_mnist, to_float_images  # noqa: E402
from tinysd.gradcheck import numerical_grad  # noqa: E402
from tinysd.models import DigitClassifier  # noqa: E402
from tinysd.training import epoch_batches, train  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/magic_function",
                   help="folder for the PNG, results.json and a trained classifier")
    p.add_argument("--classifier", default="runs/mnist_digits/classifier.safetensors",
                   help="a trained DigitClassifier; when the file is missing one is trained briefly")
    p.add_argument("--digit", type=int, default=3, choices=range(10), help="whose probability to raise")
    p.add_argument("--images", type=at_least(1), default=4, help="how many noisy digits to start from")
    p.add_argument("--steps", type=at_least(0), default=20, help="pixel-gradient steps")
    p.add_argument("--step-size", type=float, default=0.02,
                   help="how far the pixels move per step (root-mean-square, in the [-1, 1] pixel scale)")
    p.add_argument("--noise", type=float, default=0.6, help="std of the Gaussian noise added to the starting digits")
    p.add_argument("--check-images", type=at_least(1), default=2,
                   help="how many of them get their gradient checked by finite differences")
    p.add_argument("--quick", action="store_true", help="tiny training budget, a few pixels checked: about 20 seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return p.parse_args(argv)


def at_least(minimum):
    """An argparse type: an integer no smaller than `minimum`."""

    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


# ---- f: the classifier -----------------------------------------------------------------------------
def get_classifier(args, out):
    """The main job's classifier if its file is there, else one trained for a short budget (saved to --out)."""
    model = DigitClassifier().to(args.device)
    path = Path(args.classifier)
    if path.exists():
        model.load_state_dict(io.load_file(path))
        print(f"loaded the classifier from {path}")
    else:
        accuracy = train_classifier(model, args)
        path = out / "classifier.safetensors"
        io.save_file(model.state_dict(), path, metadata={"test_accuracy": str(accuracy)})
        print(f"no classifier at {args.classifier}: trained one ({accuracy:.1%} test accuracy), saved to {path}")
    return model.eval()


def train_classifier(model, args):
    """Cross-entropy training with AdamW; returns the test accuracy."""
    steps, batch, n_train, n_test = (30, 64, 2048, 500) if args.quick else (300, 128, None, None)
    images, labels = load_mnist("train")
    images, labels = images[:n_train], labels[:n_train]
    x = to_float_images(images)  # (N, 1, 32, 32) in [-1, 1]

    def loss_fn(idx):
        logits = model(tinysd.tensor(x[idx], device=args.device))
        return F.cross_entropy(logits, tinysd.tensor(labels[idx], device=args.device))

    opt = optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    train(model, opt, loss_fn, epoch_batches(len(x), batch, args.seed), steps,
          lr_at=lambda step: optim.warmup_cosine_lr(step, 3e-3, max(1, steps // 20), steps),
          desc="classifier", batch_size=batch)
    model.eval()
    test_images, test_labels = load_mnist("test")
    test_x = to_float_images(test_images[:n_test])
    with tinysd.no_grad():
        predicted = np.concatenate([model(tinysd.tensor(test_x[i : i + 500], device=args.device)).numpy().argmax(1)
                                    for i in range(0, len(test_x), 500)])
    return float((predicted == test_labels[: len(predicted)]).mean())


def log_prob(model, x, digit):
    """log f(x) = log p(digit | x) for each image: (B, 1, 32, 32) -> (B,).

    We follow the gradient of log p rather than p: where p is tiny, p's
    gradient is tiny too, but log p's is not.
    """
    return F.log_softmax(model(x), dim=1)[:, digit]


# ---- the gradient, two ways ------------------------------------------------------------------------
def compare_gradients(model, images, digit, device, pixels=None, seed=0):
    """d log p / d pixels by finite differences and by backward(), in float64, image by image.

    pixels: how many pixels per image to check by finite differences (None: all).
    Returns the largest error relative to the gradient's size, and the timings.
    """
    model64 = DigitClassifier().to(device)
    model64.load_state_dict(model.state_dict())
    model64.double().eval()  # float64: finite differences with eps 1e-6 need it
    rng = np.random.default_rng(seed)

    def log_p_of(x):
        with tinysd.no_grad():
            return log_prob(model64, tinysd.tensor(x[None], device=device), digit)

    def log_p_and_grad(x):
        xt = tinysd.tensor(x[None], requires_grad=True, device=device)
        log_prob(model64, xt, digit).backward()
        return xt.grad.numpy()[0]

    log_p_and_grad(images[0].astype(np.float64))  # warm up: compiles the float64 kernels
    errors, fd_seconds, backward_seconds, checked = [], 0.0, 0.0, 0
    for x in images.astype(np.float64):
        t0 = time.perf_counter()
        by_backward = log_p_and_grad(x)
        backward_seconds += time.perf_counter() - t0

        which = np.arange(x.size) if pixels is None else rng.choice(x.size, size=min(pixels, x.size), replace=False)

        def log_p_at(values):  # log p as a function of the checked pixels alone
            z = x.copy()
            z.flat[which] = values
            return log_p_of(z)

        t0 = time.perf_counter()
        by_differences = numerical_grad(log_p_at, x.flat[which])
        fd_seconds += time.perf_counter() - t0
        checked += len(which)

        scale = np.abs(by_differences).max()
        errors.append(np.abs(by_backward.flat[which] - by_differences).max() / scale)

    n_pixels = images[0].size
    fd_full_gradient = fd_seconds / checked * n_pixels  # per image, all pixels (measured when pixels is None)
    backward_per_image = backward_seconds / len(images)
    return {
        "max_relative_error": float(max(errors)),
        "pixels_checked_per_image": checked // len(images),
        "images_checked": len(images),
        "finite_differences_s_per_image": fd_full_gradient,
        "finite_differences_estimated": pixels is not None and checked // len(images) < n_pixels,
        "backward_s_per_image": backward_per_image,
        "speedup": fd_full_gradient / backward_per_image,
    }


# ---- climbing the gradient -------------------------------------------------------------------------
def climb(model, x, digit, steps, step_size, device):
    """x <- x + step_size * g / rms(g), `steps` times, g = d log p(digit | x) / dx per image.

    Dividing by the gradient's root-mean-square keeps the direction and makes
    `step_size` a distance in pixel units, whatever the gradient's scale.
    Returns the images after every step (steps+1, B, 1, 32, 32) and p(digit) (steps+1, B).
    """
    frames, probabilities = [], []
    for step in range(steps + 1):
        xt = tinysd.tensor(x, requires_grad=True, device=device)
        log_p = log_prob(model, xt, digit)
        frames.append(x)
        probabilities.append(np.exp(log_p.numpy()))
        if step == steps:
            break
        # Each image's log p depends only on its own pixels, so the gradient of the
        # sum holds every image's own gradient.
        log_p.sum().backward()
        g = xt.grad.numpy()
        rms = np.sqrt((g**2).mean(axis=(1, 2, 3), keepdims=True)) + 1e-12
        x = (x + step_size * g / rms).astype(np.float32)
    return np.stack(frames), np.stack(probabilities)


def save_strip(path, frames, probabilities, digit, columns=8, scale=3):
    """One row per starting image, one column per shown step, p(digit) under each tile."""
    from PIL import Image, ImageDraw

    steps = len(frames) - 1
    shown = np.unique(np.linspace(0, steps, min(columns, steps + 1)).round().astype(int))
    cell, label_h = 28 * scale, 14
    strip = Image.new("L", (len(shown) * cell, 16 + frames.shape[1] * (cell + label_h)), 255)
    draw = ImageDraw.Draw(strip)
    for c, step in enumerate(shown):
        draw.text((c * cell + 4, 2), f"step {step}", fill=0)
        for r in range(frames.shape[1]):
            pixels = np.clip(frames[step, r, 0, 2:30, 2:30], -1, 1)  # the 28x28 digit, without the padding
            tile = Image.fromarray(((1 - pixels) / 2 * 255).astype(np.uint8))  # dark ink on white
            top = 16 + r * (cell + label_h)
            strip.paste(tile.resize((cell, cell), Image.NEAREST), (c * cell, top))
            draw.text((c * cell + 4, top + cell), f"p({digit})={probabilities[step, r]:.2f}", fill=0)
    with io.atomic_file(path) as f:
        strip.save(f, format="PNG")


def noisy_digits(n, noise, seed):
    """n test digits (different ones, in [-1, 1]) plus Gaussian noise of std `noise`."""
    images, labels = load_mnist("test")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(images), size=n, replace=False)
    x = to_float_images(images[picked])
    return (x + noise * rng.standard_normal(x.shape)).astype(np.float32), labels[picked]


def main(argv=None):
    args = parse_args(argv)
    tinysd.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = get_classifier(args, out)
    x, labels = noisy_digits(args.images, args.noise, args.seed)
    print(f"start: noisy test digits {labels.tolist()} (noise std {args.noise}); raising p({args.digit})")

    check = compare_gradients(model, x[: args.check_images], args.digit, args.device,
                              pixels=16 if args.quick else None, seed=args.seed)
    estimated = " (estimated from the pixels checked)" if check["finite_differences_estimated"] else ""
    print(f"gradient of log p({args.digit}) w.r.t. the pixels, {check['images_checked']} image(s), "
          f"{check['pixels_checked_per_image']} pixels each, float64:")
    print(f"  finite differences vs backward(): max relative error {check['max_relative_error']:.2e}")
    print(f"  time per image: finite differences {check['finite_differences_s_per_image']:.3f}s{estimated}, "
          f"backward() {check['backward_s_per_image'] * 1e3:.2f}ms: {check['speedup']:.0f}x faster")

    frames, probabilities = climb(model, x, args.digit, args.steps, args.step_size, args.device)
    print(f"climbing {args.steps} steps of size {args.step_size}: p({args.digit}) per image")
    print("  start " + " ".join(f"{p:.3f}" for p in probabilities[0]))
    print("  end   " + " ".join(f"{p:.3f}" for p in probabilities[-1]))
    print("  mean over the images, step by step: " + " ".join(f"{p:.2f}" for p in probabilities.mean(axis=1)))
    png = out / "magic_function.png"
    save_strip(png, frames, probabilities, args.digit)
    results = {**check, "digit": args.digit, "labels": labels.tolist(), "p_start": probabilities[0].tolist(),
               "p_end": probabilities[-1].tolist(), "p_mean_per_step": probabilities.mean(axis=1).tolist()}
    io.write_json(out / "results.json", results)
    print(f"outputs in {out}: {png.name}, results.json")
    return {**results, "png": str(png)}


if __name__ == "__main__":
    main()
