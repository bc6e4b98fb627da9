"""Batched generation over a static KV cache, gpt-fast style: `prefill`, `decode_one_token`, `generate`.

Prompts are left-padded; pad slots are masked out of attention and do not advance RoPE positions,
so a row gives the same tokens in a batch as alone. The visual state is computed once per batch
of items (`LaVi.encode`) and gathered per text row; visual tokens never enter the ViLN KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .decoder import LayerConds
from .fusion import Visual
from .model import LaVi, attention_mask


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
class Generated:
    tokens: list[int]  # generated ids, EOS excluded
    finished: bool  # True when the row stopped at EOS, False when it hit max_new_tokens


def setup_caches(model: LaVi, max_batch: int, max_seq: int) -> None:
    """Allocate the decoder's static KV cache once for up to `max_batch` rows of `max_seq` slots."""
    model.decoder.setup_caches(max_batch, max_seq)
    model.cache_shape = (max_batch, max_seq)


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


def prefill(model: LaVi, embeds: Tensor, positions: Tensor, mask: Tensor, slots: Tensor,
            conds: LayerConds | None) -> Tensor:
    logits, _ = model.decoder(embeds, positions, mask, slots, conds, last_only=True)
    return logits[:, -1]  # (B, V): the lm_head runs on the last position only


def decode_one_token(model: LaVi, tok: Tensor, position: Tensor, mask: Tensor, slot: Tensor,
                     conds: LayerConds | None) -> Tensor:
    """tok (B, 1); position (B, 1) RoPE position; mask (B, 1, 1, S); slot (1,) cache slot -> logits (B, V)."""
    embeds = model.decoder.embed_tokens(tok)
    logits, _ = model.decoder(embeds, position, mask, slot, conds)
    return logits[:, -1]


@torch.no_grad()
def generate(model: LaVi, vis: Visual, rows: Tensor, prompts: list[list[int]], gen: GenerationConfig,
             eos_id: int, pad_id: int = 0) -> list[Generated]:
    """Generate for B text rows; row i is conditioned on item `rows[i]` of `vis` (N items, N <= B),
    so one item's visual state serves all of its prompts."""
    device = model.device
    b = len(prompts)
    ids, valid = left_pad(prompts, pad_id, device)
    embeds, kvalid, conds = model.inputs(vis.select(rows.to(device)), ids, valid)
    t0 = embeds.shape[1]
    need = t0 + gen.max_new_tokens
    max_batch, max_seq = getattr(model, "cache_shape", (0, 0))
    if b > max_batch or need > max_seq:
        raise ValueError(f"batch {b} x {need} slots does not fit the cache ({max_batch} x {max_seq}): "
                         "call setup_caches with larger sizes")
    slot_valid = torch.zeros(b, max_seq, dtype=torch.bool, device=device)
    slot_valid[:, :t0] = kvalid
    slots = torch.arange(t0, device=device)
    positions = (kvalid.long().cumsum(1) - 1).clamp(min=0)  # (B, T0)
    next_pos = kvalid.long().sum(1, keepdim=True)  # (B, 1)
    generator = torch.Generator(device=device).manual_seed(gen.seed) if gen.temperature > 0 else None

    logits = prefill(model, embeds, positions, attention_mask(slot_valid, slots, kvalid), slots, conds)
    out = torch.full((b, gen.max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    ones = torch.ones(b, 1, dtype=torch.bool, device=device)
    step_slots = torch.arange(t0, t0 + gen.max_new_tokens, device=device)  # allocated once, sliced per step
    for i in range(gen.max_new_tokens):
        tok = sample(logits, gen.temperature, gen.top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out[:, i] = tok
        done |= tok == eos_id
        if bool(done.all()) or i == gen.max_new_tokens - 1:
            break
        slot = step_slots[i:i + 1]
        slot_valid[:, t0 + i] = True
        logits = decode_one_token(model, tok[:, None], next_pos, attention_mask(slot_valid, slot, ones), slot, conds)
        next_pos = next_pos + 1

    results = []
    for row in out.tolist():
        finished = eos_id in row
        results.append(Generated(tokens=row[: row.index(eos_id)] if finished else row, finished=finished))
    return results
