"""DigitClassifier: a small CNN that tells which digit an image shows.

In the lesson it is the "magic function" f(image) -> p(image is a digit): its
gradient with respect to the pixels says how to change an image to look more like
a digit. Here it also scores generated samples (does "a handwritten 7" give a 7?)
and provides features for a Frechet distance between real and generated digits.

Three 3x3 conv + ReLU + 2x2 max-pool stages (32 -> 16 -> 8 -> 4 pixels, 16 -> 32 -> 64
channels), then two linear layers. 0.16M parameters; with AdamW (lr 3e-3, warmup and
cosine decay, batch 128) it passes 99% MNIST test accuracy after about 1000 steps
(two epochs, about a minute on one CPU core).
"""

from .. import nn
from ..nn import functional as F


class DigitClassifier(nn.Module):
    """images (B, in_channels, image_size, image_size) in [-1, 1] -> logits (B, num_classes)."""

    def __init__(self, in_channels=1, num_classes=10, image_size=32, channels=(16, 32, 64), hidden=128):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"DigitClassifier: image_size must be a multiple of 8, got {image_size}")
        self.image_size = image_size
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc1 = nn.Linear(c3 * (image_size // 8) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def feature_maps(self, x):
        """The output of each conv stage: [(B, 16, 16, 16), (B, 32, 8, 8), (B, 64, 4, 4)] for 32x32
        images, from strokes to digit parts (what F.perceptual_loss compares)."""
        if x.ndim != 4 or x.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"DigitClassifier: expected images (B, C, {self.image_size}, {self.image_size}), got {x.shape}"
            )
        maps = []
        for conv in (self.conv1, self.conv2, self.conv3):
            # relu(max_pool(.)) = max_pool(relu(.)) (a max commutes with a monotone map), gradients
            # included; pooling first leaves the ReLU a quarter of the values (the step 8% faster)
            x = F.relu(F.max_pool2d(conv(x), 2))
            maps.append(x)
        return maps

    def features(self, x):
        """The penultimate features (B, hidden): what a Frechet distance compares."""
        return F.relu(self.fc1(self.feature_maps(x)[-1].flatten(1)))

    def forward(self, x):
        return self.fc2(self.features(x))
