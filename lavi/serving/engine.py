"""The engine: a loaded LaVi, its tokenizer and static caches, from uint8 frames and prompt text to text.

This is what the labeler actor holds (one per replica) and what eval and the benchmarks call.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Callable

from pathlib import Path

import numpy as np
import torch

from lavi.core import checkpoint
from lavi.visual_tokens.methods import VisualCompress
from lavi.serving.constrain import Constraint, Guide, Vocabulary
from lavi.serving.generate import Generator
from lavi.serving.steps import GenerationConfig, rows_that_fit, setup_caches
from lavi.serving.inflight import InflightPool
from lavi.serving.tickets import Ticket
from lavi.core.fusion import Visual
from lavi.core.model import LaVi
from lavi.families import family_of
from lavi.resolution import DynamicResolution
from lavi.serving.load_prep import prepare
from lavi.serving.prompts import prompt_ids
from lavi.serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """One request's answer: its text and token counts."""

    text: str
    num_prompt_tokens: int
    num_generated_tokens: int
    finished: bool  # False: stopped by max_new_tokens (status "truncated")
    violation: str | None = None  # a finished constrained row whose text breaks its constraint: why


class Engine:
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

    @torch.no_grad()
    def fit_batch(self, share: float = 1.0, prompt_tokens: int = 64, new_tokens: int = 48, frames: int | None = None,
                  probe: int = 8, ceiling: int = 1024, headroom: float = 0.85) -> int:
        """Set `max_batch` from GPU memory and return it: one `probe`-row generation is measured (static caches,
        visual state, prefill activations: peak bytes above the loaded model, per row), and as many rows as fit
        `headroom` of this replica's memory (free memory, and at most `share` of the device when replicas share
        it) become the batch. CUDA only: on CPU the batch is what the caller asks for."""
        device = self.model.device
        if device.type != "cuda":
            raise ValueError("fit_batch measures GPU memory; on CPU give the batch size")
        frames = frames or self.default_frames
        clip = np.zeros((frames, self.image_size, self.image_size, 3), np.uint8)
        prompt = " ".join(["a"] * max(1, prompt_tokens))
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        saved = self.max_batch, self.generator
        self.max_batch, self.generator = probe, Generator(self.model)  # eager: no CUDA graph for the probe's shape
        try:
            self.generate([clip] * probe, [(i, prompt) for i in range(probe)],
                          GenerationConfig(max_new_tokens=new_tokens))
        finally:
            self.max_batch, self.generator = saved
        torch.cuda.synchronize(device)
        per_row = (torch.cuda.max_memory_allocated(device) - base) / probe
        free, total = torch.cuda.mem_get_info(device)
        budget = headroom * min(free, share * total - base)
        self.max_batch = rows_that_fit(budget, per_row, ceiling)
        return self.max_batch

    def encode_prompt(self, text: str) -> list[int]:
        return prompt_ids(self.config, self.tokenizer, text)

    def _ensure_cache(self, batch: int, seq: int) -> None:
        """The generator's static cache, allocated once; reallocated only if a request needs more rows or
        slots than ever before (the in-flight pool then takes the new one: it has no row in flight)."""
        cache = self.generator.kv_cache
        if cache is None or not cache.fits(batch, seq):
            have = (cache.max_batch, cache.max_seq) if cache is not None else (0, 0)
            b, s = max(batch, have[0]), max(-(-seq // 64) * 64, have[1])  # slots: multiple of 64
            self.generator.kv_cache = None  # the old buffers go before the new ones come
            self.generator.kv_cache = setup_caches(self.model, b, s)
            if self._pool is not None:
                self._pool.resize()

    # -- in-flight batching across calls ------------------------------------------------------------------------
    def submit(self, visuals: list[np.ndarray], requests: list[tuple[int, str]],
               gen: GenerationConfig = GenerationConfig(), media: list[tuple[str, tuple[int, int]]] | None = None,
               constraints: list[Constraint | None] | None = None,
               on_rows: Callable[[int], None] | None = None, rows: int | None = None) -> Ticket:
        """Queue requests (as `generate` takes them) in the engine's in-flight pool and return at once; whoever
        steps the engine (`step`, `run`) generates them beside any other submission's, a finished row's cache row
        going to the next waiting request whichever submission it belongs to. Thread-safe against one stepping
        thread. The ticket's `done` is set when every request finished (`completions` reads it) or failed.
        rows: the pool's size when this submission starts one (an idle pool is made anew): default max_batch."""
        media = media or [("video", tuple(v.shape[1:3])) for v in visuals]
        constraints = constraints or [None] * len(requests)
        if len(constraints) != len(requests):
            raise ValueError(f"{len(constraints)} constraints for {len(requests)} requests")
        used = sorted({v for v, _ in requests})
        local = {v: i for i, v in enumerate(used)}
        prompts = [self._prompt(p, media[v][0]) for v, p in requests]
        with self._lock:
            if requests:
                bound = self._context_bound([self._visual_tokens(visuals[v], media[v]) for v, _ in requests],
                                            [len(p) for p in prompts])
                self._need = max(self._need, bound + gen.max_new_tokens)
            size = min(rows or self.max_batch, self.max_batch)
            pool = self._pool
            if pool is None or pool.gen != gen or (pool.b != size and not pool.busy):
                if pool is not None and pool.busy:
                    raise RuntimeError("the in-flight pool serves one generation config at a time")
                self._ensure_cache(size, self._need)
                self._pool = InflightPool(self.generator, gen, self.eos_id, self.pad_id, rows=size)
            if any(c is not None for c in constraints):
                self._pool.vocab = self.vocabulary

            def encode(idx: list[int]) -> Visual:
                return self._encode([visuals[used[j]] for j in idx], [media[used[j]] for j in idx])

            ticket = self._pool.submit(encode, [local[v] for v, _ in requests], prompts, constraints=constraints,
                                       on_rows=on_rows)
        return ticket

    @property
    def in_flight(self) -> bool:
        """Whether the in-flight pool has a row generating (its cache rows are taken)."""
        return self._pool is not None and self._pool.in_flight

    @torch.no_grad()
    def step(self, admit: bool = True) -> bool:
        """One step of the in-flight pool on this thread (`InflightPool.step`; not `admit`: it drains). When a
        submission needs more cache slots than the cache has, the pool first drains, then the cache grows. False
        when idle. A step that fails fails every ticket in flight or waiting (`InflightPool.reset`) and raises."""
        pool = self._pool
        if pool is None:
            return False
        try:
            if self._need > pool.s:
                if pool.in_flight:
                    return pool.step(admit=False)
                self._ensure_cache(self.max_batch, self._need)
            return pool.step(admit)
        except Exception as err:
            pool.reset(err)
            raise

    def run(self, ticket: Ticket) -> None:
        """Step on this thread until `ticket` is done; raise its error if it failed."""
        while not ticket.done.is_set() and self.step():
            pass
        if ticket.error is not None:
            raise ticket.error
        if not ticket.done.is_set():
            raise RuntimeError("the in-flight pool went idle with requests unanswered")

    def completions(self, ticket: Ticket) -> list[Completion]:
        """A finished ticket's answers, in request order."""
        out = []
        for i, (r, p) in enumerate(zip(ticket.results, ticket.prompts)):
            text = self.tokenizer.decode(r.tokens)
            out.append(Completion(text=text, num_prompt_tokens=len(p),
                                  num_generated_tokens=len(r.tokens) + int(r.finished), finished=r.finished,
                                  violation=self._pool.check(ticket, i, text) if r.finished else None))
        return out

    @torch.no_grad()
    def generate(self, visuals: list[np.ndarray], requests: list[tuple[int, str]],
                 gen: GenerationConfig = GenerationConfig(),
                 media: list[tuple[str, tuple[int, int]]] | None = None,
                 constraints: list[Constraint | None] | None = None,
                 on_rows: Callable[[int], None] | None = None, inflight: bool | None = None) -> list[Completion]:
        """visuals: uint8 (F, S, S, 3) per clip; requests: (visual index, prompt) pairs -> one Completion each.
        The visual state of each clip is computed once, whatever the number of prompts asked of it. media:
        (kind, (height, width)) per visual, which a LLaVA-OneVision needs (`OneVisionEngine`: an image's visual
        is its anyres tiles); None: every visual a clip of frames. A LaVi sees every input as frames.
        constraints: per request, its `lavi.serving.constrain.Constraint` or None (free); a finished constrained row that
        breaks its constraint anyway says why in `Completion.violation`. Raises ConstraintError (a ValueError)
        for a constraint this vocabulary cannot meet. on_rows(n): told as n more requests finish, while the call
        runs (a progress count). inflight: in-flight batching (through the engine's pool, `submit`) or static
        batches of max_batch rows; None: the engine's setting."""
        media = media or [("video", tuple(v.shape[1:3])) for v in visuals]
        constraints = constraints or [None] * len(requests)
        if len(constraints) != len(requests):
            raise ValueError(f"{len(constraints)} constraints for {len(requests)} requests")
        inflight = self.inflight if inflight is None else inflight
        try:
            return self._generate(visuals, requests, gen, media, constraints, on_rows, inflight)
        except torch._dynamo.exc.TorchDynamoException as err:  # a compiler failure must not fail a job
            if not self.generator.compiled:
                raise
            log.warning("compiled decode step failed (%s: %s); continuing eager", type(err).__name__, err)
            self.generator, self._pool = Generator(self.model, self.generator.kv_cache), None
            return self._generate(visuals, requests, gen, media, constraints, on_rows, inflight)

    def _generate(self, visuals, requests, gen, media, constraints, on_rows, inflight: bool) -> list[Completion]:
        if inflight and len(requests) > 1:  # rows that finish make room for waiting requests
            ticket = self.submit(visuals, requests, gen, media, constraints, on_rows, rows=len(requests))
            self.run(ticket)
            return self.completions(ticket)
        out: list[Completion] = []
        for start in range(0, len(requests), self.max_batch):  # static batches
            out.extend(self._generate_batch(visuals, media, requests[start:start + self.max_batch], gen,
                                            constraints[start:start + self.max_batch], on_rows))
        return out

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

    def _generate_batch(self, visuals: list[np.ndarray], media: list[tuple[str, tuple[int, int]]],
                        requests: list[tuple[int, str]], gen: GenerationConfig,
                        constraints: list[Constraint | None],
                        on_rows: Callable[[int], None] | None = None) -> list[Completion]:
        used = sorted({v for v, _ in requests})
        local = {v: i for i, v in enumerate(used)}
        vis = self._encode([visuals[v] for v in used], [media[v] for v in used])
        prompts = [self._prompt(p, media[v][0]) for v, p in requests]
        rows = [local[v] for v, _ in requests]
        guide = Guide.of(self.vocabulary if any(constraints) else None, constraints)
        if self._pool is not None and self._pool.in_flight:
            raise RuntimeError("a static batch would overwrite the cache rows of the in-flight pool: let it drain")
        self._ensure_cache(len(requests), self._context(vis, rows, prompts) + gen.max_new_tokens)
        results = self.generator(vis, torch.tensor(rows), prompts, gen, self.eos_id, self.pad_id, guide=guide)
        if on_rows is not None:
            on_rows(len(results))
        out = []
        for i, (r, p) in enumerate(zip(results, prompts)):
            text = self.tokenizer.decode(r.tokens)
            out.append(Completion(text=text, num_prompt_tokens=len(p),
                                  num_generated_tokens=len(r.tokens) + int(r.finished), finished=r.finished,
                                  violation=guide.check(i, text) if guide is not None and r.finished else None))
        return out
