"""The models of Stable Diffusion, small enough for MNIST: VAE, text/image CLIP, UNet, and a digit classifier."""

from .blocks import (
    BasicTransformerBlock,
    Downsample2D,
    DownBlock2D,
    FeedForward,
    MidBlock2D,
    ResnetBlock2D,
    SpatialAttention,
    Transformer2DModel,
    Upsample2D,
    UpBlock2D,
)
from .classifier import DigitClassifier
from .clip import CLIPModel, CLIPTextModel, CLIPVisionModel
from .unet import UNet2DConditionModel, timestep_embedding
from .vae import AutoencoderKL, DiagonalGaussian

__all__ = [
    "AutoencoderKL", "DiagonalGaussian", "CLIPModel", "CLIPTextModel", "CLIPVisionModel", "DigitClassifier",
    "UNet2DConditionModel", "timestep_embedding", "ResnetBlock2D", "Downsample2D", "Upsample2D",
    "SpatialAttention", "FeedForward", "BasicTransformerBlock", "Transformer2DModel", "DownBlock2D",
    "MidBlock2D", "UpBlock2D",
]  # fmt: skip
