"""The engine around a LLaVA-OneVision: its chat template, anyres images and pooled videos, in the same
static-cache generation loop as LaVi (`lavi.serving.generate`).

Requests carry what the model must know of each input: its kind (image or video) and, for an image, the
size it was tiled from (the unpadding needs it). Images arrive as the uint8 tiles `workers.anyres.anyres_tiles` cuts.
"""
from __future__ import annotations

import numpy as np
import torch

from lavi.onevision import anyres
from lavi.onevision import checkpoint as onevision_checkpoint
from lavi.visual_tokens.methods import VisualCompress
from lavi.serving.engine import Engine
from lavi.core.fusion import Visual
from lavi.onevision.model import OneVision
from lavi.onevision.config import DEFAULT_PROMPTS
from lavi.serving.load_prep import prepare
from lavi.serving.prompts import ChatPrompts



class OneVisionEngine(Engine):
    def __init__(self, model: OneVision, prompts: ChatPrompts, max_batch: int = 32, name: str | None = None,
                 compile: bool = False, inflight: bool = True) -> None:
        super().__init__(model, prompts.tokenizer, max_batch=max_batch, name=name, compile=compile, inflight=inflight)
        self.prompts = prompts

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: torch.dtype | None = None, max_batch: int = 32,
             compile: bool = False, quantize: str | None = None,
             visual_compress: str | VisualCompress | None = None, pack: bool | None = None) -> "OneVisionEngine":
        prompts = ChatPrompts.load(path)
        model = prepare(onevision_checkpoint.load(path, device=device, dtype=dtype), quantize, visual_compress,
                        compile, pack)
        return cls(model, prompts, max_batch=max_batch, name=model.config.name, compile=compile)

    @property
    def image_size(self) -> int:
        return self.config.tile_size

    @property
    def pinpoints(self) -> tuple[tuple[int, int], ...]:
        return self.config.pinpoints

    def default_prompt(self, media_type: str) -> str:
        prompts = self.config.default_prompts or DEFAULT_PROMPTS  # a checkpoint trained here may carry its own
        return prompts.get(media_type, prompts.get("image", DEFAULT_PROMPTS["image"]))

    def encode_prompt(self, text: str, media: str = "image") -> list[int]:
        """One user turn: the image or video, then the text, and the generation prompt (`ChatPrompts`)."""
        return self.prompts.ids(text, media)

    def _encode(self, visuals: list[np.ndarray], media: list[tuple[str, tuple[int, int]]]) -> Visual:
        return self.model.encode(visuals, media)

    def _prompt(self, text: str, kind: str) -> list[int]:
        return self.encode_prompt(text, kind)

    def _visual_tokens(self, frames: np.ndarray, media: tuple[str, tuple[int, int]]) -> int:
        """An image's anyres tokens, a video's pooled ones (their grid side smaller after a dct compression)."""
        c, vc = self.config, self.model.visual_compress
        side = vc.grid_side(c.side) if vc is not None else c.side
        kind, size = media[:2]  # a video's third element (its frame times) is not read
        if kind == "image":
            return anyres.image_tokens(size, c.pinpoints, c.tile_size, side, c.max_tiles)
        return anyres.video_tokens(len(frames), side)

    def _context_bound(self, visual: list[int], text: list[int]) -> int:
        """Each row's placeholder becomes its own visual tokens before the rows are padded: the longest row."""
        self._most = (max(self._most[0], *(v + t - 1 for v, t in zip(visual, text))), 0)
        return self._most[0]

    def _context(self, vis: Visual, rows: list[int], prompts: list[list[int]]) -> int:
        """Each row's one placeholder becomes its item's visual tokens."""
        return max(len(p) - 1 + int(vis.mask[r].sum()) for r, p in zip(rows, prompts))
