"""Where a Qwen-VL tower's patches sit: their 2D rotary positions, Qwen2.5-VL's window order, and the segments
attention runs within (lavi.qwenvl.vision)."""
from __future__ import annotations

import torch
from torch import Tensor

from lavi.qwenvl.vision_config import QwenVisionConfig


def patch_positions(grids: list[tuple[int, int, int]], merge: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The row and column of every patch in its frame, in the processor's merge-block order: (N,), (N,)."""
    rows, cols = [], []
    for t, h, w in grids:
        r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        rows.append(r.reshape(blocks).transpose(1, 2).flatten().repeat(t))  # (t*h*w,)
        cols.append(c.reshape(blocks).transpose(1, 2).flatten().repeat(t))
    return torch.cat(rows), torch.cat(cols)


def patch_rope(rows: Tensor, cols: Tensor, c: QwenVisionConfig) -> tuple[Tensor, Tensor]:
    """cos, sin (N, Dh) of the 2D rope: a quarter of the head's frequencies turn with the row, a quarter with the
    column, and rotate_half's two halves repeat them."""
    half = c.head_dim // 2
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float, device=rows.device) / half))
    angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)  # (N, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (N, Dh)
    return angles.cos(), angles.sin()


def window_order(grids: list[tuple[int, int, int]], merge: int, side: int) -> tuple[Tensor, list[int]]:
    """Qwen2.5-VL's windows: the order that puts each frame's merge blocks window by window (windows of side x side
    blocks in raster order, the edge ones smaller; blocks in raster order within), and each window's size in blocks."""
    order, sizes, start = [], [], 0
    for t, h, w in grids:
        bh, bw = h // merge, w // merge
        r, c = torch.meshgrid(torch.arange(bh), torch.arange(bw), indexing="ij")
        window = ((r // side) * -(-bw // side) + c // side).flatten()  # (bh*bw,): each block's window
        frame = torch.argsort(window, stable=True)  # blocks grouped by window, raster order kept within
        counts = torch.bincount(window).tolist()  # no window is empty: there are ceil(bh / side) rows of them
        for f in range(t):
            order.append(frame + start + f * bh * bw)
            sizes += counts
        start += t * bh * bw
    return torch.cat(order), sizes


def by_block(x: Tensor, order: Tensor, unit: int) -> Tensor:
    """x (N, ...) with its merge blocks of `unit` patches taken in `order`."""
    return x.view(-1, unit, *x.shape[1:])[order].flatten(0, 1)


def segments(lengths: list[int], device: torch.device) -> list[Tensor]:
    """Token indices of consecutive segments of these lengths, equal lengths stacked: [(S, L)] (one attention each)."""
    starts: dict[int, list[int]] = {}
    at = 0
    for n in lengths:
        starts.setdefault(n, []).append(at)
        at += n
    return [torch.tensor(s, device=device)[:, None] + torch.arange(n, device=device) for n, s in starts.items()]
