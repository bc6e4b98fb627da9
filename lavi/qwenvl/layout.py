"""Where a Qwen-VL's visual tokens go in its prompt, and their M-RoPE positions, as transformers 5 lays them out.

A prompt holds one `<|image_pad|>` or `<|video_pad|>` (the chat template's, between `<|vision_start|>` and
`<|vision_end|>`). The processor expands it (`expand`): an image into its t*h*w / merge^2 merged patches; a video
likewise (Qwen2-VL, Qwen2.5-VL), or, Qwen3-VL, one block per temporal patch: its "<t seconds>" text, then
`<|vision_start|>`, the patch's h*w / merge^2 tokens and `<|vision_end|>`, the template's own start and end pair
collapsed into the first and last block's.

M-RoPE positions (`rope_index`, transformers' get_rope_index for one row): text runs advance all three axes by one
per token; a visual run of grid (t, h, w) (merged h, w) takes (start + floor(i * interval), start + row,
start + col), and the text after it starts at start + max(h, w) (the temporal extent is not counted, as
transformers 5 does it). interval is 1 but for a Qwen2.5-VL video: tokens_per_second * seconds per temporal patch.
Qwen3-VL's blocks each count as one image of grid (1, h, w). Decoding continues from the row's largest position + 1.
"""
from __future__ import annotations

from itertools import groupby
from typing import Sequence

import torch
from torch import Tensor

from lavi.qwenvl.config import IMAGE, VIDEO, QwenVLConfig


def kind_of(c: QwenVLConfig, token: int) -> int:
    """A token's modality, as mm_token_type_ids: 1 image, 2 video, 0 text."""
    return IMAGE if token == c.image_token_id else VIDEO if token == c.video_token_id else 0


def expand(c: QwenVLConfig, ids: list[int], kind: int, grid: Sequence[int], stamps: Sequence[Sequence[int]] = ()
           ) -> list[int]:
    """One prompt's ids with its one placeholder expanded into the visual tokens of an item of `kind` and `grid`
    (t, h, w) in patches; stamps: a Qwen3-VL video's "<t seconds>" ids per temporal patch."""
    marks = [i for i, t in enumerate(ids) if kind_of(c, t)]
    if len(marks) != 1:
        raise ValueError(f"a prompt must hold one image or video token, found {len(marks)}")
    k = marks[0]
    if kind_of(c, ids[k]) != kind:
        have, want = ("image", "video")[kind_of(c, ids[k]) - 1], ("image", "video")[kind - 1]
        raise ValueError(f"a prompt with an {have} token was given a {want}")
    t, h, w = (int(g) for g in grid)
    per = h * w // c.merge_size ** 2  # tokens per temporal patch
    if kind == VIDEO and c.stamped:
        if len(stamps) != t:
            raise ValueError(f"a video of {t} temporal patches came with {len(stamps)} timestamps")
        vs, ve = c.vision_start_token_id, c.vision_end_token_id
        wrapped = 0 < k < len(ids) - 1 and ids[k - 1] == vs and ids[k + 1] == ve
        lo, hi = (k - 1, k + 2) if wrapped else (k, k + 1)
        body = [tok for stamp in stamps for tok in (*stamp, vs, *[c.video_token_id] * per, ve)]
        return ids[:lo] + body + ids[hi:]
    return ids[:k] + [ids[k]] * (t * per) + ids[k + 1:]


def vision_positions(start: int, grid: Sequence[int], merge: int, interval: float | Tensor = 1.0) -> Tensor:
    """(3, t*h*w/merge^2) the M-RoPE positions of one visual run (transformers' get_vision_position_ids)."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    temporal = (torch.arange(t) * interval).long()
    tt, hh, ww = torch.meshgrid(temporal, torch.arange(h) + start, torch.arange(w) + start, indexing="ij")
    out = torch.stack([tt, hh, ww], dim=0).reshape(3, -1)
    out[0] += start
    return out


def rope_index(c: QwenVLConfig, ids: list[int], grid: Sequence[int], seconds: Tensor | None = None
               ) -> tuple[Tensor, int]:
    """An expanded row's M-RoPE positions (3, T) and its first decode position. grid: its visual item's (t, h, w);
    seconds: a Qwen2.5-VL video's seconds per temporal patch (a float32 scalar tensor, as the processor gives it)."""
    t, h, w = (int(g) for g in grid)
    pos, parts = 0, []
    for kind, run in groupby(kind_of(c, tok) for tok in ids):
        n = len(list(run))
        if kind == 0:
            parts.append(torch.arange(n).view(1, -1).expand(3, -1) + pos)
            pos += n
        else:
            run_grid = (1, h, w) if kind == VIDEO and c.stamped else (t, h, w)
            if n != run_grid[0] * h * w // c.merge_size ** 2:
                raise ValueError(f"a run of {n} visual tokens does not fit the grid {run_grid}")
            interval: float | Tensor = 1.0
            if kind == VIDEO and c.tokens_per_second:
                interval = c.tokens_per_second * (seconds if seconds is not None else torch.tensor(1.0))
            parts.append(vision_positions(pos, run_grid, c.merge_size, interval))
            pos += max(h, w) // c.merge_size
    positions = torch.cat(parts, dim=1)
    return positions, int(positions.max()) + 1
