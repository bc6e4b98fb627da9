"""LLaVA-OneVision's anyres geometry: which grid an image is tiled into, how its features are unpadded and how
many visual tokens it becomes. Plain Python (no torch, no PIL), so the decode workers and the driver share it with
the model.

transformers (`image_processing_utils.select_best_resolution`, `get_patch_output_size`, and
`modeling_llava_onevision.unpad_image` / `pack_image_features`) is the spec; every rule below is theirs,
rounding included. Sizes are (height, width) throughout.

The tiles themselves (the image resized with PIL, padded and cut by this geometry) are `workers.anyres.anyres_tiles`:
the decode workers cut them, and training's collate is handed that function.
"""
from __future__ import annotations

import math

Size = tuple[int, int]


def best_resolution(size: Size, pinpoints: list[Size] | tuple[Size, ...]) -> Size:
    """The pinpoint that keeps the most of the image's pixels, then wastes the fewest."""
    h, w = size
    best, best_effective, best_wasted = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (ph, pw), effective, wasted
    if best is None:
        raise ValueError(f"no grid pinpoint fits an image of {h}x{w}")
    return best


def fit_size(size: Size, target: Size) -> Size:
    """The size an image is resized to inside `target`, aspect kept (then padded to `target`, centred)."""
    h, w = size
    th, tw = target
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), th), tw
    return th, min(math.ceil(w * scale_h), tw)


def pad_offsets(inner: Size, target: Size) -> Size:
    """(top, left) of an `inner`-sized image pasted centred in `target` (the odd pixel goes bottom/right)."""
    return (target[0] - inner[0]) // 2, (target[1] - inner[1]) // 2


def grid_shape(size: Size, pinpoints: list[Size] | tuple[Size, ...], tile: int) -> Size:
    """Tiles (rows, columns) of the best resolution for an image of `size`."""
    h, w = best_resolution(size, pinpoints)
    return h // tile, w // tile


def unpadded_extent(size: Size, current: Size) -> tuple[int, int, int, int]:
    """The feature grid of an image that was fitted and padded into `current` (rows, columns), minus the padding:
    (row start, row end, column start, column end) of the image's own features."""
    h, w = size
    ch, cw = current
    if w / h > cw / ch:
        new_h = int(round(h * (cw / w), 7))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(round(w * (ch / h), 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


def downscale_ratio(rows: int, cols: int, side: int, max_tiles: int) -> float:
    """anyres_max_N: a feature grid larger than N base views' worth of tokens is shrunk by this ratio (> 1.1)."""
    return math.sqrt(rows * cols / (max_tiles * side ** 2))


def image_tokens(size: Size, pinpoints: list[Size] | tuple[Size, ...], tile: int, side: int, max_tiles: int) -> int:
    """Visual tokens of one image: the base view (side x side), then the unpadded grid with a newline per row."""
    gh, gw = grid_shape(size, pinpoints, tile)
    r0, r1, c0, c1 = unpadded_extent(size, (gh * side, gw * side))
    rows, cols = r1 - r0, c1 - c0
    ratio = downscale_ratio(rows, cols, side, max_tiles)
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return side * side + rows * (cols + 1)


def video_tokens(frames: int, side: int) -> int:
    """Visual tokens of a video: each frame's grid pooled 2x2 (ceil), then one newline."""
    pooled = math.ceil(side / 2)
    return frames * pooled * pooled + 1

