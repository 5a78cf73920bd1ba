"""Neural-network building blocks: `tinysd.nn.functional` (ops), `tinysd.nn.init`, and the Modules."""

from . import functional, init
from .modules import (
    Attention,
    AvgPool2d,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Embedding,
    Flatten,
    GELU,
    GroupNorm,
    Identity,
    LayerNorm,
    Linear,
    MaxPool2d,
    Module,
    ModuleDict,
    ModuleList,
    Parameter,
    ReLU,
    Sequential,
    SiLU,
    Sigmoid,
    Tanh,
    Upsample,
)
