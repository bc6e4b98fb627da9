"""Training batches: `Example`s (frames and (prompt, target) pairs) -> a padded `Batch` of tensors.

A row per (prompt, target) pair, right-padded, scored on the target and its EOS; the frames of every
item once, however many pairs are asked of them (`Batch.rows` maps a text row to its item).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .engine import pixels_from_frames
from .model import LaVi
from .prompt import prompt_ids
from .tokenizer import Tokenizer

# (start, end, cells): characters [start, end) of a target text are about one object, whose cells per frame
# are cells, bool (F, G*G). A VQA answer is one span; a caption has one span per object phrase.
Span = tuple[int, int, np.ndarray]


@dataclass(frozen=True)
class Example:
    frames: np.ndarray  # uint8 (F, S, S, 3)
    pairs: tuple[tuple[str, str], ...]  # (prompt, target) pairs asked of these frames
    grid: np.ndarray | None = None  # int (F, G*G, A): per-frame, per-cell attribute classes; -100 = unknown
    focus: tuple[tuple[Span, ...], ...] | None = None  # per pair: the spans of its target that are about one
    # object, each with that object's cells per frame (none: a count, an absent object)


@dataclass
class Batch:
    pixels: Tensor  # (N, F, 3, S, S)
    frame_mask: Tensor  # (N, F)
    rows: Tensor  # (B,) item of each text row
    ids: Tensor  # (B, T) right-padded prompt + target + EOS
    valid: Tensor  # (B, T)
    labels: Tensor  # (B, T) next-token targets, -100 where not scored
    grid: Tensor | None = None  # (N, F, G*G, A) probe targets, -100 where unknown or padded
    focus: Tensor | None = None  # (B, T, F*P) bool: per position, the visual tokens of the object the token it
    # predicts is about (none: no target)


def collate(examples: list[Example], model: LaVi, tok: Tokenizer) -> Batch:
    c = model.config
    pixels, fmask = pixels_from_frames([e.frames for e in examples], c.image_mean, c.image_std, c.vision.image_size)
    seqs, rows, offsets = [], [], []
    for i, e in enumerate(examples):
        for prompt, target in e.pairs:
            p = prompt_ids(c, tok, prompt)
            y, off = tok.encode_offsets(target)
            seqs.append((p, y + [c.eos_token_id]))
            rows.append(i)
            offsets.append(off)
    t = max(len(p) + len(y) for p, y in seqs)
    ids = torch.full((len(seqs), t), c.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), t), -100, dtype=torch.long)
    valid = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, (p, y) in enumerate(seqs):
        n = len(p) + len(y)
        ids[i, :n] = torch.tensor(p + y)
        valid[i, :n] = True
        labels[i, len(p) - 1:n - 1] = torch.tensor(y)  # logits at t predict token t + 1
    grid = None
    if any(e.grid is not None for e in examples):
        g = next(e.grid for e in examples if e.grid is not None)
        grid = torch.full((len(examples), pixels.shape[1], *g.shape[1:]), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            if e.grid is not None:
                grid[i, :len(e.grid)] = torch.from_numpy(e.grid)
    focus = None
    if any(e.focus is not None for e in examples):
        npatch = c.vision.num_patches
        side = int(round(npatch ** 0.5))
        focus = torch.zeros(len(seqs), t, pixels.shape[1] * npatch, dtype=torch.bool)
        spans = [sp for e in examples for sp in (e.focus or ((),) * len(e.pairs))]
        for r, ((p, _), off, row_spans) in enumerate(zip(seqs, offsets, spans)):
            for start, end, cells in row_spans:
                patches = torch.from_numpy(cells_to_patches(cells, side)).flatten()  # (F*P,)
                for k, (a, b) in enumerate(off):
                    if a < end and b > start:  # target token k overlaps the span: the position predicting it
                        focus[r, len(p) - 1 + k, :len(patches)] = patches
    return Batch(pixels, fmask, torch.tensor(rows), ids, valid, labels, grid, focus)


def cells_to_patches(cells: np.ndarray, side: int) -> np.ndarray:
    """(F, G*G) per-cell flags -> (F, side*side) per-patch flags: a patch belongs to the cell its centre is in."""
    g = int(round(cells.shape[1] ** 0.5))
    of = ((np.arange(side) + 0.5) * g / side).astype(int)  # patch row/column -> cell row/column
    idx = (of[:, None] * g + of[None, :]).flatten()  # (side*side,) cell of each patch
    return cells[:, idx]
