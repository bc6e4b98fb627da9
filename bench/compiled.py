"""Timed generation for the benchmarks: the engine's own `lavi.serving.generate.Generator` (static caches, last-position
prefill, a sync-free decode step compiled with CUDA graphs on a GPU), with a device sync at each boundary.

The benchmarks measure exactly the loop `lavi-label run` uses; only the timing is added here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lavi.core.fusion import Visual
from lavi.serving.generate import Generator
from lavi.serving.steps import GenerationConfig, RowTokens, setup_caches
from lavi.core.model import LaVi


@dataclass(frozen=True)
class Timing:
    """Seconds, measured with a device sync at each boundary."""

    encode_s: float  # ViT + fusion (ViLN stage K/V, or projector)
    ttft_s: float  # start -> first token of every row (encode + prefill + first sample)
    total_s: float  # start -> last token on the host


class TimedGenerator:
    """A `Generator` (compiled or not) over a static cache for up to `max_batch` rows of `max_seq` slots."""

    def __init__(self, model: LaVi, max_batch: int, max_seq: int, compile: bool = False,
                 backend: str = "inductor") -> None:
        self.model = model.eval()
        self.generator = Generator(model, setup_caches(model, max_batch, max_seq), compile=compile, backend=backend)
        self.cuda = model.device.type == "cuda"

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def generate(self, pixels: Tensor, frame_mask: Tensor | None, rows: Tensor, prompts: list[list[int]],
                 new_tokens: int, eos_id: int, pad_id: int = 0) -> tuple[list[RowTokens], Timing]:
        """pixels (N, F, 3, S, S) on the model's device; rows (B,) item of each prompt -> greedy generations."""
        return self.generate_from(lambda: self.model.encode(pixels, frame_mask), rows, prompts, new_tokens, eos_id,
                                  pad_id)

    def generate_from(self, encode: Callable[[], Visual], rows: Tensor, prompts: list[list[int]], new_tokens: int,
                      eos_id: int, pad_id: int = 0) -> tuple[list[RowTokens], Timing]:
        """As `generate`, the visual state made by `encode()` (timed as the encode): a LLaVA-OneVision's tiles."""
        marks: dict[str, float] = {}

        def first_token() -> None:
            self._sync()
            marks["first"] = time.perf_counter()

        self._sync()
        start = time.perf_counter()
        with torch.no_grad():
            vis = encode()
        self._sync()
        encoded = time.perf_counter()
        out = self.generator(vis, rows, prompts, GenerationConfig(max_new_tokens=new_tokens), eos_id, pad_id,
                             on_first_token=first_token)
        self._sync()
        end = time.perf_counter()
        return out, Timing(encode_s=encoded - start, ttft_s=marks["first"] - start, total_s=end - start)
