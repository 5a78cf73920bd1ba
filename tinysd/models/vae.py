"""AutoencoderKL: the VAE that moves diffusion from pixels into a small latent space.

The encoder squeezes an image through stride-2 convolutions into a grid of
"latents" (MNIST: 1x32x32 -> 4x8x8, 16x fewer numbers); the decoder mirrors it,
upsampling back to pixels. Diffusion then runs on latents, which is much cheaper.

The encoder does not output one latent but a Gaussian q(z|x) = N(mean, exp(logvar)),
one per latent element. Training minimises

    loss = ||decode(z) - x||^2  +  beta * KL(q(z|x) || N(0, I)),      z ~ q(z|x)

The reconstruction term makes z informative; the small KL term keeps the latent
space smooth and roughly unit-scaled (the "KL" of the name). Latents are multiplied
by `scaling_factor` (1 / their standard deviation over the data, see
`estimate_scaling_factor`) before diffusion sees them, and divided by it before
decoding, so the diffusion model works with unit-variance latents.
"""

import numpy as np

from .. import nn, ops
from ..nn import functional as F
from ..tensor import Tensor, no_grad, randn
from .blocks import DownBlock2D, MidBlock2D, SpatialAttention, UpBlock2D


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) from the encoder's (B, 2C, H, W) output."""

    def __init__(self, parameters):
        self.mean, logvar = ops.chunk(parameters, 2, dim=1)
        self.logvar = ops.clamp(logvar, -30.0, 20.0)  # keeps exp() finite early in training
        self.std = ops.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        """z = mean + std * eps, eps ~ N(0, I) (the reparameterisation trick: differentiable in mean and std).

        `generator`: a numpy.random.Generator (default: tinysd's global one)."""
        eps = randn(*self.mean.shape, dtype=self.mean.dtype, device=self.mean.device, generator=generator)
        return self.mean + self.std * eps

    def mode(self):
        """The most likely latent: the mean."""
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar), summed per image, averaged over the batch."""
        return F.gaussian_kl(self.mean, self.logvar)


class Encoder(nn.Module):
    """conv_in -> down_blocks (resnets, stride-2 downsample between levels) -> mid_block -> norm, SiLU, conv_out."""

    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, groups, mid_block_attention,
                 downsample_padding=1):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        blocks, channels = [], block_out_channels[0]
        for i, out in enumerate(block_out_channels):
            last = i == len(block_out_channels) - 1
            blocks.append(DownBlock2D(channels, out, layers_per_block, groups=groups, add_downsample=not last,
                                      downsample_padding=downsample_padding))
            channels = out
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock2D(channels, groups=groups, attention=_attention(channels, groups, mid_block_attention))
        self.conv_norm_out = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x, _ = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, with_silu=True))


class Decoder(nn.Module):
    """conv_in -> mid_block -> up_blocks (layers_per_block + 1 resnets, nearest 2x upsample) -> norm, SiLU, conv_out."""

    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, groups, mid_block_attention):
        super().__init__()
        reversed_channels = list(reversed(block_out_channels))
        channels = reversed_channels[0]
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.mid_block = MidBlock2D(channels, groups=groups, attention=_attention(channels, groups, mid_block_attention))
        blocks = []
        for i, out in enumerate(reversed_channels):
            last = i == len(reversed_channels) - 1
            blocks.append(UpBlock2D(channels, out, layers_per_block + 1, groups=groups, add_upsample=not last))
            channels = out
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, with_silu=True))


def _attention(channels, groups, enabled):
    return SpatialAttention(channels, heads=1, groups=groups) if enabled else None


class AutoencoderKL(nn.Module):
    """Images (B, in_channels, H, W) <-> latents (B, latent_channels, H/f, W/f), f = 2**(levels - 1).

    The default is sized for MNIST padded to 32x32: 1x32x32 <-> 4x8x8, 0.17M parameters, with
    few channels where the images are large (8 at 32x32, 16 at 16x16, 32 at 8x8): trained
    with AdamW (lr 2e-3, batch 32, KL weight 1e-4) it reaches about 24 dB PSNR on MNIST test
    digits in 100 s on one CPU core.
    Images are expected in [-1, 1] (what `tinysd.data.to_float_images` gives).
    downsample_padding=0 pads the encoder's stride-2 convs on the right and bottom only, as
    diffusers' (Stable Diffusion's) VAE does; the default 1 pads every side.

        posterior = vae.encode(x)                      # DiagonalGaussian
        z = posterior.sample() * vae.scaling_factor     # latents for diffusion
        x_hat = vae.decode(z / vae.scaling_factor)
    """

    def __init__(self, in_channels=1, out_channels=1, block_out_channels=(8, 16, 32), layers_per_block=1,
                 latent_channels=4, norm_num_groups=4, mid_block_attention=True, scaling_factor=1.0,
                 downsample_padding=1):
        super().__init__()
        for c in block_out_channels:
            if c % norm_num_groups:
                raise ValueError(
                    f"AutoencoderKL: block_out_channels {tuple(block_out_channels)} must be multiples of "
                    f"norm_num_groups={norm_num_groups}"
                )
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.downscale_factor = 2 ** (len(block_out_channels) - 1)
        self.scaling_factor = float(scaling_factor)
        args = (block_out_channels, layers_per_block, norm_num_groups, mid_block_attention)
        self.encoder = Encoder(in_channels, 2 * latent_channels, *args, downsample_padding=downsample_padding)
        self.decoder = Decoder(latent_channels, out_channels, *args)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    def encode(self, x):
        """x (B, C, H, W) -> DiagonalGaussian over latents (B, latent_channels, H/f, W/f)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % self.downscale_factor \
                or x.shape[3] % self.downscale_factor:
            raise ValueError(
                f"AutoencoderKL.encode: expected images (B, {self.in_channels}, H, W) with H and W multiples "
                f"of {self.downscale_factor}, got {x.shape}"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """z (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f) (unscaled latents)."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"AutoencoderKL.decode: expected latents (B, {self.latent_channels}, h, w), got {z.shape}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True, generator=None):
        """Reconstruct x through a sampled (or, with sample_posterior=False, the mean) latent.

        Returns (reconstruction, posterior): the loss needs both, e.g.
        `F.mse_loss(recon, x) + beta * posterior.kl()`.
        """
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def estimate_scaling_factor(self, images, batch_size=256):
        """Set and return scaling_factor = 1 / std of the latent means over `images` (an array or Tensor)."""
        data = images.numpy() if isinstance(images, Tensor) else np.asarray(images)
        device = next(iter(self.parameters())).device
        means = []
        with no_grad():
            for start in range(0, len(data), batch_size):
                batch = Tensor(data[start:start + batch_size]).to(device)
                means.append(self.encode(batch).mean.numpy())
        self.scaling_factor = float(1.0 / np.concatenate(means).std())
        return self.scaling_factor
