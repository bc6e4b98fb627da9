"""Batched generation over a static KV cache, gpt-fast style: `setup_caches`, a prefill, a decode step (lavi.serving.steps).

One loop serves static and in-flight batches: the in-flight pool (lavi.serving.inflight), a static batch being its
rows admitted at once. Prompts are left-padded; pad slots are masked out of attention and do not advance RoPE positions,
so a row gives the same tokens in a batch as alone. The visual state is computed once per batch
of items (`LaVi.encode`) and gathered per text row; visual tokens never enter the ViLN KV cache.

What a model gives the generator (LaVi does; a model that places its visual tokens elsewhere in the
prompt plugs in the same way):
    model.inputs(vis, ids, valid) -> (embeds (B, T0, d), key validity (B, T0), conds | None)
        the prefill's context: text embeddings with any visual tokens in place, and which are real
    model.conds(vis) -> conds | None
        the conditioning of a decode step, from the per-row visual state (`Visual`: mask, cond_kv, factors)
    model.decoder
        a `lavi.core.decoder.Decoder`, run over the generator's `KVCache`
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
from torch import Tensor

from lavi.serving.constrain import Guide
from lavi.core.decoder import KVCache
from lavi.core.fusion import Visual
from lavi.core.model import LaVi
from lavi.serving.inflight import InflightPool
from lavi.serving.steps import RECOMPILE_LIMIT, GenerationConfig, RowTokens, StepInputs, Work, decode_rows


class Generator:
    """Batched generation over a static KV cache (`setup_caches`), gpt-fast style.

    The generator owns `kv_cache`: whoever sizes it (the Engine, a benchmark) may replace it with a larger
    one between calls. Every per-batch tensor the decode step reads lives in a buffer at a fixed address
    (`StepInputs`); the step takes and returns tensors only; EOS is tracked on the device, and the host
    looks at it once every `check_every` steps (to stop when every row is done), not every step.
    compile=True wraps the step in torch.compile(fullgraph=True): CUDA graphs ("reduce-overhead") on CUDA
    with the inductor backend; backend="eager" checks on CPU that the step traces whole.
    """

    def __init__(self, model: LaVi, kv_cache: KVCache | None = None, compile: bool = False,
                 backend: str = "inductor", check_every: int = 8) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.cuda = model.device.type == "cuda"
        self.compiled = compile
        self.check_every = check_every
        self.step = decode_rows  # every row at its own cache slot: a static batch's rows are at one, in-flight's not
        if compile:
            mode = "reduce-overhead" if backend == "inductor" and self.cuda else None
            self.step = torch.compile(decode_rows, mode=mode, fullgraph=True, dynamic=False, backend=backend)
        self.fixed: StepInputs | None = None  # the buffers of the last batch shape; another shape replaces them
        self.work = Work()

    def _fixed(self, inputs: StepInputs) -> StepInputs:
        """`inputs` copied into the fixed-address buffers (allocated anew when the shapes change)."""
        if self.fixed is None or not self.fixed.matches(inputs):
            self.fixed = inputs.empty_like()
            if self.compiled:
                for t in self.fixed.tensors():
                    torch._dynamo.mark_static_address(t)
        return self.fixed.copy_(inputs)

    def _recompiles(self) -> AbstractContextManager:
        """Compilation happens on the step's first call at each batch shape, inside the decode loop: the
        recompile limit is raised there and only there."""
        if not self.compiled:
            return nullcontext()
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        return config.patch({name: max(RECOMPILE_LIMIT, getattr(config, name))})

    @torch.no_grad()
    def __call__(self, vis: Visual, rows: Tensor, prompts: list[list[int]], gen: GenerationConfig,
                 eos_id: int | tuple[int, ...], pad_id: int = 0,
                 on_first_token: Callable[[], None] | None = None, guide: Guide | None = None,
                 max_new_tokens: list[int] | None = None, on_done: Callable[[int], None] | None = None,
                 turns: bool = False) -> list[RowTokens]:
        """Generate for B text rows through the in-flight pool (lavi.serving.inflight) over this generator's cache,
        so one prefill, one decode step and one sampling path serve static and in-flight batches. Row i is
        conditioned on item `rows[i]` of `vis` (N items, N <= B), so one item's visual state serves all of its
        prompts. A static batch (not `turns`) has every row admitted at once and must fit the cache's rows; with
        `turns`, a batch larger than the cache's rows takes turns in them. `on_first_token` is called once the first
        admission's rows have their first token (a static batch: every row's; benchmarks time it). A row ends at any
        of `eos_id` (one id, or several: a chat model's end-of-turn and end-of-text) or its max_new_tokens (default
        gen's). guide: token masks for constrained rows (request i is row i); the host then looks at every step's
        tokens. on_done(n): told as n more rows finish."""
        cache = self.kv_cache
        if cache is None or (not turns and len(prompts) > cache.max_batch):
            have = f"{cache.max_batch} x {cache.max_seq}" if cache is not None else "none"
            raise ValueError(f"a batch of {len(prompts)} rows does not fit the cache ({have}): give the generator a "
                             "larger one (setup_caches)")
        return inflight(self, vis, rows, prompts, gen, eos_id, pad_id, max_new_tokens, guide, on_done, on_first_token)


def generate(model: LaVi, kv_cache: KVCache, vis: Visual, rows: Tensor, prompts: list[list[int]],
             gen: GenerationConfig, eos_id: int | tuple[int, ...], pad_id: int = 0) -> list[RowTokens]:
    """Eager generation over `kv_cache` with a throwaway `Generator` (see there)."""
    return Generator(model, kv_cache)(vis, rows, prompts, gen, eos_id, pad_id)


@torch.no_grad()
def inflight(generator: Generator, vis: Visual, rows: Tensor, prompts: list[list[int]], gen: GenerationConfig,
             eos_id: int | tuple[int, ...], pad_id: int = 0, max_new_tokens: list[int] | None = None,
             guide: Guide | None = None, on_done: Callable[[int], None] | None = None,
             on_first_token: Callable[[], None] | None = None) -> list[RowTokens]:
    """The requests (prompt i on item rows[i] of `vis`, already encoded) through one pool over `generator`'s cache,
    up to each request's max_new_tokens (default gen's). guide: token masks for constrained requests (request i is
    the guide's i). on_done(n): told as n more requests finish (progress while the call runs). on_first_token: called
    after the first admission's prefill, once its rows have their first token (a static batch: every row's)."""
    width = max(max_new_tokens or [gen.max_new_tokens])
    if max_new_tokens is not None and (len(max_new_tokens) != len(prompts) or min(max_new_tokens) < 1):
        raise ValueError("max_new_tokens: one count >= 1 per prompt")
    pool = InflightPool(generator, GenerationConfig(width, gen.temperature, gen.top_p, gen.seed), eos_id, pad_id,
                        guide=guide, rows=len(prompts))
    ticket = pool.submit(lambda idx: vis.select(torch.tensor(idx, device=vis.mask.device)), rows.tolist(), prompts,
                         max_new_tokens, on_rows=on_done)
    pool.on_admit = on_first_token
    pool.run(ticket)
    return ticket.results
