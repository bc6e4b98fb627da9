"""The engine around a Qwen-VL: its chat template, images and videos at their own resolution, in the same
static-cache generation loop as LaVi (`lavi.serving.generate`).

Requests carry what the model must know of each input: its kind (image or video), its size, and for a video
optionally its frames' times in seconds, a third element of its media entry `(kind, (height, width), times)` (the
clip's `frame_timestamps_s`, as the labeler passes them; without it the frames are taken 1 / DEFAULT_FPS apart from
0). Frames arrive as uint8 (1, h, w, 3) for an image and (F, h, w, 3) for a clip, already resized by the decode
workers to the checkpoint's dynamic-resolution contract (`dynamic`: its processors' smart resize, lavi.resolution);
the pixel values are the processors' own arithmetic (lavi.qwenvl.pixels with the image or the video processor of
lavi.qwenvl.processor_config). The times give Qwen2.5-VL its temporal positions (tokens_per_second x seconds per
temporal patch) and Qwen3-VL its "<t seconds>" text before each temporal patch.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lavi.core.fusion import Visual
from lavi.qwenvl import checkpoint as qwen_checkpoint
from lavi.qwenvl.config import IMAGE, VIDEO
from lavi.qwenvl.family import largest_frame, largest_square, processors
from lavi.qwenvl.model import QwenVL
from lavi.qwenvl.pixels import patch_timestamps, pixel_values
from lavi.qwenvl.processor_config import ProcessorConfig
from lavi.resolution import DynamicResolution
from lavi.serving.engine import Engine
from lavi.serving.load_prep import prepare
from lavi.serving.prompts import ChatPrompts
from lavi.visual_tokens.methods import VisualCompress

DEFAULT_FPS = 2.0  # the frame rate Qwen's video processors sample at, taken when a clip comes without its times


def frame_times(n: int, times: Sequence[float] | None) -> list[float]:
    """Each frame's time in seconds: the clip's own (one per frame; ValueError otherwise), or 1 / DEFAULT_FPS apart
    from 0 when the clip comes without them."""
    if times is None:
        return [i / DEFAULT_FPS for i in range(n)]
    if len(times) != n:
        raise ValueError(f"a clip of {n} frames came with {len(times)} frame times")
    return [float(t) for t in times]


def seconds_per_patch(times: list[float], tp: int) -> float:
    """Qwen2.5-VL's second_per_grid_ts: temporal_patch_size / the clip's frame rate."""
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    fps = (len(times) - 1) / span if span > 0 else DEFAULT_FPS
    return tp / fps


def stamp_texts(times: list[float], tp: int) -> list[str]:
    """Qwen3-VL's "<t seconds>" per temporal patch (lavi.qwenvl.pixels.patch_timestamps), to one decimal, as
    Qwen3VLProcessor writes them."""
    return [f"<{t:.1f} seconds>" for t in patch_timestamps(times, tp)]


def _reader(path: str | Path):
    """`read(name)` -> a JSON file of the checkpoint directory, or None where it has none."""
    def read(name: str) -> dict | None:
        file = Path(path) / name
        return json.loads(file.read_text()) if file.exists() else None
    return read


class QwenVLEngine(Engine):
    def __init__(self, model: QwenVL, prompts: ChatPrompts, processor: ProcessorConfig, max_batch: int = 32,
                 name: str | None = None, compile: bool = False, inflight: bool = True) -> None:
        super().__init__(model, prompts.tokenizer, max_batch=max_batch, name=name, compile=compile, inflight=inflight)
        self.prompts, self.processor = prompts, processor

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: torch.dtype | None = None, max_batch: int = 32,
             compile: bool = False, quantize: str | None = None,
             visual_compress: str | VisualCompress | None = None, pack: bool | None = None) -> "QwenVLEngine":
        prompts = ChatPrompts.load(path)
        model = prepare(qwen_checkpoint.load(path, device=device, dtype=dtype), quantize, visual_compress, compile,
                        pack)
        return cls(model, prompts, processors(model.config, _reader(path)), max_batch=max_batch,
                   name=model.config.name, compile=compile)

    @property
    def dynamic(self) -> DynamicResolution:
        """The processors' dynamic-resolution contract: what the decode workers resize images and clips to."""
        return self.processor.contract

    @property
    def image_size(self) -> int:
        """The side of the largest square image the contract gives (ModelInfo.image_size; frames never use it)."""
        return largest_square(self.dynamic.image)

    def _probe(self, frames: int) -> tuple[np.ndarray, tuple]:
        """fit_batch's probe input: whichever has more visual tokens, an image at the image processor's most pixels
        or a clip of `frames` frames at the video processor's."""
        n = max(frames, self.config.temporal_patch_size)  # a per-clip bound takes no clip under one temporal patch
        image, video = largest_frame(self.dynamic.image), largest_frame(self.dynamic.video, n)
        inputs = [(np.zeros((1, *image, 3), np.uint8), ("image", image)),
                  (np.zeros((n, *video, 3), np.uint8), ("video", video))]
        return max(inputs, key=lambda x: self._visual_tokens(*x))

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
        """Each input's pixel values by its processor (an image's first frame by the image processor, a clip's
        frames by the video processor), through the tower at once."""
        c = self.config
        pixels, grids, kinds, seconds, stamps = [], [], [], [], []
        for frames, m in zip(visuals, media):
            frames = frames[None] if frames.ndim == 3 else frames
            video = m[0] == "video"
            frames = frames if video else frames[:1]
            x, grid = pixel_values(frames, self.processor.video if video else self.processor.image,
                                   device=self.model.device)
            times = frame_times(len(frames), m[2] if len(m) > 2 else None) if video else []
            pixels.append(x)
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
        return max(self.model.context_lengths(vis, prompts, rows))
