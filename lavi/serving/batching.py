"""The engine's batching: requests into the generator's static cache, as in-flight submissions sharing one pool
across calls (`submit`, `step`, `run`, `completions`) or as static batches of `max_batch` rows; the cache allocated
once and grown only when a request needs more (`_ensure_cache`); and `fit_batch`, the batch a GPU's memory holds.

`Batching` is a mixin of `lavi.serving.engine.Engine`: it uses the engine's model, generator, tokenizer, stop and pad
ids, `max_batch` and in-flight state (set by `Engine.__init__`), and the family's hooks, which `Engine` and its
subclasses define: `_encode` (the visual state of a batch's inputs), `_prompt` (a request's ids), `_visual_tokens`,
`_context_bound` and `_context` (how long a prefill context is).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lavi.core.fusion import Visual
from lavi.core.model import LaVi
from lavi.serving.constrain import Constraint, Guide
from lavi.serving.generate import Generator
from lavi.serving.inflight import InflightPool
from lavi.serving.steps import GenerationConfig, RowTokens, rows_that_fit, setup_caches
from lavi.serving.tickets import Ticket
from lavi.serving.tokenizer import Tokenizer

# (kind, (height, width)) of one visual; a video's may add its frames' times in seconds (a Qwen-VL reads them)
Media = tuple[str, tuple[int, int]] | tuple[str, tuple[int, int], tuple[float, ...]]


@dataclass
class Completion:
    """One request's answer: its text and token counts."""

    text: str
    num_prompt_tokens: int
    num_generated_tokens: int
    finished: bool  # False: stopped by max_new_tokens (status "truncated")
    violation: str | None = None  # a finished constrained row whose text breaks its constraint: why


def request_defaults(visuals: list[np.ndarray], requests: list[tuple[int, str]], media: list[Media] | None,
                     constraints: list[Constraint | None] | None) -> tuple[list[Media], list[Constraint | None]]:
    """A call's media (None: every visual a clip of frames) and constraints (None: every request free)."""
    media = media or [("video", tuple(v.shape[1:3])) for v in visuals]
    constraints = constraints or [None] * len(requests)
    if len(constraints) != len(requests):
        raise ValueError(f"{len(constraints)} constraints for {len(requests)} requests")
    return media, constraints


class Batching:
    """The engine's batching (see the module doc); what it reads of the engine is named here."""

    model: LaVi
    generator: Generator
    tokenizer: Tokenizer
    max_batch: int
    eos_id: int | tuple[int, ...]
    pad_id: int
    _pool: InflightPool | None  # in-flight batching's, over the generator's cache (lavi.serving.inflight)
    _need: int  # the cache slots the longest request submitted so far needs
    _lock: threading.Lock

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
        clip, media = self._probe(frames or self.default_frames)
        prompt = " ".join(["a"] * max(1, prompt_tokens))
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        saved = self.max_batch, self.generator
        self.max_batch, self.generator = probe, Generator(self.model)  # eager: no CUDA graph for the probe's shape
        try:
            self.generate([clip] * probe, [(i, prompt) for i in range(probe)],
                          GenerationConfig(max_new_tokens=new_tokens), media=[media] * probe)
        finally:
            self.max_batch, self.generator = saved
        torch.cuda.synchronize(device)
        per_row = (torch.cuda.max_memory_allocated(device) - base) / probe
        free, total = torch.cuda.mem_get_info(device)
        budget = headroom * min(free, share * total - base)
        self.max_batch = rows_that_fit(budget, per_row, ceiling)
        return self.max_batch

    def _probe(self, frames: int) -> tuple[np.ndarray, tuple[str, tuple[int, int]]]:
        """fit_batch's probe input and its media entry: a clip of `frames` square frames of image_size (a
        dynamic-resolution engine gives its largest input instead)."""
        side = self.image_size
        return np.zeros((frames, side, side, 3), np.uint8), ("video", (side, side))

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
               gen: GenerationConfig = GenerationConfig(), media: list[Media] | None = None,
               constraints: list[Constraint | None] | None = None,
               on_rows: Callable[[int], None] | None = None, rows: int | None = None) -> Ticket:
        """Queue requests (as `generate` takes them) in the engine's in-flight pool and return at once; whoever
        steps the engine (`step`, `run`) generates them beside any other submission's, a finished row's cache row
        going to the next waiting request whichever submission it belongs to. Thread-safe against one stepping
        thread. The ticket's `done` is set when every request finished (`completions` reads it) or failed.
        rows: the pool's size when this submission starts one (an idle pool is made anew): default max_batch."""
        media, constraints = request_defaults(visuals, requests, media, constraints)
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
        return self._completions(ticket.results, ticket.prompts, lambda i, text: self._pool.check(ticket, i, text))

    def _completions(self, results: list[RowTokens], prompts: list[list[int]],
                     check: Callable[[int, str], str | None] | None) -> list[Completion]:
        """Rows' tokens -> their answers; `check(i, text)`: why finished row i breaks its constraint (None: it does
        not, or no row is constrained)."""
        out = []
        for i, (r, p) in enumerate(zip(results, prompts)):
            text = self.tokenizer.decode(r.tokens)
            out.append(Completion(text=text, num_prompt_tokens=len(p),
                                  num_generated_tokens=len(r.tokens) + int(r.finished), finished=r.finished,
                                  violation=check(i, text) if check is not None and r.finished else None))
        return out

    # -- one call's requests: through the pool, or in static batches --------------------------------------------
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

    def _generate_batch(self, visuals: list[np.ndarray], media: list[Media], requests: list[tuple[int, str]],
                        gen: GenerationConfig, constraints: list[Constraint | None],
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
        return self._completions(results, prompts, guide.check if guide is not None else None)
