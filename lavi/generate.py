"""Batched generation over a static KV cache, gpt-fast style: `setup_caches`, `prefill`, `decode_one_token`.

Prompts are left-padded; pad slots are masked out of attention and do not advance RoPE positions,
so a row gives the same tokens in a batch as alone. The visual state is computed once per batch
of items (`LaVi.encode`) and gathered per text row; visual tokens never enter the ViLN KV cache.

What a model gives the generator (LaVi does; a model that places its visual tokens elsewhere in the
prompt plugs in the same way):
    model.inputs(vis, ids, valid) -> (embeds (B, T0, d), key validity (B, T0), conds | None)
        the prefill's context: text embeddings with any visual tokens in place, and which are real
    model.conds(vis) -> conds | None
        the conditioning of a decode step, from the per-row visual state (`Visual`: mask, cond_kv, factors)
    model.decoder
        a `lavi.decoder.Decoder`, run over the generator's `KVCache`
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .constrain import Guide
from .decoder import KVCache, LayerConds
from .fastv import prefill_pruned
from .fusion import Visual
from .model import LaVi, attention_mask

# one graph per batch shape (batch size, visual tokens): more than dynamo's default number of recompiles
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 48
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass
class RowTokens:
    """What one text row generated."""

    tokens: list[int]  # generated ids, EOS excluded
    finished: bool  # True when the row stopped at EOS, False when it hit max_new_tokens


def setup_caches(model: LaVi, max_batch: int, max_seq: int) -> KVCache:
    """The decoder's static KV cache, allocated once, for up to `max_batch` rows of `max_seq` slots."""
    return KVCache(model.decoder.config, max_batch, max_seq, model.dtype, model.device)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), t, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        ids[i, t - len(p):] = torch.tensor(p)
        valid[i, t - len(p):] = True
    return ids.to(device), valid.to(device)


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """logits (B, V) -> next ids (B,). Greedy at temperature 0; nucleus sampling otherwise."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: LaVi, kv_cache: KVCache, embeds: Tensor, positions: Tensor, mask: Tensor, slots: Tensor,
            conds: LayerConds | None) -> Tensor:
    logits, _ = model.decoder(embeds, positions, mask, conds=conds, kv_cache=kv_cache, input_pos=slots,
                              last_only=True)
    return logits[:, -1]  # (B, V): the lm_head runs on the last position only


def decode_one_token(model: LaVi, kv_cache: KVCache, tok: Tensor, pos: Tensor, slot_valid: Tensor, slot: Tensor,
                     vis_mask: Tensor, cond_kv: tuple[tuple[Tensor, Tensor], ...],
                     factors: tuple[Tensor, ...] = (), deep_valid: Tensor | None = None) -> Tensor:
    """One decode step for B rows, tensors in and tensors out, so that it compiles whole (CUDA graphs):
    tok (B, 1) last token; pos (B, 1) its RoPE position; slot_valid (B, S) real cache slots, the new one
    included; slot (1,) its cache slot; vis_mask (B, Nv), cond_kv ((K, U) per stage, ViLN) and factors (A per
    weight type, VLoRA) the per-row visual state (both empty for concat, whose visual tokens are in the cache)
    -> logits (B, V). deep_valid (B, S): FastV's slots for the layers past its layer (lavi.fastv), or None."""
    conds = model.conds(Visual(mask=vis_mask, cond_kv=cond_kv, factors=factors))
    real = torch.ones_like(tok, dtype=torch.bool)
    mask = attention_mask(slot_valid, slot, real)  # (B, 1, 1, S)
    pruned = None if deep_valid is None else (model.visual_compress.layer, attention_mask(deep_valid, slot, real))
    logits, _ = model.decoder(model.decoder.embed_tokens(tok), pos, mask, conds=conds, kv_cache=kv_cache,
                              input_pos=slot, pruned=pruned)
    return logits[:, -1]


def decode_rows(model: LaVi, kv_cache: KVCache, tok: Tensor, pos: Tensor, slot_valid: Tensor, slot: Tensor,
                vis_mask: Tensor, cond_kv: tuple[tuple[Tensor, Tensor], ...], factors: tuple[Tensor, ...] = (),
                deep_valid: Tensor | None = None) -> Tensor:
    """`decode_one_token` for in-flight batching: slot (B, 1) is each row's own cache slot (rows started at different
    steps); a row attends to its real slots, the new one included. Static shapes, so it compiles as that does."""
    conds = model.conds(Visual(mask=vis_mask, cond_kv=cond_kv, factors=factors))
    pruned = None if deep_valid is None else (model.visual_compress.layer, deep_valid[:, None, None, :])
    logits, _ = model.decoder(model.decoder.embed_tokens(tok), pos, slot_valid[:, None, None, :], conds=conds,
                              kv_cache=kv_cache, input_pos=slot, pruned=pruned)
    return logits[:, -1]


def prunes_visual(model: LaVi) -> bool:
    """Whether the prefill prunes visual tokens (lavi.fastv): a concat model set to `fastv` below 1.0."""
    vc = getattr(model, "visual_compress", None)
    return (getattr(model, "projector", None) is not None and vc is not None and vc.method == "fastv"
            and not vc.is_identity)


@dataclass
class StepInputs:
    """The per-batch tensors the decode step reads besides the cache, in buffers at fixed addresses (a CUDA
    graph replays its reads from the addresses it recorded), refilled in place for a batch of equal shapes."""

    slot_valid: Tensor  # (B, S) real cache slots
    vis_mask: Tensor  # (B, Nv)
    cond_kv: tuple[tuple[Tensor, Tensor], ...]  # ViLN: per stage (K, U), each (B, Hc, Nv, Dh); () otherwise
    factors: tuple[Tensor, ...] = ()  # VLoRA: per weight type A, each (B, L_mod, d_in, r); () otherwise
    deep_valid: Tensor | None = None  # FastV: (B, S) the slots the layers past its layer attend to; None otherwise

    def tensors(self) -> list[Tensor]:
        deep = [self.deep_valid] if self.deep_valid is not None else []
        return [self.slot_valid, self.vis_mask, *(t for pair in self.cond_kv for t in pair), *self.factors, *deep]

    def matches(self, other: "StepInputs") -> bool:
        return [(t.shape, t.dtype) for t in self.tensors()] == [(t.shape, t.dtype) for t in other.tensors()]

    def empty_like(self) -> "StepInputs":
        return StepInputs(torch.empty_like(self.slot_valid), torch.empty_like(self.vis_mask),
                          tuple((torch.empty_like(k), torch.empty_like(u)) for k, u in self.cond_kv),
                          tuple(torch.empty_like(a) for a in self.factors),
                          None if self.deep_valid is None else torch.empty_like(self.deep_valid))

    def copy_(self, other: "StepInputs") -> "StepInputs":
        for buf, t in zip(self.tensors(), other.tensors()):
            buf.copy_(t)
        return self


@dataclass
class Work:
    """What a generator has computed so far, for a progress display and a watchdog (plain host counters, never a
    device sync): prefill batches and their tokens (rows x context), decode steps."""

    prefills: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"prefills": self.prefills, "prefill_tokens": self.prefill_tokens, "decode_steps": self.decode_steps}


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
        self.step, self.row_step = decode_one_token, decode_rows
        if compile:
            mode = "reduce-overhead" if backend == "inductor" and self.cuda else None
            self.step = torch.compile(decode_one_token, mode=mode, fullgraph=True, dynamic=False, backend=backend)
            self.row_step = torch.compile(decode_rows, mode=mode, fullgraph=True, dynamic=False, backend=backend)
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
                 on_first_token: Callable[[], None] | None = None, guide: Guide | None = None) -> list[RowTokens]:
        """Generate for B text rows; row i is conditioned on item `rows[i]` of `vis` (N items, N <= B), so one
        item's visual state serves all of its prompts. `on_first_token` is called once the first token of
        every row exists (benchmarks time it). A row ends at any of `eos_id` (one id, or several: a chat model's
        end-of-turn and end-of-text). guide: token masks for constrained rows (request i is row i); the host then
        looks at every step's tokens."""
        model, device, cache = self.model, self.model.device, self.kv_cache
        eos_ids = (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)
        eos = torch.tensor(eos_ids, device=device)
        b = len(prompts)
        ids, valid = left_pad(prompts, pad_id, device)
        vis = vis.select(rows.to(device))
        embeds, kvalid, conds = model.inputs(vis, ids, valid)
        t0 = embeds.shape[1]
        if cache is None or not cache.fits(b, t0 + gen.max_new_tokens):
            have = f"{cache.max_batch} x {cache.max_seq}" if cache is not None else "none"
            raise ValueError(f"batch {b} x {t0 + gen.max_new_tokens} slots does not fit the cache ({have}): "
                             "give the generator a larger one (setup_caches)")
        slot_valid = torch.zeros(b, cache.max_seq, dtype=torch.bool, device=device)
        slot_valid[:, :t0] = kvalid
        fastv = prunes_visual(model)
        fixed = self._fixed(StepInputs(slot_valid, vis.mask, vis.cond_kv or (), vis.factors or (),
                                       slot_valid.clone() if fastv else None))
        slots = torch.arange(t0, device=device)
        positions = (kvalid.long().cumsum(1) - 1).clamp(min=0)  # (B, T0): pads do not advance RoPE
        pos = kvalid.long().sum(1, keepdim=True)  # (B, 1): the next token's position
        generator = torch.Generator(device=device).manual_seed(gen.seed) if gen.temperature > 0 else None

        mask = attention_mask(fixed.slot_valid, slots, kvalid)
        self.work.prefills += 1
        self.work.prefill_tokens += b * t0
        if fastv:
            logits, kept = prefill_pruned(model, cache, embeds, positions, mask, slots, kvalid,
                                          model.visual_positions(vis, ids, valid), model.visual_compress)
            fixed.deep_valid[:, :t0] = kept
        else:
            logits = prefill(model, cache, embeds, positions, mask, slots, conds)
        out = torch.full((b, gen.max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        slot = torch.empty(1, dtype=torch.long, device=device)
        with self._recompiles():
            for i in range(gen.max_new_tokens):
                if i:
                    slot.fill_(t0 + i - 1)
                    fixed.slot_valid[:, t0 + i - 1] = True
                    if fastv:
                        fixed.deep_valid[:, t0 + i - 1] = True
                    if self.compiled and self.cuda:
                        torch.compiler.cudagraph_mark_step_begin()
                    logits = self.step(model, cache, tok[:, None], pos, fixed.slot_valid, slot, fixed.vis_mask,
                                       fixed.cond_kv, fixed.factors, fixed.deep_valid)
                    self.work.decode_steps += 1
                    pos = pos + 1
                live = [-1 if d else r for r, d in enumerate(done.tolist())] if guide is not None else []
                if guide is not None:
                    guide.mask_(logits, live)
                tok = sample(logits, gen.temperature, gen.top_p, generator)
                tok = torch.where(done, torch.full_like(tok, pad_id), tok)
                if guide is not None:
                    guide.advance(live, tok.tolist())
                out[:, i] = tok
                done |= torch.isin(tok, eos)
                if i == 0 and on_first_token is not None:
                    on_first_token()
                if (i + 1) % self.check_every == 0 and bool(done.all()):  # one host sync every check_every steps
                    break

        results = []
        for row in out.tolist():
            end = next((i for i, t in enumerate(row) if t in eos_ids), None)
            results.append(RowTokens(tokens=row if end is None else row[:end], finished=end is not None))
        return results


    def inflight(self, vis: Visual, rows: Tensor, prompts: list[list[int]], gen: GenerationConfig,
                 eos_id: int | tuple[int, ...], pad_id: int = 0,
                 max_new_tokens: list[int] | None = None, guide: Guide | None = None,
                 on_done: Callable[[int], None] | None = None) -> list[RowTokens]:
        """In-flight batching over this generator's cache and decode step (`lavi.inflight`)."""
        from .inflight import inflight

        return inflight(self, vis, rows, prompts, gen, eos_id, pad_id, max_new_tokens, guide, on_done)


def generate(model: LaVi, kv_cache: KVCache, vis: Visual, rows: Tensor, prompts: list[list[int]],
             gen: GenerationConfig, eos_id: int | tuple[int, ...], pad_id: int = 0) -> list[RowTokens]:
    """Eager generation over `kv_cache` with a throwaway `Generator` (see there)."""
    return Generator(model, kv_cache)(vis, rows, prompts, gen, eos_id, pad_id)
