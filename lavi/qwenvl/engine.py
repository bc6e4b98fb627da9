"""The engine around a Qwen-VL: its chat template, images and videos at their own resolution, in the same
static-cache generation loop as LaVi (`lavi.serving.generate`).

Requests carry what the model must know of each input: its kind (image or video), its size, and for a video
optionally its frames' times in seconds, a third element of its media entry `(kind, (height, width), times)` (the
clip's `frame_timestamps_s`; without it the frames are taken 1 / DEFAULT_FPS apart from 0). Frames arrive as uint8
(T, H, W, 3), already resized by the decode workers to sides that are multiples of patch_size * merge_size; a video's
frames go in temporal patches of temporal_patch_size (an odd count completed by repeating the last frame, as
transformers does). The times give Qwen2.5-VL its temporal positions (tokens_per_second x seconds per temporal
patch) and Qwen3-VL its "<t seconds>" text before each temporal patch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lavi.core.fusion import Visual
from lavi.qwenvl import checkpoint as qwen_checkpoint
from lavi.qwenvl.config import IMAGE, VIDEO, QwenVLConfig
from lavi.qwenvl.family import square_side
from lavi.qwenvl.model import QwenVL
from lavi.serving.engine import Engine
from lavi.serving.load_prep import prepare
from lavi.serving.prompts import ChatPrompts
from lavi.visual_tokens.methods import VisualCompress

DEFAULT_FPS = 2.0  # the frame rate Qwen's video processors sample at, taken when a clip comes without its times
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' Qwen2-VL image processor defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Normalise:
    """preprocessor_config.json's rescale and normalisation.
    TODO(q-prep): lavi/qwenvl/processor_config.py reads the whole file (min/max pixels too); use it when it lands."""

    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Normalise":
        path = Path(directory) / "preprocessor_config.json"
        pre = json.loads(path.read_text()) if path.exists() else {}
        for flag in ("do_rescale", "do_normalize"):
            if pre.get(flag, True) is not True:
                raise ValueError(f"preprocessor_config.json {flag}={pre[flag]} is not supported")
        return cls(float(pre.get("rescale_factor", 1 / 255)), tuple(pre.get("image_mean", CLIP_MEAN)),
                   tuple(pre.get("image_std", CLIP_STD)))


def patches(frames: np.ndarray, c: QwenVLConfig, norm: Normalise = Normalise()) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames (T, H, W, 3) (an image: T = 1) -> the processor's pixel_values (t*h*w, 3*tp*p*p) float32 and
    grid (t, h, w) in patches, with its arithmetic: rescale in float64, cast to float32, (x - mean) / std.
    TODO(q-prep): lavi/qwenvl/pixels.py does this for the decode workers; use it when it lands."""
    t, height, width, _ = frames.shape
    p, m, tp = c.patch_size, c.merge_size, c.temporal_patch_size
    if height % c.factor or width % c.factor:
        raise ValueError(f"frames of {height}x{width}: a Qwen-VL takes sides that are multiples of {c.factor} "
                         "(the decode workers resize to them)")
    x = (frames.astype(np.float64) * norm.rescale_factor).astype(np.float32)
    x = ((x - np.array(norm.image_mean, np.float32)) / np.array(norm.image_std, np.float32)).astype(np.float32)
    x = x.transpose(0, 3, 1, 2)  # (T, C, H, W)
    if pad := -t % tp:  # the last frame repeated to fill the last temporal patch
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    gt, gh, gw = x.shape[0] // tp, height // p, width // p
    x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, tp, p, p): merge blocks contiguous
    return np.ascontiguousarray(x.reshape(gt * gh * gw, 3 * tp * p * p)), (gt, gh, gw)


def frame_times(n: int, times: Sequence[float] | None) -> list[float]:
    """Each frame's time in seconds: the clip's own, or 1 / DEFAULT_FPS apart from 0."""
    if times is not None and len(times) == n:
        return [float(t) for t in times]
    return [i / DEFAULT_FPS for i in range(n)]


def seconds_per_patch(times: list[float], tp: int) -> float:
    """Qwen2.5-VL's second_per_grid_ts: temporal_patch_size / the clip's frame rate."""
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    fps = (len(times) - 1) / span if span > 0 else DEFAULT_FPS
    return tp / fps


def stamp_texts(times: list[float], tp: int) -> list[str]:
    """Qwen3-VL's "<t seconds>" per temporal patch: the mean of its first and last frame's times (the last frame
    repeated to complete it), to one decimal, as Qwen3VLProcessor writes them."""
    times = times + [times[-1]] * (-len(times) % tp)
    return [f"<{(times[i] + times[i + tp - 1]) / 2:.1f} seconds>" for i in range(0, len(times), tp)]


class QwenVLEngine(Engine):
    def __init__(self, model: QwenVL, prompts: ChatPrompts, max_batch: int = 32, name: str | None = None,
                 compile: bool = False, inflight: bool = True, norm: Normalise = Normalise()) -> None:
        super().__init__(model, prompts.tokenizer, max_batch=max_batch, name=name, compile=compile, inflight=inflight)
        self.prompts, self.norm = prompts, norm

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: torch.dtype | None = None, max_batch: int = 32,
             compile: bool = False, quantize: str | None = None,
             visual_compress: str | VisualCompress | None = None, pack: bool | None = None) -> "QwenVLEngine":
        if visual_compress is not None:
            raise ValueError("--visual-compress is not supported for a Qwen-VL yet")
        prompts = ChatPrompts.load(path)
        model = prepare(qwen_checkpoint.load(path, device=device, dtype=dtype), quantize, None, compile, pack)
        return cls(model, prompts, max_batch=max_batch, name=model.config.name, compile=compile,
                   norm=Normalise.from_dir(path))

    @property
    def image_size(self) -> int:
        return square_side(self.config)

    def default_prompt(self, media_type: str) -> str:
        prompts = self.config.default_prompts
        return prompts.get(media_type, prompts["image"])

    def encode_prompt(self, text: str, media: str = "image") -> list[int]:
        """One user turn: the image or video, then the text, and the generation prompt (`ChatPrompts`)."""
        return self.prompts.ids(text, media)

    def _prompt(self, text: str, kind: str) -> list[int]:
        return self.encode_prompt(text, kind)

    def _stamps(self, times: list[float]) -> list[tuple[int, ...]]:
        return [tuple(self.tokenizer.encode(s)) for s in stamp_texts(times, self.config.temporal_patch_size)]

    def _encode(self, visuals: list[np.ndarray], media: list[tuple]) -> Visual:
        c = self.config
        pixels, grids, kinds, seconds, stamps = [], [], [], [], []
        for frames, m in zip(visuals, media):
            frames = frames[None] if frames.ndim == 3 else frames
            video = m[0] == "video"
            frames = frames if video else frames[:1]
            x, grid = patches(frames, c, self.norm)
            times = frame_times(len(frames), m[2] if len(m) > 2 else None)
            pixels.append(torch.from_numpy(x))
            grids.append(grid)
            kinds.append(VIDEO if video else IMAGE)
            seconds.append(seconds_per_patch(times, c.temporal_patch_size) if video else 1.0)
            stamps.append(self._stamps(times) if video else [])
        return self.model.encode(torch.cat(pixels), torch.tensor(grids), kinds, seconds,
                                 stamps if c.stamped else None)

    def _visual_tokens(self, frames: np.ndarray, media: tuple) -> int:
        """The tokens an input puts in the context in place of its placeholder (Qwen3-VL's video: with its
        timestamps and each temporal patch's start and end)."""
        c = self.config
        frames = frames[None] if frames.ndim == 3 else frames
        video = media[0] == "video"
        n = len(frames) if video else 1
        t = math.ceil(n / c.temporal_patch_size)
        per = (frames.shape[1] // c.patch_size) * (frames.shape[2] // c.patch_size) // c.merge_size ** 2
        if not (video and c.stamped):
            return t * per
        stamps = self._stamps(frame_times(n, media[2] if len(media) > 2 else None))
        return t * per + sum(len(s) + 2 for s in stamps)

    def _context_bound(self, visual: list[int], text: list[int]) -> int:
        """Each row's placeholder becomes its own visual tokens before the rows are padded: the longest row."""
        self._most = (max(self._most[0], *(v + t - 1 for v, t in zip(visual, text))), 0)
        return self._most[0]

    def _context(self, vis: Visual, rows: list[int], prompts: list[list[int]]) -> int:
        """Each row's one placeholder becomes its item's visual tokens (and Qwen3-VL's video timestamps)."""
        extra = [sum(len(s) + 2 for s in vis.stamps[r]) if vis.stamps is not None else 0 for r in rows]
        return max(len(p) - 1 + int(vis.mask[r].sum()) + e for r, p, e in zip(rows, prompts, extra))
