"""A small CLIP: a text encoder and an image encoder trained to agree.

CLIP (Radford et al. 2021) maps a caption and an image into the same vector
space. For a batch of N (image, caption) pairs both encoders produce unit vectors,
their dot products form an N x N similarity matrix, and a contrastive loss (InfoNCE,
`F.contrastive_loss`) pushes the matching pairs up and the others down:

    logits = exp(logit_scale) * img_emb @ txt_emb^T
    loss   = (cross_entropy(logits, matches) + cross_entropy(logits^T, matches^T)) / 2

With MNIST captions, many captions in a batch describe the same digit, so the
"matches" are all same-digit pairs (`labels` in `CLIPModel.forward`), not just the diagonal.

Stable Diffusion then uses only the text encoder: the per-token features
(`last_hidden_state`, (B, S, width)) are what the UNet cross-attends to.

Training notes (from our runs): clip the gradient norm at 1.0
(`tinysd.optim.clip_grad_norm_(model.parameters(), 1.0)` after `backward()`), or the
loss can collapse and sit at ln(batch size) (every caption embedded alike); and keep the
token and position embeddings initialised at N(0, 0.02), as CLIP does (N(0, 1) also
collapses).
"""

import math

import numpy as np

from .. import backend, nn, ops
from ..nn import functional as F
from ..tensor import Tensor, no_grad


def _ids_tensor(input_ids, device):
    """Token ids (a Tensor, a NumPy/CuPy array or nested lists) -> an int Tensor on `device`."""
    ids = input_ids
    if not isinstance(ids, Tensor):
        ids = Tensor(ids if backend.is_cupy_array(ids) else np.asarray(ids))
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"CLIPTextModel: input_ids must be integers of shape (batch, seq), got {ids.shape} {ids.dtype}")
    return ids.to(device)


class CLIPTextEmbeddings(nn.Module):
    """token_embedding(ids) + position_embedding(0 .. S-1)."""

    def __init__(self, vocab_size, context_length, width):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(context_length, width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, ids):
        positions = backend.array_module(ids.data).arange(ids.shape[1])
        return self.token_embedding(ids) + self.position_embedding(positions)


def quick_gelu(x):
    """x * sigmoid(1.702 x): OpenAI CLIP's fast approximation of GELU (what Stable
    Diffusion's text encoder was trained with, `hidden_act: quick_gelu`)."""
    return x * ops.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2, per token (4x wider in the middle unless intermediate_size says)."""

    def __init__(self, width, mult=4, intermediate_size=None, hidden_act="gelu"):
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPMLP: hidden_act {hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        inner = intermediate_size or width * mult
        self.act = ACTIVATIONS[hidden_act]
        self.fc1 = nn.Linear(width, inner)
        self.fc2 = nn.Linear(inner, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer with causal self-attention:

        x = x + self_attn(layer_norm1(x), causal)     token i sees tokens 0 .. i only
        x = x + mlp(layer_norm2(x))
    """

    def __init__(self, width, heads, intermediate_size=None, hidden_act="gelu", eps=1e-5):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = nn.Attention(width, heads=heads, dim_head=width // heads, bias=True)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width, intermediate_size=intermediate_size, hidden_act=hidden_act)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x), is_causal=True)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, width, layers, heads, **layer_options):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(width, heads, **layer_options) for _ in range(layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextModel(nn.Module):
    """Token ids (B, S) -> (last_hidden_state (B, S, width), pooled (B, width)).

    `pooled` is the final feature at each caption's EOS token: with causal attention it
    is the only position that has read the whole caption. `text_projection(pooled)`
    is the caption's vector in the shared image-text space. eos_token_id is the
    tokenizer's EOS id (2 in tinysd.tokenizer); every row must contain one.

    To load transformers' CLIPTextModel (Stable Diffusion's text encoder, via
    tinysd.pretrained): intermediate_size (the MLP width, default 4 * width),
    hidden_act="quick_gelu", layer_norm_eps, and projection_dim=None (no text_projection).
    """

    def __init__(self, vocab_size, context_length=16, width=64, layers=2, heads=4, projection_dim=64, eos_token_id=2,
                 intermediate_size=None, hidden_act="gelu", layer_norm_eps=1e-5):
        super().__init__()
        if width % heads:
            raise ValueError(f"CLIPTextModel: width {width} must be divisible by heads {heads}")
        self.context_length, self.width, self.eos_token_id = context_length, width, eos_token_id
        self.embeddings = CLIPTextEmbeddings(vocab_size, context_length, width)
        self.encoder = CLIPEncoder(width, layers, heads, intermediate_size=intermediate_size, hidden_act=hidden_act,
                                   eps=layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.text_projection = nn.Linear(width, projection_dim, bias=False) if projection_dim else None

    def forward(self, input_ids):
        ids = _ids_tensor(input_ids, self.final_layer_norm.weight.device)
        if ids.shape[1] > self.context_length:
            raise ValueError(f"CLIPTextModel: {ids.shape[1]} tokens exceed context_length {self.context_length}")
        hidden = self.final_layer_norm(self.encoder(self.embeddings(ids)))
        is_eos = ids.data == self.eos_token_id
        if not bool(is_eos.any(axis=1).all()):
            raise ValueError(f"CLIPTextModel: every row of input_ids needs an EOS token (id {self.eos_token_id})")
        xp = backend.array_module(ids.data)
        pooled = hidden[xp.arange(ids.shape[0]), is_eos.argmax(axis=1)]
        return hidden, pooled


class CLIPVisionModel(nn.Module):
    """A small CNN: images (B, C, 32, 32) -> (feature map (B, width, 4, 4), pooled (B, width)).

    Three stride-2 convs (32 -> 16 -> 8 -> 4) with GroupNorm and SiLU, average pooling
    over the 4x4 positions, a LayerNorm; `visual_projection(pooled)` is the image's
    vector in the shared space.
    """

    def __init__(self, in_channels=1, width=64, projection_dim=64, groups=8):
        super().__init__()
        c1, c2 = width // 4, width // 2
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GroupNorm(groups, c2), nn.SiLU(),
            nn.Conv2d(c2, width, 3, stride=2, padding=1), nn.GroupNorm(groups, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.post_layernorm = nn.LayerNorm(width)
        self.visual_projection = nn.Linear(width, projection_dim, bias=False)

    def forward(self, pixel_values):
        features = self.encoder(pixel_values)
        return features, self.post_layernorm(features.mean(dim=(2, 3)))


class CLIPModel(nn.Module):
    """The two encoders and a learnable temperature: logit_scale = log(1 / 0.07) at the start.

        loss = clip(input_ids, pixel_values, labels)     # labels: same label = positive pair
        loss.backward(); clip_grad_norm_(clip.parameters(), 1.0); opt.step()
    """

    def __init__(self, text_model=None, vision_model=None, vocab_size=None, context_length=16, projection_dim=64):
        """Give the two encoders, or vocab_size (and context_length) to build the default ones."""
        super().__init__()
        if text_model is None:
            if vocab_size is None:
                raise ValueError("CLIPModel: give a text_model, or vocab_size to build the default one")
            text_model = CLIPTextModel(vocab_size, context_length, projection_dim=projection_dim)
        self.text_model = text_model
        self.vision_model = vision_model or CLIPVisionModel(projection_dim=text_model.text_projection.out_features)
        dims = (self.text_model.text_projection.out_features, self.vision_model.visual_projection.out_features)
        if dims[0] != dims[1]:
            raise ValueError(f"CLIPModel: text projection_dim {dims[0]} and image projection_dim {dims[1]} differ")
        self.logit_scale = nn.Parameter(np.array(math.log(1 / 0.07), dtype=np.float32))

    def get_text_features(self, input_ids):
        """(B, S) ids -> (B, projection_dim) caption vectors (not normalised)."""
        return self.text_model.text_projection(self.text_model(input_ids)[1])

    def get_image_features(self, pixel_values):
        """(B, C, H, W) images -> (B, projection_dim) image vectors (not normalised)."""
        return self.vision_model.visual_projection(self.vision_model(pixel_values)[1])

    def forward(self, input_ids, pixel_values, labels=None, positives=None):
        """The symmetric contrastive loss over the batch (a scalar Tensor).

        labels (B,) (e.g. the digit of each pair): pairs with equal labels all count as
        matches; or positives, the (B, B) bool matrix of matches itself. With neither,
        only pair i <-> i matches.
        """
        image_embeds = self.get_image_features(pixel_values)
        text_embeds = self.get_text_features(input_ids)
        if labels is not None:
            if positives is not None:
                raise ValueError("CLIPModel: give labels or positives, not both")
            labels = labels.numpy() if isinstance(labels, Tensor) else backend.to_device(labels, "cpu")
            positives = np.asarray(labels)[:, None] == np.asarray(labels)[None, :]
        if positives is not None:
            positives = backend.to_device(positives.data if isinstance(positives, Tensor) else positives,
                                          image_embeds.device)
        return F.contrastive_loss(image_embeds, text_embeds, self.logit_scale, positives)

    def similarity(self, pixel_values, input_ids):
        """Cosine similarities (N_images, N_texts) as a NumPy array, computed without gradients."""
        with no_grad():
            img = self.get_image_features(pixel_values)
            txt = self.get_text_features(input_ids)
            img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
            return ops.matmul(img, txt.T).numpy()

    def zero_shot_classify(self, images, prompts, tokenizer=None):
        """For each image, the index of the prompt it matches best (NumPy int array (N_images,)).

        prompts: token ids (P, S), or a list of strings together with `tokenizer`; e.g.
        [f"a handwritten digit {w}" for w in DIGIT_WORDS] classifies digits with no classifier training.
        """
        if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str):
            if tokenizer is None:
                raise ValueError("CLIPModel.zero_shot_classify: string prompts need tokenizer=")
            prompts = tokenizer(list(prompts))
        images = images if isinstance(images, Tensor) else Tensor(np.asarray(images, dtype=np.float32))
        return self.similarity(images.to(self.logit_scale.device), prompts).argmax(axis=1)
