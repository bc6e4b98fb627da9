"""The engine: a loaded LaVi, its tokenizer and static caches, from uint8 frames and prompt text to text.

This is what the labeler actor holds (one per replica) and what eval and the benchmarks call. Here: loading, the
public `generate` and the hooks a family's engine overrides; how requests are batched into the static cache (the
in-flight pool across calls, static batches, the cache's size, `fit_batch`) is `lavi.serving.batching`'s.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Callable

from pathlib import Path

import numpy as np
import torch

from lavi.core import checkpoint
from lavi.visual_tokens.methods import VisualCompress
from lavi.serving.batching import Batching, Completion, Media, request_defaults
from lavi.serving.constrain import Constraint, Vocabulary
from lavi.serving.generate import Generator
from lavi.serving.steps import GenerationConfig
from lavi.serving.inflight import InflightPool
from lavi.core.fusion import Visual
from lavi.core.model import LaVi
from lavi.families import family_of
from lavi.resolution import DynamicResolution
from lavi.serving.load_prep import prepare
from lavi.serving.prompts import prompt_ids
from lavi.serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Engine(Batching):
    """A model, its tokenizer and its generator; the batching (in-flight and static, the cache) is `Batching`'s.
    A family's engine subclasses it and overrides the hooks: `load`, `image_size`, `pinpoints`, `default_prompt`,
    `encode_prompt`, `_encode`, `_prompt`, `_visual_tokens`, `_context_bound` and `_context`."""

    def __init__(self, model: LaVi, tokenizer: Tokenizer, max_batch: int = 32, name: str | None = None,
                 compile: bool = False, inflight: bool = True) -> None:
        self.inflight = inflight
        self.model = model.eval()
        self.generator = Generator(self.model, compile=compile)
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_batch = max_batch
        self.name = name or self.config.name
        self.eos_id = self.config.stop_ids
        self.pad_id = self.config.pad_token_id
        self._vocabulary: Vocabulary | None = None
        self._pool: InflightPool | None = None  # in-flight batching's, over the generator's cache (lavi.serving.inflight)
        self._need = 0  # the cache slots the longest request submitted so far needs
        self._most = (0, 0)  # the most visual tokens and prompt tokens of a request so far
        self._lock = threading.Lock()

    @property
    def vocabulary(self) -> Vocabulary:
        """The tokens as the constrained-generation masks see them (`lavi.serving.constrain`), built at first use."""
        if self._vocabulary is None:
            eos = (self.eos_id,) if isinstance(self.eos_id, int) else tuple(self.eos_id)
            self._vocabulary = Vocabulary(self.tokenizer.tok, self.model.decoder.lm_head.out_features, eos)
        return self._vocabulary

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: torch.dtype | None = None, max_batch: int = 32,
             compile: bool = False, quantize: str | None = None,
             visual_compress: str | VisualCompress | None = None, pack: bool | None = None) -> "Engine":
        """compile: torch.compile the decode step (CUDA graphs on a GPU; see `Generator`). quantize: "int8", the
        decoder's linear layers as weight-only int8 (`lavi.serving.quant`). visual_compress: a concat model's fewer visual
        tokens, `dct:KEEP` or `fastv:KEEP@LAYER` (`lavi.visual_tokens.methods`). pack: on CPU, the linear layers in oneDNN's
        packed layout (None: when float32 and not compiled; `lavi.serving.cpu_pack`). Any family's checkpoint
        (`lavi.families`): Engine.load of another family's is that family's engine; anything else is refused by name."""
        family = family_of(checkpoint.read_json(Path(path) / "config.json"), str(path))
        if not issubclass(cls, family.engine):  # Engine.load of another family's checkpoint: that family's engine
            return family.engine.load(path, device=device, dtype=dtype, max_batch=max_batch, compile=compile,
                                      quantize=quantize, visual_compress=visual_compress, pack=pack)
        model = prepare(checkpoint.load(path, device=device, dtype=dtype), quantize, visual_compress, compile, pack)
        return cls(model, Tokenizer(path), max_batch=max_batch, name=model.config.name, compile=compile)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def pinpoints(self) -> tuple[tuple[int, int], ...] | None:
        """The anyres grid resolutions the decoder tiles images into (None: square frames of image_size)."""
        return None

    @property
    def dynamic(self) -> DynamicResolution | None:
        """The dynamic-resolution contract the decoder resizes to (lavi.resolution; None: square frames or anyres
        tiles of image_size). A dynamic-resolution family's engine returns its ModelInfo's; a LaVi, its tower's."""
        return self.model.dynamic if isinstance(self.model, LaVi) else None

    @property
    def default_frames(self) -> int:
        return self.config.default_frames

    def default_prompt(self, media_type: str) -> str:
        return self.config.default_prompts.get(media_type, self.config.default_prompts["image"])

    def encode_prompt(self, text: str) -> list[int]:
        return prompt_ids(self.config, self.tokenizer, text)

    @torch.no_grad()
    def generate(self, visuals: list[np.ndarray], requests: list[tuple[int, str]],
                 gen: GenerationConfig = GenerationConfig(),
                 media: list[Media] | None = None, constraints: list[Constraint | None] | None = None,
                 on_rows: Callable[[int], None] | None = None, inflight: bool | None = None) -> list[Completion]:
        """visuals: uint8 (F, S, S, 3) per clip; requests: (visual index, prompt) pairs -> one Completion each.
        The visual state of each clip is computed once, whatever the number of prompts asked of it. media:
        (kind, (height, width)) per visual, which a LLaVA-OneVision needs (`OneVisionEngine`: an image's visual
        is its anyres tiles), a video's optionally followed by its frames' times in seconds (a Qwen-VL reads them:
        `QwenVLEngine`; the labeler passes a clip's frame_timestamps_s); None: every visual a clip of frames. A LaVi sees every input as frames.
        constraints: per request, its `lavi.serving.constrain.Constraint` or None (free); a finished constrained row that
        breaks its constraint anyway says why in `Completion.violation`. Raises ConstraintError (a ValueError)
        for a constraint this vocabulary cannot meet. on_rows(n): told as n more requests finish, while the call
        runs (a progress count). inflight: in-flight batching (through the engine's pool, `submit`) or static
        batches of max_batch rows; None: the engine's setting."""
        media, constraints = request_defaults(visuals, requests, media, constraints)
        inflight = self.inflight if inflight is None else inflight
        try:
            return self._generate(visuals, requests, gen, media, constraints, on_rows, inflight)
        except torch._dynamo.exc.TorchDynamoException as err:  # a compiler failure must not fail a job
            if not self.generator.compiled:
                raise
            log.warning("compiled decode step failed (%s: %s); continuing eager", type(err).__name__, err)
            self.generator, self._pool = Generator(self.model, self.generator.kv_cache), None
            return self._generate(visuals, requests, gen, media, constraints, on_rows, inflight)

    def _encode(self, visuals: list[np.ndarray], media: list[tuple[str, tuple[int, int]]]) -> Visual:
        """The visual state of the inputs one batch asks about (once per input, whatever its prompts)."""
        return self.model.encode_frames(visuals, media)

    def _prompt(self, text: str, kind: str) -> list[int]:
        return self.encode_prompt(text)

    def _visual_tokens(self, frames: np.ndarray, media: tuple[str, tuple[int, int]]) -> int:
        """The visual tokens one input puts in the decoder's context: a concat LaVi's frames x patches (fewer after
        a dct compression); none for ViLN and VLoRA."""
        if self.model.projector is None:
            return 0
        side = math.isqrt(self.config.vision.num_patches)
        vc = self.model.visual_compress
        side = vc.grid_side(side) if vc is not None else side
        return len(frames) * side * side

    def _context_bound(self, visual: list[int], text: list[int]) -> int:
        """The longest prefill context a batch of the requests seen so far can have (the in-flight pool admits any of
        them together): a concat LaVi pads every row's visual tokens to the batch's most, then its text."""
        self._most = (max(self._most[0], *visual), max(self._most[1], *text))
        return sum(self._most)

    def _context(self, vis: Visual, rows: list[int], prompts: list[list[int]]) -> int:
        """The longest prefill context of a batch: concat prepends every row's visual tokens."""
        return (vis.tokens.shape[1] if vis.tokens is not None else 0) + max(map(len, prompts))
