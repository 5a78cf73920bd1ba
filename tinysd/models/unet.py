"""UNet2DConditionModel: predicts the noise in a noisy latent, given the timestep and a condition.

Training (the lesson): take clean latents x_0, draw noise eps and a timestep t,
make x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and minimise
||unet(x_t, t, condition) - eps||^2. Sampling then removes the predicted noise
step by step (tinysd.schedulers).

The shape is a U: a downsampling path (down_blocks) that halves the resolution and
widens the channels at each level, a bottleneck (mid_block), and an upsampling path
(up_blocks) that mirrors it and concatenates, at every step, the matching feature map
saved on the way down (the skip connections keep the fine detail).

Conditioning enters in two ways:
  * the timestep t: a sinusoidal embedding (time_proj), an MLP (time_embedding), added
    to the features inside every ResnetBlock2D;
  * the condition: with `num_class_embeds`, a learned vector per class label (the
    lesson's one-hot digit guidance: an Embedding lookup is one_hot(label) @ W) added to
    the time embedding; with `cross_attention_dim`, text embeddings (B, S, D) that every
    pixel attends to in the transformer blocks (cross-attention). Either, or both.
"""

import math

import numpy as np

from .. import backend, nn
from ..tensor import Tensor
from .blocks import DownBlock2D, MidBlock2D, Transformer2DModel, UpBlock2D


def timestep_embedding(timesteps, dim, flip_sin_to_cos=True, downscale_freq_shift=0.0, max_period=10000.0):
    """Sinusoidal embedding of integer timesteps (an array (B,)) -> array (B, dim), as in diffusers:

        freq_k = max_period ** (-k / (half - shift)),  k = 0 .. half-1,  half = dim // 2
        emb = [sin(t freq), cos(t freq)]  (or [cos, sin] with flip_sin_to_cos)

    Nearby timesteps get nearby vectors; low frequencies tell far-apart ones apart.
    """
    xp = backend.array_module(timesteps)
    half = dim // 2
    exponent = -math.log(max_period) * xp.arange(half, dtype=np.float64) / (half - downscale_freq_shift)
    angles = timesteps.astype(np.float64)[:, None] * xp.exp(exponent)[None, :]
    sin, cos = xp.sin(angles), xp.cos(angles)
    emb = xp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=1)
    if dim % 2:
        emb = xp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nn.Module):
    """time_proj: timesteps (B,) -> sinusoidal features (B, num_channels). No parameters."""

    def __init__(self, num_channels, flip_sin_to_cos=True, downscale_freq_shift=0.0):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos, self.shift = num_channels, flip_sin_to_cos, downscale_freq_shift

    def forward(self, timesteps):
        return Tensor(timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.shift))


class TimestepEmbedding(nn.Module):
    """time_embedding: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels, time_embed_dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class UNet2DConditionModel(nn.Module):
    """Noise prediction eps_theta(sample, t, condition) with the shape of `sample`.

    block_out_channels[i]: channels at level i (resolution / 2**i).
    layers_per_block: resnets per down level (the up levels have one more).
    attention_levels[i]: put a Transformer2DModel after each resnet of level i (the mid
        block gets one when any level has one). attention_head_dim: channels per head,
        unless num_attention_heads gives the head COUNT (an int, or one per level; Stable
        Diffusion 1's 8 heads everywhere, which its config calls attention_head_dim=8).
    cross_attention_dim: width of encoder_hidden_states (text); None for no cross-attention.
    num_class_embeds: number of class labels (e.g. 10 digits, or 11 with a "no digit"
        label for classifier-free guidance); None for none.
    ff_mult, gated_ff: the transformer's feed-forward width multiplier and GEGLU vs GELU.
    norm_eps: the GroupNorm epsilon of the resnets and of conv_norm_out (SD: 1e-5).
    use_linear_projection: Linear (True) or 1x1-conv (False, SD 1) proj_in/proj_out.
    flip_sin_to_cos, freq_shift: the sinusoidal timestep embedding's layout (see timestep_embedding).

    The default, for 4x8x8 MNIST latents (levels at 8x8 and 4x4) and 64-wide text embeddings,
    has about 0.96M parameters; block_out_channels=(64, 128) gives 3.7M (and ~4x the compute).
    """

    def __init__(self, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 cross_attention_dim=64, attention_head_dim=16, norm_num_groups=8, attention_levels=None,
                 num_class_embeds=None, transformer_layers=1, ff_mult=2, gated_ff=True, zero_init_out=True,
                 num_attention_heads=None, norm_eps=1e-6, use_linear_projection=True, flip_sin_to_cos=True,
                 freq_shift=0.0):
        super().__init__()
        levels = len(block_out_channels)
        attention_levels = tuple(attention_levels) if attention_levels is not None else (True,) * levels
        if len(attention_levels) != levels:
            raise ValueError(
                f"UNet2DConditionModel: attention_levels {attention_levels} needs one entry per level of "
                f"block_out_channels {tuple(block_out_channels)}"
            )
        if num_attention_heads is None:
            heads = tuple(c // attention_head_dim for c in block_out_channels)
        else:
            heads = (num_attention_heads,) * levels if isinstance(num_attention_heads, int) \
                else tuple(num_attention_heads)
        if len(heads) != levels or any(h < 1 or c % h for c, h in zip(block_out_channels, heads)):
            raise ValueError(
                f"UNet2DConditionModel: {heads} heads do not divide block_out_channels {tuple(block_out_channels)} "
                "level by level"
            )
        for c in block_out_channels:
            if c % norm_num_groups or (num_attention_heads is None and c % attention_head_dim):
                raise ValueError(
                    f"UNet2DConditionModel: block_out_channels {tuple(block_out_channels)} must be multiples of "
                    f"norm_num_groups={norm_num_groups} and attention_head_dim={attention_head_dim}"
                )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.cross_attention_dim, self.num_class_embeds = cross_attention_dim, num_class_embeds
        groups = norm_num_groups

        def attention_at(level):
            def attention(channels):
                return Transformer2DModel(channels, heads[level], channels // heads[level], cross_attention_dim,
                                          groups, transformer_layers, ff_mult, gated_ff, use_linear_projection)
            return attention

        time_embed_dim = block_out_channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)
        self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds else None

        down, channels, skip_channels = [], block_out_channels[0], [block_out_channels[0]]
        for i, out in enumerate(block_out_channels):
            last = i == levels - 1
            down.append(DownBlock2D(channels, out, layers_per_block, time_embed_dim, groups, add_downsample=not last,
                                    make_attention=attention_at(i) if attention_levels[i] else None, eps=norm_eps))
            skip_channels += [out] * (layers_per_block + (0 if last else 1))
            channels = out
        self.down_blocks = nn.ModuleList(down)

        self.mid_block = MidBlock2D(channels, time_embed_dim, groups,
                                    attention_at(levels - 1)(channels) if any(attention_levels) else None, norm_eps)

        up = []
        for i, out in enumerate(reversed(block_out_channels)):
            last = i == levels - 1
            skips = [skip_channels.pop() for _ in range(layers_per_block + 1)]
            up.append(UpBlock2D(channels, out, layers_per_block + 1, time_embed_dim, groups, add_upsample=not last,
                                make_attention=attention_at(levels - 1 - i) if attention_levels[levels - 1 - i] else None,
                                skip_channels=skips, eps=norm_eps))
            channels = out
        self.up_blocks = nn.ModuleList(up)

        self.conv_norm_out = nn.GroupNorm(groups, channels, eps=norm_eps)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)
        if zero_init_out:  # start by predicting 0: the first steps do not fight a random output
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def _timesteps(self, timestep, sample):
        """int, float, array or Tensor (scalar or (B,)) -> float array (B,) on the sample's device."""
        t = timestep.data if isinstance(timestep, Tensor) else timestep
        t = backend.to_device(np.asarray(t) if not backend.is_cupy_array(t) else t, sample.device)
        xp = backend.array_module(t)
        t = xp.asarray(t).reshape(-1)
        batch = sample.shape[0]
        if t.size == 1:
            t = xp.broadcast_to(t, (batch,))
        if t.shape != (batch,):
            raise ValueError(f"UNet2DConditionModel: timestep of shape {t.shape} for a batch of {batch} samples")
        return t

    def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None):
        """sample (B, in_channels, H, W), timestep (int or (B,)), encoder_hidden_states (B, S,
        cross_attention_dim), class_labels (B,) int -> noise prediction (B, out_channels, H, W), a Tensor.

        H and W must be multiples of 2**(levels - 1).
        """
        self._check_inputs(sample, encoder_hidden_states, class_labels)

        # 1. time (and class) embedding: t -> sinusoidal features -> MLP, added inside every resnet
        temb = self.time_proj(self._timesteps(timestep, sample)).to(sample.dtype)
        temb = self.time_embedding(temb)
        if self.class_embedding is not None:
            labels = class_labels if isinstance(class_labels, Tensor) else Tensor(np.asarray(class_labels))
            temb = temb + self.class_embedding(labels.to(sample.device).long())

        # 2. down: conv_in, then per level resnets (+ attention) and, but at the last, a stride-2 downsample;
        #    every output is kept as a skip
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, encoder_hidden_states)
            skips += block_skips
        # 3. mid: resnet, attention, resnet at the lowest resolution
        x = self.mid_block(x, temb, encoder_hidden_states)
        # 4. up: per level, resnets on [x, skip] concatenated (+ attention), then, but at the last, an upsample
        for block in self.up_blocks:
            x = block(x, skips, temb, encoder_hidden_states)
        # 5. out: GroupNorm, SiLU, conv back to the sample's channels
        return self.conv_out(self.conv_norm_out(x, with_silu=True))

    def _check_inputs(self, sample, encoder_hidden_states, class_labels):
        """Shapes the U can take: clear errors here, so forward reads as the five steps."""
        factor = 2 ** (len(self.down_blocks) - 1)
        if sample.ndim != 4 or sample.shape[1] != self.in_channels or sample.shape[2] % factor \
                or sample.shape[3] % factor:
            raise ValueError(
                f"UNet2DConditionModel: expected sample (B, {self.in_channels}, H, W) with H, W multiples of "
                f"{factor}, got {sample.shape}"
            )
        if self.cross_attention_dim and (encoder_hidden_states is None or encoder_hidden_states.ndim != 3
                                         or encoder_hidden_states.shape[0] != sample.shape[0]
                                         or encoder_hidden_states.shape[2] != self.cross_attention_dim):
            got = None if encoder_hidden_states is None else encoder_hidden_states.shape
            raise ValueError(
                f"UNet2DConditionModel: expected encoder_hidden_states ({sample.shape[0]}, S, "
                f"{self.cross_attention_dim}), got {got}"
            )
        if (class_labels is None) != (self.class_embedding is None):
            raise ValueError(
                f"UNet2DConditionModel: class_labels must be given exactly when num_class_embeds is set "
                f"(num_class_embeds={self.num_class_embeds}, class_labels given: {class_labels is not None})"
            )
