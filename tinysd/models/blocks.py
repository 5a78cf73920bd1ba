"""Building blocks shared by the UNet and the VAE.

Attribute names follow diffusers, so `state_dict()` keys read like a diffusers
checkpoint ("down_blocks.0.resnets.1.conv1.weight", "...attentions.0.
transformer_blocks.0.attn2.to_k.weight"). Everything works on NCHW feature maps.

    ResnetBlock2D        two 3x3 convs with GroupNorm + SiLU, a residual path and
                         (in the UNet) the timestep embedding added in between
    Downsample2D         a stride-2 3x3 conv: H, W -> H/2, W/2
    Upsample2D           nearest-neighbour x2, then a 3x3 conv
    SpatialAttention     GroupNorm, then attention among the H*W pixels (the VAE's)
    Transformer2DModel   GroupNorm, pixels -> tokens, BasicTransformerBlocks
                         (self-attention, cross-attention to text, feed-forward), back
    DownBlock2D, MidBlock2D, UpBlock2D
                         the stages of an encoder/decoder built from the above
"""

from .. import nn, ops
from ..nn import functional as F


class ResnetBlock2D(nn.Module):
    """out = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))

    `temb` (B, temb_channels) is the timestep embedding; it becomes a per-channel
    shift of the hidden features, so one set of weights can act differently at
    every noise level. The shortcut is a 1x1 conv when the channel count changes.
    """

    def __init__(self, in_channels, out_channels=None, temb_channels=None, groups=32, eps=1e-6, dropout=0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, temb=None):
        h = self.conv1(self.norm1(x, with_silu=True))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D: this block was built with temb_channels, so it needs temb")
            h = h + self.time_emb_proj(F.silu(temb)).reshape(temb.shape[0], h.shape[1], 1, 1)
        h = self.conv2(self.dropout(self.norm2(h, with_silu=True)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample2D(nn.Module):
    """A learned 2x downsampling: 3x3 conv with stride 2.

    padding=1 pads every side by 1. padding=0 is how diffusers' (and Stable Diffusion's)
    VAE encoder does it: pad one zero row and column at the bottom and right only, then
    convolve without padding. Same output size, shifted by half a pixel.
    """

    def __init__(self, channels, out_channels=None, padding=1):
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"Downsample2D: padding must be 1 (every side) or 0 (right/bottom only), got {padding}")
        self.asymmetric = padding == 0
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """2x upsampling: repeat each pixel 2x2 (nearest), then a 3x3 conv to smooth the blocks."""

    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _to_tokens(x):
    """(B, C, H, W) -> (B, H*W, C): every pixel becomes one token."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2)


def _to_image(tokens, shape):
    """(B, H*W, C) -> (B, C, H, W), the inverse of _to_tokens."""
    b, c, h, w = shape
    return tokens.transpose(1, 2).reshape(b, c, h, w)


class SpatialAttention(nn.Attention):
    """x + Attention(GroupNorm(x)) over the H*W pixels of a feature map (the VAE's mid-block).

    It is an `nn.Attention` (to_q, to_k, to_v, to_out) plus a `group_norm`, as in
    diffusers' VAE checkpoints.
    """

    def __init__(self, channels, heads=1, groups=32, eps=1e-6):
        super().__init__(channels, heads=heads, dim_head=channels // heads, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x, encoder_hidden_states=None):
        tokens = super().forward(_to_tokens(self.group_norm(x)), encoder_hidden_states)
        return x + _to_image(tokens, x.shape)


class GELUProjection(nn.Module):
    """The first layer of the feed-forward: proj = Linear, then GELU.

    gated=True is GEGLU (Shazeer 2020, used by Stable Diffusion): proj makes 2 * dim_out
    features, split into a value a and a gate g, and the output is a * gelu(g).
    """

    def __init__(self, dim_in, dim_out, gated=True):
        super().__init__()
        self.gated = gated
        self.proj = nn.Linear(dim_in, dim_out * 2 if gated else dim_out)

    def forward(self, x):
        h = self.proj(x)
        return F.geglu(h) if self.gated else F.gelu(h)


class FeedForward(nn.Module):
    """Per-token MLP: Linear(dim, mult*dim) + GELU or GEGLU, dropout, Linear back to dim.

    Kept in `net` (a list) so the keys read "ff.net.0.proj.weight", "ff.net.2.weight".
    """

    def __init__(self, dim, mult=4, gated=True, dropout=0.0):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.ModuleList([GELUProjection(dim, inner, gated), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block on tokens (B, S, dim):

        x = x + attn1(norm1(x))                              self-attention among pixels
        x = x + attn2(norm2(x), encoder_hidden_states)       cross-attention: pixels query the text
        x = x + ff(norm3(x))

    Without cross_attention_dim there is no norm2/attn2 (self-attention only).
    """

    def __init__(self, dim, heads, dim_head, cross_attention_dim=None, ff_mult=4, gated_ff=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = nn.Attention(dim, heads=heads, dim_head=dim_head)
        self.norm2 = nn.LayerNorm(dim) if cross_attention_dim else None
        self.attn2 = (
            nn.Attention(dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=dim_head)
            if cross_attention_dim else None
        )
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_mult, gated=gated_ff)

    def forward(self, x, encoder_hidden_states=None):
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            if encoder_hidden_states is None:
                raise ValueError(
                    "BasicTransformerBlock: built with cross-attention, so it needs encoder_hidden_states "
                    "(B, S, cross_attention_dim)"
                )
            x = x + self.attn2(self.norm2(x), encoder_hidden_states)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Attention on a feature map: x + proj_out(blocks(proj_in(GroupNorm(x) as tokens))).

    Each of the H*W pixels is a token of `channels` features. use_linear_projection=True
    projects the tokens with Linear layers (Stable Diffusion 2); False uses 1x1 convolutions
    on the feature map (Stable Diffusion 1, weights (inner, channels, 1, 1)): the same map
    per pixel, stored in another shape.
    """

    def __init__(self, channels, heads, dim_head, cross_attention_dim=None, groups=32, num_layers=1,
                 ff_mult=4, gated_ff=True, use_linear_projection=True):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear_projection else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, ff_mult, gated_ff)
            for _ in range(num_layers)
        ])
        self.proj_out = nn.Linear(inner, channels) if use_linear_projection else nn.Conv2d(inner, channels, 1)

    def forward(self, x, encoder_hidden_states=None):
        if self.use_linear_projection:
            h = self.proj_in(_to_tokens(self.norm(x)))
        else:
            h = _to_tokens(self.proj_in(self.norm(x)))
        for block in self.transformer_blocks:
            h = block(h, encoder_hidden_states)
        b, _, height, width = x.shape
        if self.use_linear_projection:
            return x + _to_image(self.proj_out(h), x.shape)
        return x + self.proj_out(_to_image(h, (b, h.shape[2], height, width)))


class DownBlock2D(nn.Module):
    """One encoder stage: `num_layers` x (ResnetBlock2D [+ attention]), then an optional Downsample2D.

    forward returns the output and the list of intermediate feature maps (the UNet's
    skip connections): one per resnet, plus the downsampled one.
    `make_attention(channels)` builds the attention module after each resnet (None: none).
    """

    def __init__(self, in_channels, out_channels, num_layers=1, temb_channels=None, groups=32,
                 add_downsample=True, make_attention=None, eps=1e-6, downsample_padding=1):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
            for i in range(num_layers)
        ])
        self.attentions = nn.ModuleList([make_attention(out_channels) for _ in range(num_layers)]) \
            if make_attention else None
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=downsample_padding)]) \
            if add_downsample else None

    def forward(self, x, temb=None, encoder_hidden_states=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, encoder_hidden_states)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock2D(nn.Module):
    """The bottleneck: resnet, optional attention, resnet, at constant channels and size."""

    def __init__(self, channels, temb_channels=None, groups=32, attention=None, eps=1e-6):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([attention]) if attention is not None else None

    def forward(self, x, temb=None, encoder_hidden_states=None):
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = self.attentions[0](x, encoder_hidden_states)
        return self.resnets[1](x, temb)


class UpBlock2D(nn.Module):
    """One decoder stage: len(skip_channels) or num_layers x (ResnetBlock2D [+ attention]),
    then an optional Upsample2D.

    In the UNet each resnet first concatenates (along channels) one skip feature map
    from the encoder, taken last-in first-out; `skip_channels[i]` is the channel count
    of the one resnet i receives. The VAE decoder has no skips (skip_channels None).
    """

    def __init__(self, in_channels, out_channels, num_layers=1, temb_channels=None, groups=32,
                 add_upsample=True, make_attention=None, skip_channels=None, eps=1e-6):
        super().__init__()
        skip_channels = list(skip_channels) if skip_channels else [0] * num_layers
        if len(skip_channels) != num_layers:
            raise ValueError(f"UpBlock2D: {len(skip_channels)} skip_channels for {num_layers} layers")
        self.resnets = nn.ModuleList([
            ResnetBlock2D((in_channels if i == 0 else out_channels) + skip, out_channels, temb_channels, groups, eps)
            for i, skip in enumerate(skip_channels)
        ])
        self.attentions = nn.ModuleList([make_attention(out_channels) for _ in range(num_layers)]) \
            if make_attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x, skips=None, temb=None, encoder_hidden_states=None):
        """`skips`: a list the block pops its skip feature maps from (consumed in place)."""
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                x = ops.cat([x, skips.pop()], dim=1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, encoder_hidden_states)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x
