"""A LaVi whose vision tower is a Qwen-VL's ViT (`lavi.qwenvl.convert` makes one from a Qwen-VL checkpoint).

Frames come at their own (dynamic) resolution, as the Qwen-VL takes them (the decode workers resize to the
processor's contract, `lavi.resolution`); `lavi.qwenvl.pixels` cuts them into the tower's patches. The tower runs
without its merger: ViLN's stages tap its blocks (evenly spaced, the deepest last), and a stage's token is a merged
patch, the merge x merge patches' features side by side as the tower's merger would take them:

    taps       (sum t*h*w, d_vit) per stage, in the processor's order (each merge block contiguous)
    V_g        = proj_g(LN(taps_g viewed (sum t*h*w / m^2, m^2 d_vit))) + place + time       (Ntok, d_c)
    place      = 2D sine table of the merged patch's (row, col), scaled to a projected feature's ~0.5 std
    time       = a learned embedding of its temporal patch
    per item   split by its t*h*w / m^2 tokens, padded to the batch's most, masked: `Visual.mask`

The decoder's context holds text only, so its M-RoPE (DecoderConfig.mrope_section) runs with plain (B, T)
positions, equal on all axes: exactly the plain rotary (a test holds it to that).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lavi.core.config import VILN, LaViConfig
from lavi.core.decoder import Decoder
from lavi.core.fusion import SiteHead, StageKV, ViLNConditioner, Visual
from lavi.core.model import LaVi
from lavi.qwenvl import pixels
from lavi.qwenvl.processor_config import ProcessorConfig
from lavi.qwenvl.vision import QwenVision
from lavi.qwenvl.vision_config import QwenVisionConfig
from lavi.resolution import DynamicResolution

PLACE_STD = 0.5  # the sine table's scale: a projected unit-variance feature's std at init (ViLNConditioner.spatial)


class TowerTaps(QwenVision):
    """The Qwen-VL tower without its merger(s): the block outputs at the taps, per patch, in the processor's order."""

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__(c)
        del self.merger  # ViLN taps the blocks; the merger's projection into the LLM's context is left behind
        if hasattr(self, "deepstack_merger_list"):
            del self.deepstack_merger_list

    def forward(self, pixel_values: Tensor, grid_thw: Tensor, taps: Sequence[int]) -> list[Tensor]:
        """pixel_values (N, C*tp*p*p), grid_thw (n, 3) -> [block output (N, d_vit) at each tap]; only the blocks up
        to the deepest tap run."""
        unit = self.config.spatial_merge_size ** 2
        x, rope, per_block, order = self.embed(pixel_values, grid_thw)
        back = torch.argsort(order) if order is not None else None
        out: dict[int, Tensor] = {}
        for i, (block, attend) in enumerate(zip(self.blocks[: max(taps) + 1], per_block)):
            x = block(x, rope, attend)
            if i in taps:  # Qwen2.5-VL's windows undone: merge blocks back in the processor's order
                out[i] = x if back is None else x.view(-1, unit, x.shape[-1])[back].flatten(0, 1)
        return [out[i] for i in taps]


def merged_places(grids: Sequence[tuple[int, int, int]], merge: int, device: torch.device) -> Tensor:
    """(Ntok, 3) long: each merged patch's (temporal patch, row, col), in the processor's order."""
    out = []
    for t, h, w in grids:
        hm, wm = h // merge, w // merge
        rows = torch.arange(hm, device=device).repeat_interleave(wm).repeat(t)  # (t*hm*wm,)
        cols = torch.arange(wm, device=device).repeat(hm * t)
        times = torch.arange(t, device=device).repeat_interleave(hm * wm)
        out.append(torch.stack([times, rows, cols], 1))
    return torch.cat(out)


def sine_2d(rows: Tensor, cols: Tensor, dim: int) -> Tensor:
    """(Ntok,) rows and cols -> (Ntok, dim) fixed sin/cos features: a quarter of the width each for sin and cos of
    the row and of the column (MAE's 2D table, at any grid size); zeros past 4 * (dim // 4)."""
    q = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float32, device=rows.device) / max(q, 1)))  # (q,)
    r, c = rows.float()[:, None] * freq, cols.float()[:, None] * freq  # (Ntok, q) each
    table = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], 1)  # (Ntok, 4q)
    return nn.functional.pad(table, (0, dim - 4 * q))


class GridConditioner(ViLNConditioner):
    """ViLN's conditioner over a dynamic-resolution tower (the module doc): stage tokens are merged patches, placed by
    a sine table of (row, col) and a learned embedding of their temporal patch; items have their own token counts,
    padded and masked. `conds` is ViLNConditioner's."""

    def __init__(self, c: LaViConfig) -> None:
        nn.Module.__init__(self)  # not ViLNConditioner's: its stages and places are a square tower's
        self.c = c
        d, d_c, m2 = c.decoder.hidden_size, c.cond_dim, c.vision.spatial_merge_size ** 2
        self.stages = nn.ModuleList(StageKV(m2 * c.vision.hidden_size, d_c, 1e-6) for _ in range(c.num_stages))
        self.temporal = nn.Parameter(torch.randn(c.max_frames, d_c) * PLACE_STD)
        self.heads = nn.ModuleDict(
            {f"{l}_{s}": SiteHead(d, d_c) for l in c.modulated_layers() for s in c.site_names()})

    def visual(self, taps: list[Tensor], grids: Sequence[tuple[int, int, int]]) -> Visual:
        """taps: per stage (sum t*h*w, d_vit); grids: each item's (t, h, w) in patches -> Visual (N items)."""
        m, h, d_c = self.c.vision.spatial_merge_size, self.c.cond_heads, self.c.cond_dim
        at = merged_places(grids, m, taps[0].device)  # (Ntok, 3)
        place = sine_2d(at[:, 1], at[:, 2], d_c) * PLACE_STD + self.temporal[at[:, 0].clamp(max=self.c.max_frames - 1)]
        sizes = [t * gh * gw // (m * m) for t, gh, gw in grids]
        n, nv = len(sizes), max(sizes)
        mask = torch.zeros(n, nv, dtype=torch.bool, device=taps[0].device)
        for i, s in enumerate(sizes):
            mask[i, :s] = True
        cond_kv = []
        for stage, feats in zip(self.stages, taps):
            merged = feats.reshape(-1, m * m * feats.shape[-1])  # (Ntok, m^2 d_vit): a merge block's patches
            v = stage.proj(stage.norm(merged.to(stage.proj.weight.dtype))) + place.to(stage.proj.weight.dtype)
            padded = v.new_zeros(n, nv, d_c)
            padded[mask] = v  # (N, Nv, d_c): the items' tokens in order, zeros past each item's own
            k, u = stage.k_proj(padded), stage.v_proj(padded)
            cond_kv.append(tuple(t.view(n, nv, h, -1).transpose(1, 2) for t in (k, u)))  # (N, Hc, Nv, Dh)
        return Visual(mask=mask, cond_kv=tuple(cond_kv))


class QwenLaVi(LaVi):
    """A LaVi (ViLN) over a Qwen-VL's decoder and ViT. `forward`, `inputs` and `conds` are LaVi's: text-only context,
    plain positions, the conditioner's keys and values masked per item."""

    def __init__(self, config: LaViConfig, decoder: Decoder | None = None, vision: TowerTaps | None = None) -> None:
        nn.Module.__init__(self)  # not LaVi's: its tower and conditioner are a square SigLIP's
        if config.fusion != VILN or config.processor is None:
            raise ValueError("a Qwen-VL tower LaVi is a ViLN with its processor config (lavi.qwenvl.convert)")
        self.config = config
        self.decoder = decoder if decoder is not None else Decoder(config.decoder)
        self.vision = vision if vision is not None else TowerTaps(config.vision)
        self.viln = GridConditioner(config)
        self.projector = self.vlora = None
        self.visual_compress = None
        self.processor = ProcessorConfig.from_dict(config.processor)

    @property
    def image_size(self) -> int:
        """The square side a caller without frames of its own (a probe) takes: 448 px rounded to a merged patch."""
        return self.processor.image.square_side

    @property
    def dynamic(self) -> DynamicResolution:
        return self.processor.contract

    def encode(self, pixel_values: Tensor, grids: Tensor) -> Visual:  # type: ignore[override]
        """pixel_values (sum t*h*w, C*tp*p*p) normalised patches of N items, grids (N, 3) -> Visual (N items)."""
        grids = grids.long().cpu()
        taps = self.vision(pixel_values.to(self.device, self.dtype), grids.to(self.device), self.config.vision_taps())
        return self.viln.visual(taps, [tuple(g) for g in grids.tolist()])

    def encode_frames(self, visuals: list[np.ndarray], media: list[tuple] | None = None) -> Visual:
        """uint8 frames per item, (T, H, W, 3) at the dynamic resolution (an image: T = 1, or (H, W, 3)); media
        (kind, ...) per item (None: a video where it has several frames) -> their visual state."""
        return self.encode(*self.patches(visuals, media))

    def patches(self, visuals: list[np.ndarray], media: list[tuple] | None = None) -> tuple[Tensor, Tensor]:
        """The tower's input for these items (`encode_frames`' arguments): pixel_values (sum t*h*w, C*tp*p*p) and
        grids (N, 3); an image is cut by the image processor, a video by the video processor."""
        values, grids = [], []
        for i, frames in enumerate(visuals):
            frames = frames[None] if frames.ndim == 3 else frames
            video = media[i][0] == "video" if media is not None else len(frames) > 1
            x, grid = pixels.pixel_values(frames if video else frames[:1],
                                          self.processor.video if video else self.processor.image)
            values.append(x)
            grids.append(grid)
        return torch.cat(values), torch.tensor(grids)
