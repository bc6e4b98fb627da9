"""Training batches: `Example`s (frames and (prompt, target) pairs) -> a padded `Batch` of tensors.

A row per (prompt, target) pair, right-padded, scored on the target and its EOS; the frames of every
item once, however many pairs are asked of them (`Batch.rows` maps a text row to its item). A LaVi's rows are
its prompt format's; a LLaVA-OneVision's are one user turn of its chat template, the visual tokens (and the
template's text before them) in the item's prefix.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lavi.onevision import anyres
from lavi.serving.chat_template import Prompt
from lavi.core.vision import pixels_from_frames
from lavi.core.model import LaVi
from lavi.onevision.model import OneVision
from lavi.onevision.model import pixels as onevision_pixels
from lavi.onevision.config import OneVisionConfig
from lavi.serving.prompts import ChatPrompts, prompt_ids
from lavi.serving.tokenizer import Tokenizer

# (start, end, cells): characters [start, end) of a target text are about one object, whose cells per frame
# are cells, bool (F, G*G). A VQA answer is one span; a caption has one span per object phrase.
Span = tuple[int, int, np.ndarray]
# (image, pinpoints, tile, resample) -> uint8 (1 + rows * cols, tile, tile, 3): a LLaVA-OneVision image's anyres
# tiles (workers.anyres.anyres_tiles: it resizes with PIL, which lavi/ does not import)
Tiles = Callable[[np.ndarray, tuple[tuple[int, int], ...], int, int], np.ndarray]


@dataclass(frozen=True)
class Example:
    frames: np.ndarray  # uint8 (F, S, S, 3); an image: one frame (a LLaVA-OneVision cuts its tiles from it)
    pairs: tuple[tuple[Prompt, str], ...]  # (prompt, target) pairs asked of these frames (a Turns prompt: a turn
    # of a conversation, its earlier turns as context)
    grid: np.ndarray | None = None  # int (F, G*G, A): per-frame, per-cell attribute classes; -100 = unknown
    focus: tuple[tuple[Span, ...], ...] | None = None  # per pair: the spans of its target that are about one
    # object, each with that object's cells per frame (none: a count, an absent object)
    media: str | None = None  # "image" or "video"; None: an image if it has one frame

    @property
    def kind(self) -> str:
        return self.media or ("image" if len(self.frames) == 1 else "video")


@dataclass
class Batch:
    pixels: Tensor  # (N, F, 3, S, S): frames, or a LLaVA-OneVision's tiles and frames
    frame_mask: Tensor  # (N, F)
    rows: Tensor  # (B,) item of each text row
    ids: Tensor  # (B, T) right-padded prompt + target + EOS (a LLaVA-OneVision: the prompt after its placeholder)
    valid: Tensor  # (B, T)
    labels: Tensor  # (B, T) next-token targets, -100 where not scored
    grid: Tensor | None = None  # (N, F, G*G, A) probe targets, -100 where unknown or padded
    focus: Tensor | None = None  # (B, T, K) bool: per position, the keys of the item's visual prefix (its patches;
    # a LLaVA-OneVision's prefix tokens) of the object the token it predicts is about (none: no target)
    media: list[tuple[str, tuple[int, int]]] | None = None  # a LLaVA-OneVision's items: kind and (height, width)
    heads: list[list[int]] | None = None  # and the ids of each item's prompt before its placeholder
    grids: Tensor | None = None  # a dynamic-resolution LaVi's items (N, 3): `pixels` is then its patches


def collate(examples: list[Example], model: LaVi | OneVision, tok: Tokenizer,
            chat: ChatPrompts | None = None, tiles: Tiles | None = None) -> Batch:
    """A LaVi's batch, or (with `chat`, its prompts, and `tiles`, what cuts its images) a LLaVA-OneVision's."""
    if isinstance(model, OneVision):
        if chat is None or tiles is None:
            raise ValueError("a LLaVA-OneVision's batches need its chat prompts and a tiling function "
                             "(workers.anyres.anyres_tiles)")
        return _collate_onevision(examples, model.config, chat, tiles)
    c = model.config
    seqs, offsets = [], []
    for e in examples:
        for prompt, target in e.pairs:
            y, off = tok.encode_offsets(target)
            seqs.append((prompt_ids(c, tok, prompt), y + [c.eos_token_id]))
            offsets.append(off)
    if model.dynamic is not None:  # a Qwen-VL tower's LaVi: frames at their own size, cut into its patches
        if any(e.grid is not None or e.focus is not None for e in examples):
            raise ValueError("the grid probe and the focus loss take square frames: not a dynamic-resolution LaVi")
        pixels, grids = model.patches([e.frames for e in examples], [(e.kind,) for e in examples])
        fmask = torch.ones(len(examples), 1, dtype=torch.bool)
        return Batch(pixels, fmask, _item_rows(examples), *_text(seqs, c.pad_token_id), grids=grids)
    pixels, fmask = pixels_from_frames([e.frames for e in examples], c.image_mean, c.image_std, c.vision.image_size)
    side = int(round(c.vision.num_patches ** 0.5))
    grid = _grid(examples, [list(range(len(e.frames))) for e in examples], pixels.shape[1])
    focus = _focus(examples, seqs, offsets, pixels.shape[1] * c.vision.num_patches,
                   lambda i, cells: cells_to_patches(cells, side).flatten())
    return Batch(pixels, fmask, _item_rows(examples), *_text(seqs, c.pad_token_id), grid, focus)


def _collate_onevision(examples: list[Example], c: OneVisionConfig, chat: ChatPrompts, tiles: Tiles) -> Batch:
    """Each item's tiles (an image) or frames (a clip); each row the prompt after the item's placeholder, then
    the target. The text before the placeholder is the same for every prompt of an item (the template puts the
    image or video first): it goes, with the visual tokens, into the item's prefix (`OneVision.prefix`)."""
    marks = (c.image_token_id, c.video_token_id)
    inputs, media, heads, lengths, seqs, offsets = [], [], [], [], [], []
    for e in examples:
        kind = e.kind
        frames = tiles(e.frames[0], c.pinpoints, c.tile_size, c.resample) if kind == "image" else e.frames
        if kind == "video" and frames.shape[1:3] != (c.tile_size, c.tile_size):
            raise ValueError(f"video frames must be {c.tile_size}x{c.tile_size}, got {frames.shape[1]}x{frames.shape[2]}")
        size = tuple(e.frames.shape[1:3])
        inputs.append(frames)
        media.append((kind, size))
        head = None
        for prompt, target in e.pairs:
            ids = chat.ids(prompt, kind)
            k = [i for i, t in enumerate(ids) if t in marks]
            if len(k) != 1 or k[0] == len(ids) - 1:
                raise ValueError(f"a training prompt must hold one {kind} token with text after it: {prompt!r}")
            if head is not None and ids[:k[0]] != head:
                raise ValueError("the chat template puts text of its own before the image: its prompts of one "
                                 "item do not share a prefix")
            head = ids[:k[0]]
            y, off = chat.tokenizer.encode_offsets(target)
            seqs.append((ids[k[0] + 1:], y + [c.eos_token_id]))
            offsets.append(off)
        heads.append(head)
        lengths.append(len(head) + (anyres.image_tokens(size, c.pinpoints, c.tile_size, c.side, c.max_tiles)
                                    if kind == "image" else anyres.video_tokens(len(frames), c.side)))
    fmax = max(len(x) for x in inputs)
    pixels = torch.zeros(len(inputs), fmax, 3, c.tile_size, c.tile_size)
    fmask = torch.zeros(len(inputs), fmax, dtype=torch.bool)
    for i, x in enumerate(inputs):
        pixels[i, :len(x)], fmask[i, :len(x)] = onevision_pixels(x, c), True
    grid = _grid(examples, [[0] if kind == "image" else list(range(len(x))) for x, (kind, _) in zip(inputs, media)],
                 fmax)  # an image's labels are its base view's; its crops' are unknown
    focus = _focus(examples, seqs, offsets, max(lengths),
                   lambda i, cells: np.concatenate([np.zeros(len(heads[i]), bool), onevision_focus(c, media[i], cells)]))
    return Batch(pixels, fmask, _item_rows(examples), *_text(seqs, c.pad_token_id), grid, focus, media, heads)


def onevision_focus(c: OneVisionConfig, media: tuple[str, tuple[int, int]], cells: np.ndarray) -> np.ndarray:
    """(F, G*G) cells per frame -> (Nv,) flags over the item's visual tokens (OneVision.pack_image / pack_video):
    a clip's pooled grid per frame, then its newline; an image's base view, then its crop grid row by row, each
    row closed by a newline, when that grid is one crop showing the whole image (else the base view only)."""
    kind, size = media
    if kind == "video":
        pooled = -(-c.side // 2)
        return np.concatenate([cells_to_patches(cells, pooled).flatten(), [False]])
    base = cells_to_patches(cells[:1], c.side).reshape(c.side, c.side)
    n = anyres.image_tokens(size, c.pinpoints, c.tile_size, c.side, c.max_tiles)
    whole = anyres.grid_shape(size, c.pinpoints, c.tile_size) == (1, 1) and size[0] == size[1]
    grid = (np.concatenate([base, np.zeros((c.side, 1), bool)], 1).flatten() if whole
            else np.zeros(n - c.side * c.side, bool))
    return np.concatenate([base.flatten(), grid])


def _item_rows(examples: list[Example]) -> Tensor:
    return torch.tensor([i for i, e in enumerate(examples) for _ in e.pairs])


def _text(seqs: list[tuple[list[int], list[int]]], pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """(prompt, target) id lists -> right-padded ids, validity and labels (the target's tokens, where predicted)."""
    t = max(len(p) + len(y) for p, y in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    labels = torch.full((len(seqs), t), -100, dtype=torch.long)
    valid = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, (p, y) in enumerate(seqs):
        n = len(p) + len(y)
        ids[i, :n] = torch.tensor(p + y)
        valid[i, :n] = True
        labels[i, len(p) - 1:n - 1] = torch.tensor(y)  # logits at t predict token t + 1
    return ids, valid, labels


def _grid(examples: list[Example], slots: list[list[int]], fmax: int) -> Tensor | None:
    """Probe targets (N, F, G*G, A): example i's frame j at input slots[i][j]; -100 elsewhere."""
    if all(e.grid is None for e in examples):
        return None
    g = next(e.grid for e in examples if e.grid is not None)
    grid = torch.full((len(examples), fmax, *g.shape[1:]), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        if e.grid is not None:
            grid[i, slots[i]] = torch.from_numpy(e.grid)
    return grid


def _focus(examples: list[Example], seqs: list, offsets: list, width: int, keys) -> Tensor | None:
    """(B, T, width) focus targets: `keys(item, cells)` says which prefix keys show an object in `cells`."""
    if all(e.focus is None for e in examples):
        return None
    t = max(len(p) + len(y) for p, y in seqs)
    focus = torch.zeros(len(seqs), t, width, dtype=torch.bool)
    spans = [(i, sp) for i, e in enumerate(examples) for sp in (e.focus or ((),) * len(e.pairs))]
    for r, ((p, _), off, (item, row_spans)) in enumerate(zip(seqs, offsets, spans)):
        for start, end, cells in row_spans:
            flags = torch.from_numpy(keys(item, cells))
            for k, (a, b) in enumerate(off):
                if a < end and b > start:  # target token k overlaps the span: the position predicting it
                    focus[r, len(p) - 1 + k, :len(flags)] = flags
    return focus


def cells_to_patches(cells: np.ndarray, side: int) -> np.ndarray:
    """(F, G*G) per-cell flags -> (F, side*side) per-patch flags: a patch belongs to the cell its centre is in."""
    g = int(round(cells.shape[1] ** 0.5))
    of = ((np.arange(side) + 0.5) * g / side).astype(int)  # patch row/column -> cell row/column
    idx = (of[:, None] * g + of[None, :]).flatten()  # (side*side,) cell of each patch
    return cells[:, idx]
