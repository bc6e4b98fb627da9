"""VLoRA: vision as per-image low-rank weight deltas (Ma et al. 2024, "Visual Perception by Large Language Model's
Weights"), as DESIGN.md builds it. No visual token enters the decoder's context.

    V          = proj(LN(ViT last block)) + spatial + temporal embedding        (N, Nv, d_g)
    Q_0        = learned queries, one per (weight type t, modulated layer l)     (T*L, d_g)
    Q_{i+1}    = block_i(Q_i, V): self-attention over the queries, cross-attention to V, MLP (pre-norm)
    A_{t,l}    = head_t(LN(Q)[t, l])                                             (N, d_in, r): per image
    B_{t,l}    = learned, zero-initialised                                       (d_out, r): shared
    y          = W x + (alpha / r) B_{t,l} (A_{t,l}^T x)                         for t in q, k, v, o, m

"m" is a bypass around the MLP, from its input to its output. The factors A are computed once per item and reused
by every decode step; each row applies its own by batched matmuls, and W + dW is never materialised. B at zero
makes an untrained VLoRA exactly its base LLM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lavi.core.config import LaViConfig
from lavi.core.decoder import NONE, Conditioning, LayerConds
from lavi.core.fusion import Visual, frames_to_tokens


def weight_shapes(c: LaViConfig) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each weight VLoRA can give a delta: q, k, v, o of attention, m around the MLP."""
    d, kv = c.decoder, c.decoder.num_kv_heads * c.decoder.head_dim
    heads = d.num_heads * d.head_dim
    return {"q": (d.hidden_size, heads), "k": (d.hidden_size, kv), "v": (d.hidden_size, kv),
            "o": (heads, d.hidden_size), "m": (d.hidden_size, d.hidden_size)}


def _split(x: Tensor, heads: int) -> Tensor:
    n, t, d = x.shape
    return x.view(n, t, heads, d // heads).transpose(1, 2)  # (N, H, T, d/H)


def _merge(x: Tensor) -> Tensor:
    n, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(n, t, h * dh)  # (N, T, d)


class GeneratorBlock(nn.Module):
    """One block of the perceptual weights generator: the queries attend to each other, then to the image."""

    def __init__(self, d: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.self_norm = nn.LayerNorm(d, eps=eps)
        self.self_qkv = nn.Linear(d, 3 * d)
        self.self_out = nn.Linear(d, d)
        self.cross_norm = nn.LayerNorm(d, eps=eps)
        self.cross_q = nn.Linear(d, d)
        self.cross_kv = nn.Linear(d, 2 * d)
        self.cross_out = nn.Linear(d, d)
        self.mlp_norm = nn.LayerNorm(d, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, q: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q (N, Q, d) queries; v (N, Nv, d) normalised visual features; mask (N, 1, 1, Nv) bool real tokens."""
        a, b, c = (_split(t, self.heads) for t in self.self_qkv(self.self_norm(q)).chunk(3, dim=-1))
        q = q + self.self_out(_merge(F.scaled_dot_product_attention(a, b, c)))
        k, u = (_split(t, self.heads) for t in self.cross_kv(v).chunk(2, dim=-1))
        x = _split(self.cross_q(self.cross_norm(q)), self.heads)
        q = q + self.cross_out(_merge(F.scaled_dot_product_attention(x, k, u, attn_mask=mask)))
        return q + self.mlp(self.mlp_norm(q))


class PerceptualWeights(nn.Module):
    """VLoRA's fusion: per item, the factors A of every (type, modulated layer) (`visual`); per layer, the
    deltas those factors and the learned B give each row (`conds`)."""

    def __init__(self, c: LaViConfig) -> None:
        super().__init__()
        self.c = c
        g, r = c.gen_dim, c.lora_rank
        self.layers = c.modulated_layers()
        self.shapes = weight_shapes(c)  # (d_in, d_out) per type
        self.scale = c.lora_alpha / r
        eps = c.vision.layer_norm_eps
        self.norm = nn.LayerNorm(c.vision.hidden_size, eps=eps)
        self.proj = nn.Linear(c.vision.hidden_size, g)
        # where a visual token is and when: the generator's attention has no other source of place and time
        self.spatial = nn.Parameter(torch.randn(c.vision.num_patches, g) * 0.5)
        self.temporal = nn.Parameter(torch.randn(c.max_frames, g) * 0.5)
        self.visual_norm = nn.LayerNorm(g, eps=eps)
        self.queries = nn.Parameter(torch.randn(len(c.lora_types) * len(self.layers), g) * g ** -0.5)
        self.blocks = nn.ModuleList(GeneratorBlock(g, c.gen_heads, eps) for _ in range(c.gen_layers))
        self.out_norm = nn.LayerNorm(g, eps=eps)
        self.heads = nn.ModuleDict({t: nn.Linear(g, self.shapes[t][0] * r) for t in c.lora_types})
        for t, head in self.heads.items():  # A's entries ~ 1/sqrt(d_in), so that A^T x is O(1), as LoRA's init
            nn.init.normal_(head.weight, std=(g * self.shapes[t][0]) ** -0.5)
            nn.init.zeros_(head.bias)
        self.B = nn.ParameterDict({f"{t}_{l}": nn.Parameter(torch.zeros(self.shapes[t][1], r))
                                   for t in c.lora_types for l in self.layers})

    def visual(self, last: Tensor, n: int, f: int, mask: Tensor) -> Visual:
        """last (N*F, P, d_vit) the ViT's last block; mask (N, F*P) -> the items' factors A."""
        v = frames_to_tokens(self.proj(self.norm(last)) + self.spatial, n, f, self.temporal)  # (N, Nv, d_g)
        v = self.visual_norm(v)
        q = self.queries.to(v.dtype).repeat(n, 1, 1)  # (N, T*L, d_g): a copy (a view of a parameter made
        # under no_grad is no module input that torch's module tracker can hook)
        for block in self.blocks:
            q = block(q, v, mask[:, None, None, :])
        q = self.out_norm(q).view(n, len(self.c.lora_types), len(self.layers), -1)  # (N, T, L, d_g)
        r = self.c.lora_rank
        factors = tuple(self.heads[t](q[:, i]).view(n, len(self.layers), self.shapes[t][0], r)  # (N, L, d_in, r)
                        for i, t in enumerate(self.c.lora_types))
        return Visual(mask=mask, factors=factors)

    def _delta(self, factors: dict[str, Tensor], j: int, layer: int):
        def delta(name: str, x: Tensor) -> Tensor | None:
            a = factors.get(name)
            if a is None:
                return None
            low = torch.matmul(x, a[:, j].to(x.dtype))  # (B, T, d_in) @ (B, d_in, r) -> (B, T, r): A^T x per row
            return self.scale * F.linear(low, self.B[f"{name}_{layer}"])  # (B, T, d_out)
        return delta

    def conds(self, vis: Visual) -> LayerConds:
        """Per-layer weight deltas for a batch whose factors are already gathered per row."""
        factors = dict(zip(self.c.lora_types, vis.factors))
        table = {l: Conditioning(delta=self._delta(factors, j, l)) for j, l in enumerate(self.layers)}
        return lambda layer: table.get(layer, NONE)
