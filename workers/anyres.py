"""LLaVA-OneVision's anyres tiles cut from a decoded image: the PIL half of `lavi.onevision.anyres` (whose pure
geometry, shared with the model and the driver, it uses), kept on the workers' side so that lavi/ needs no PIL.

`anyres_tiles` is LlavaOnevisionImageProcessor up to (not including) rescale and normalise, which the model does
in float: the base view (the whole image resized to tile x tile), then the image fitted into the best grid
resolution (aspect kept, PIL resampling), zero-padded to it (centred), cut into tile x tile crops, row by row.
Everything stays uint8, so the tiles travel small (the decode workers cut them; training's collate is handed this
function) and equal the reference's pixels once scaled.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from lavi.onevision.anyres import best_resolution, fit_size, pad_offsets


def anyres_tiles(image: np.ndarray, pinpoints: list[tuple[int, int]] | tuple[tuple[int, int], ...], tile: int,
                 resample: int = Image.BICUBIC) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (1 + rows * cols, tile, tile, 3): the base view, then the grid's crops."""
    h, w = image.shape[:2]
    target = best_resolution((h, w), pinpoints)
    fh, fw = fit_size((h, w), target)
    pil = Image.fromarray(image)
    canvas = np.zeros((*target, 3), np.uint8)
    top, left = pad_offsets((fh, fw), target)
    canvas[top:top + fh, left:left + fw] = np.asarray(pil.resize((fw, fh), resample=resample))
    base = np.asarray(pil.resize((tile, tile), resample=resample))
    crops = [canvas[i:i + tile, j:j + tile] for i in range(0, target[0], tile) for j in range(0, target[1], tile)]
    return np.stack([base, *crops])
