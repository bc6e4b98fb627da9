"""A SigLIP-family ViT in plain PyTorch: conv patches, learned positions, pre-norm blocks.

Names follow `SiglipVisionModel.vision_model` so that loading is a prefix rename. `forward`
returns the block outputs at the requested taps, so any layer's features can feed LaVi.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import VisionConfig


class Embeddings(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.num_patches, c.hidden_size)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (N, d, h, w)
        x = x.flatten(2).transpose(1, 2)  # (N, P, d)
        return x + self.position_embedding.weight[None]


class SelfAttention(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.heads = c.num_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        n, p, d = x.shape
        q, k, v = (proj(x).view(n, p, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (N, H, P, Dh)
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional
        return self.out_proj(y.transpose(1, 2).reshape(n, p, d))


class MLP(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SelfAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_layers))


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.config = c
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels: Tensor, taps: list[int] | None = None) -> tuple[Tensor, list[Tensor]]:
        """pixels (N, 3, S, S), normalised -> (post-norm last hidden (N, P, d), [block output at each tap]).

        Only the layers up to the deepest tap run when `taps` is given without needing the last one.
        """
        x = self.embeddings(pixels)
        want = set(taps or [])
        last = max(want) if want else len(self.encoder.layers) - 1
        tapped: dict[int, Tensor] = {}
        for i, layer in enumerate(self.encoder.layers[: last + 1]):
            x = layer(x)
            if i in want:
                tapped[i] = x
        final = self.post_layernorm(x) if last == len(self.encoder.layers) - 1 else x
        return final, [tapped[i] for i in (taps or [])]
