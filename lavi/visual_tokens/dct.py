"""The 2D DCT low-pass of a grid of visual tokens: Fourier-VLM's compression (lavi.visual_tokens.methods, `dct:KEEP`)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The orthonormal DCT-II matrix C (n, n): X = C x, x = C^T X."""
    i = torch.arange(n, dtype=torch.float64)
    c = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2 / n)  # (k, i)
    c[0] /= math.sqrt(2)
    return c.to(dtype=dtype, device=device)


def dct_lowpass(grid: Tensor, r: int) -> Tensor:
    """grid (..., h, w, d) -> (..., r, r, d): the lowest r x r coefficients of its 2D DCT over (h, w), brought back
    to an r x r grid by the inverse DCT of that size, scaled by sqrt(r*r / (h*w)) so that a constant grid stays
    that constant (the DC coefficient grows with the grid's size)."""
    h, w = grid.shape[-3], grid.shape[-2]
    x = grid.float()
    ch, cw = dct_matrix(h, device=grid.device)[:r], dct_matrix(w, device=grid.device)[:r]  # (r, h), (r, w)
    coeffs = torch.einsum("ah,...hwd,bw->...abd", ch, x, cw)  # (..., r, r, d): the low-frequency corner
    back = dct_matrix(r, device=grid.device)  # (r, r)
    y = torch.einsum("ai,...abd,bj->...ijd", back, coeffs, back) * math.sqrt(r * r / (h * w))
    return y.to(grid.dtype)
