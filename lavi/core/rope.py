"""Rotary position embeddings in the HF 'rotate_half' layout: plain RoPE and Qwen-VL's multimodal M-RoPE (three
position axes, each frequency taking one axis's angle)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, mrope_section: Sequence[int] = (),
                 interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """positions (B, T) int, or M-RoPE's (3, B, T) with `mrope_section` -> cos, sin (B, 1, T, D) in fp32, the HF
    'rotate_half' layout."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv  # (B, T, D/2), or (3, B, T, D/2)
    if positions.ndim == 3:
        freqs = mrope_freqs(freqs, mrope_section, interleaved)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos(), emb.sin()


def mrope_freqs(freqs: Tensor, section: Sequence[int], interleaved: bool) -> Tensor:
    """(3, B, T, D/2) per-axis angles -> (B, T, D/2): each frequency takes its axis's angle. Qwen2-VL and Qwen2.5-VL:
    in blocks (the first section[0] frequencies from t, the next section[1] from h, then w); Qwen3-VL: interleaved
    (t h w t h w ..., frequency i from h when i % 3 == 1 and i < 3 * section[1], from w likewise, else t)."""
    if len(section) != 3:
        raise ValueError("(3, B, T) positions need the decoder's mrope_section")
    if not interleaved:
        return torch.cat([part[i % 3] for i, part in enumerate(freqs.split(list(section), dim=-1))], dim=-1)
    out = freqs[0].clone()
    for axis in (1, 2):
        idx = slice(axis, section[axis] * 3, 3)
        out[..., idx] = freqs[axis, ..., idx]
    return out


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin in x's dtype, cos and sin cast to it (as transformers' Llama, Qwen2 and
    Qwen-VL decoders compute it: in bf16, the same roundings)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
