"""A SigLIP-family ViT in plain PyTorch: conv patches, learned positions, pre-norm blocks.

Names follow `SiglipVisionModel.vision_model` so that loading is a prefix rename. `forward`
returns the block outputs at the requested taps, so any layer's features can feed LaVi.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lavi.core.config import VisionConfig


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


def pixels_from_frames(frames: list[np.ndarray], mean: tuple[float, ...], std: tuple[float, ...],
                       size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 clips [(F_i, S, S, 3)] -> normalised pixels (N, F_max, 3, S, S) and frame mask (N, F_max)."""
    fmax = max(f.shape[0] for f in frames)
    pixels = torch.zeros(len(frames), fmax, 3, size, size)
    mask = torch.zeros(len(frames), fmax, dtype=torch.bool)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    for i, clip in enumerate(frames):
        if clip.ndim != 4 or clip.shape[1:] != (size, size, 3):
            raise ValueError(f"frames must be (F, {size}, {size}, 3) uint8, got {tuple(clip.shape)}")
        x = torch.from_numpy(np.array(clip, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2).float() / 255.0  # (F, 3, S, S)
        pixels[i, : len(clip)] = (x - m) / s
        mask[i, : len(clip)] = True
    return pixels, mask
