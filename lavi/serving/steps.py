"""The parts of generation that static batches (lavi.serving.generate) and in-flight batching (lavi.serving.inflight)
share: the generation settings, left padding, the prefill, the decode steps and sampling, over a static KV cache
(gpt-fast style: `setup_caches`, `prefill`, `decode_rows`). Pads are masked out of attention and do not
advance RoPE positions (`lavi.core.model.rope_positions`), so a row gives the same tokens in a batch as alone."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lavi.core.decoder import KVCache, LayerConds
from lavi.serving.constrain import Guide
from lavi.core.fusion import Visual
from lavi.core.model import LaVi, attention_mask, rope_positions
from lavi.visual_tokens.fastv import prefill_pruned


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


def pick(logits: Tensor, gen: GenerationConfig, generator: torch.Generator | None, guide: Guide | None = None,
         rows: list[int] = ()) -> Tensor:
    """The next ids of a prefill's or a decode step's logits (B, V), for both generation loops: constrained rows
    masked first and their guides advanced after (`rows[b]`: row b's request in `guide`, -1 for none; the host then
    looks at the tokens)."""
    if guide is not None:
        guide.mask_(logits, rows)
    tok = sample(logits, gen.temperature, gen.top_p, generator)
    if guide is not None:
        guide.advance(rows, tok.tolist())
    return tok


def prefill_positions(model: LaVi, vis: Visual, ids: Tensor, valid: Tensor, kvalid: Tensor) -> tuple[Tensor, Tensor]:
    """The RoPE positions of `model.inputs`' context (B, T0) and each row's first decode position (B,): the model's
    own where it has them (`model.prefill_positions`: Qwen-VL's M-RoPE, (3, B, T0)), else the real tokens counted."""
    if hasattr(model, "prefill_positions"):
        return model.prefill_positions(vis, ids, valid)
    return rope_positions(kvalid), kvalid.long().sum(1)


def run_prefill(model: LaVi, kv_cache, embeds: Tensor, kvalid: Tensor, keys: Tensor, conds: LayerConds | None,
                visual_positions: Tensor | None, work: Work, positions: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
    """The prefill both generation loops run: a context (B, T0) through the decoder into `kv_cache` (the cache, or
    rows of it), its RoPE positions (None: `rope_positions(kvalid)`), its attention mask over `keys` (the valid
    cache slots its queries see), FastV's pruning when `visual_positions` (B, T0) is given. -> (the last position's
    logits (B, V), FastV's kept slots (B, T0) or None)."""
    t0 = embeds.shape[1]
    slots = torch.arange(t0, device=embeds.device)
    positions = rope_positions(kvalid) if positions is None else positions  # (B, T0), or M-RoPE's (3, B, T0)
    mask = attention_mask(keys, slots, kvalid)
    work.prefills += 1
    work.prefill_tokens += embeds.shape[0] * t0
    if visual_positions is not None:
        return prefill_pruned(model, kv_cache, embeds, positions, mask, slots, kvalid, visual_positions,
                              model.visual_compress, conds)
    return prefill(model, kv_cache, embeds, positions, mask, slots, conds), None


def prefill(model: LaVi, kv_cache: KVCache, embeds: Tensor, positions: Tensor, mask: Tensor, slots: Tensor,
            conds: LayerConds | None) -> Tensor:
    logits, _ = model.decoder(embeds, positions, mask, conds=conds, kv_cache=kv_cache, input_pos=slots,
                              last_only=True)
    return logits[:, -1]  # (B, V): the lm_head runs on the last position only


def decode_rows(model: LaVi, kv_cache: KVCache, tok: Tensor, pos: Tensor, slot_valid: Tensor, slot: Tensor,
                vis_mask: Tensor, cond_kv: tuple[tuple[Tensor, Tensor], ...], factors: tuple[Tensor, ...] = (),
                deep_valid: Tensor | None = None) -> Tensor:
    """One decode step for B rows, tensors in and tensors out, so that it compiles whole (CUDA graphs), for both
    static and in-flight batches: tok (B, 1) last token; pos (B, 1) its RoPE position; slot_valid (B, S) real cache
    slots, the new one included; slot (B, 1) each row's own cache slot (rows started at different steps, or one slot
    for all); vis_mask (B, Nv), cond_kv ((K, U) per stage, ViLN) and factors (A per weight type, VLoRA) the per-row
    visual state (both empty for concat, whose visual tokens are in the cache) -> logits (B, V). deep_valid (B, S):
    FastV's slots for the layers past its layer (lavi.visual_tokens.fastv), or None."""
    conds = model.conds(Visual(mask=vis_mask, cond_kv=cond_kv, factors=factors))
    pruned = None if deep_valid is None else (model.visual_compress.layer, deep_valid[:, None, None, :])
    logits, _ = model.decoder(model.decoder.embed_tokens(tok), pos, slot_valid[:, None, None, :], conds=conds,
                              kv_cache=kv_cache, input_pos=slot, pruned=pruned)
    return logits[:, -1]


# A prefill group's padding: rows of a group are left-padded to its longest, and the group takes a row only while its
# padded tokens stay within this share of its real ones (or within PAD_TOKENS in all: short contexts batch whole)
PAD_SHARE, PAD_TOKENS = 0.25, 512


def context_lengths(model: LaVi, vis: Visual, prompts: list[list[int]]) -> list[int]:
    """Each request's prefill context, about: its prompt, and its visual tokens where they enter the context (a concat
    model's; `vision_in_context`), as `vis` (one row per request) holds them; a model that lays its context out
    otherwise says it (a Qwen-VL's `context_lengths`: a video's timestamps too)."""
    if not getattr(model, "vision_in_context", True):
        return [len(p) for p in prompts]
    own = getattr(model, "context_lengths", None)
    if own is not None:
        return own(vis, prompts)
    return [len(p) + n for p, n in zip(prompts, vis.mask.sum(1).tolist())]


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """The requests (by index) in prefill groups of similar context length, shortest first: every row of a group is
    padded to its longest, so a 1,500-token image beside a 4,700-token one would compute 3,200 tokens of padding (and
    attention over them). A group grows while its padding stays within PAD_SHARE of its real tokens or PAD_TOKENS."""
    groups: list[list[int]] = []
    real = longest = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]
        if groups:
            waste = (len(groups[-1]) + 1) * max(longest, n) - (real + n)
            if waste <= max(PAD_SHARE * (real + n), PAD_TOKENS):
                groups[-1].append(i)
                real, longest = real + n, max(longest, n)
                continue
        groups.append([i])
        real, longest = n, n
    return groups


def prunes_visual(model: LaVi) -> bool:
    """Whether the prefill prunes visual tokens (lavi.visual_tokens.fastv): a model whose visual tokens are in its
    context (concat, LLaVA-OneVision, Qwen-VL) set to `fastv` below 1.0."""
    vc = getattr(model, "visual_compress", None)
    return bool(getattr(model, "vision_in_context", False)) and vc is not None and vc.prunes


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

    @classmethod
    def grown(cls, f: "StepInputs | None", sub: Visual, b: int, s: int, d: torch.device, fastv: bool
              ) -> "StepInputs":
        """Buffers on device d for b rows over s cache slots that hold `sub`'s visual token axis: `f`'s rows in front (their
        padding masked), zeros past them; new ones (every row with one valid slot, so that a free row stays finite)
        where `f` is None. fastv: with FastV's deep slots."""
        nv = sub.mask.shape[1]

        def grown(t: Tensor | None, new: Tensor, dim: int) -> Tensor:  # old rows in front, zeros past them
            z = new.new_zeros([b, *new.shape[1:dim], max(nv, new.shape[dim]), *new.shape[dim + 1:]])
            if t is not None:
                z.narrow(dim, 0, t.shape[dim]).copy_(t)
            return z

        slot_valid = f.slot_valid if f is not None else torch.zeros(b, s, dtype=torch.bool, device=d)
        if f is None:
            slot_valid[:, 0] = True
        one = sub.select(torch.zeros(1, dtype=torch.long, device=d))
        return cls(
            slot_valid.clone(), grown(f.vis_mask if f else None, one.mask, 1),
            tuple((grown(f.cond_kv[g][0] if f else None, k, 2), grown(f.cond_kv[g][1] if f else None, u, 2))
                  for g, (k, u) in enumerate(one.cond_kv or ())),
            tuple(f.factors[i] if f else torch.zeros(b, *a.shape[1:], dtype=a.dtype, device=d)
                  for i, a in enumerate(one.factors or ())),
            (f.deep_valid if f else slot_valid).clone() if fastv else None)

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


def rows_that_fit(budget_bytes: float, per_row_bytes: float, ceiling: int = 1024, multiple: int = 8) -> int:
    """Generation rows that fit `budget_bytes` at `per_row_bytes` each: at least 1, at most `ceiling`, rounded
    down to a multiple of `multiple` once more than that fit."""
    if per_row_bytes <= 0:
        return ceiling
    rows = int(budget_bytes // per_row_bytes)
    if rows >= multiple:
        rows -= rows % multiple
    return max(1, min(ceiling, rows))
