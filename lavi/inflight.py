"""In-flight batching (`Generator.inflight`): a pool of the cache's rows that finished rows hand to waiting requests.

Each request is a prompt on one item of a batch's visual state. A row that finishes (EOS, or its own max_new_tokens)
frees its cache row; at the next admission (every `check_every` steps) a waiting request's prompt is prefilled into
that row from slot 0 (`RowsPrefill`), its visual state set in that row of the decode step's fixed buffers, and it
decodes beside the others with its own cache slot and RoPE position, so that its tokens are those it would
generate alone.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .constrain import Guide
from .decoder import RowsPrefill
from .fastv import prefill_pruned
from .fusion import Visual
from .generate import GenerationConfig, Generator, RowTokens, StepInputs, _fastv, left_pad, prefill, sample
from .model import attention_mask


@torch.no_grad()
def inflight(generator: Generator, vis: Visual, rows: Tensor, prompts: list[list[int]], gen: GenerationConfig,
             eos_id: int | tuple[int, ...], pad_id: int = 0,
             max_new_tokens: list[int] | None = None, guide: Guide | None = None,
             on_done: Callable[[int], None] | None = None) -> list[RowTokens]:
    """In-flight batching: the requests (row i: prompt i on item rows[i] of `vis`) go through a pool of the
    cache's max_batch rows; when a row finishes (EOS, or its own max_new_tokens, default gen's), a waiting
    request takes it at the next admission (every `check_every` steps): its prompt is prefilled into that
    row's cache from slot 0, its visual state set in that row, and it decodes beside the others. Each row has
    its own cache slot and RoPE position, so its tokens are those it would generate alone. guide: token masks
    for constrained requests (see `__call__`). on_done(n): told as each admission finds n more requests done
    (progress while the call runs)."""
    model, device, cache = generator.model, generator.model.device, generator.kv_cache
    n = len(prompts)
    budgets = list(max_new_tokens) if max_new_tokens is not None else [gen.max_new_tokens] * n
    if len(budgets) != n or min(budgets, default=1) < 1:
        raise ValueError("max_new_tokens: one count >= 1 per prompt")
    if cache is None:
        raise ValueError("in-flight batching needs the generator's cache (setup_caches)")
    eos_ids = (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)
    eos = torch.tensor(eos_ids, device=device)
    b, s, width = min(cache.max_batch, n), cache.max_seq, max(budgets, default=1)
    rows = rows.to(device)
    # the pool's state, one entry per cache row; a free row holds one valid slot so that it stays finite
    slot_valid = torch.zeros(b, s, dtype=torch.bool, device=device)
    slot_valid[:, 0] = True
    one = vis.select(rows[:1].expand(b))
    fastv = _fastv(model, vis)
    fixed = generator._fixed(StepInputs(slot_valid, torch.zeros_like(one.mask),
                                   tuple((torch.zeros_like(k), torch.zeros_like(u)) for k, u in one.cond_kv or ()),
                                   tuple(torch.zeros_like(a) for a in one.factors or ()),
                                   slot_valid.clone() if fastv else None))
    pos = torch.zeros(b, 1, dtype=torch.long, device=device)
    slot = torch.zeros(b, 1, dtype=torch.long, device=device)
    tok = torch.full((b,), pad_id, dtype=torch.long, device=device)
    done = torch.ones(b, dtype=torch.bool, device=device)
    count = torch.zeros(b, dtype=torch.long, device=device)
    budget = torch.ones(b, dtype=torch.long, device=device)
    out = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    ar = torch.arange(b, device=device)
    rng = torch.Generator(device=device).manual_seed(gen.seed) if gen.temperature > 0 else None
    owner = [-1] * b  # the request each cache row serves
    waiting = list(range(n))[::-1]
    results: list[RowTokens | None] = [None] * n

    def admit(free: list[int]) -> None:
        reqs = [waiting.pop() for _ in range(min(len(free), len(waiting)))]
        idx = torch.tensor(free[:len(reqs)], device=device)
        ids, valid = left_pad([prompts[r] for r in reqs], pad_id, device)
        sub = vis.select(rows[torch.tensor(reqs, device=device)])
        embeds, kvalid, conds = model.inputs(sub, ids, valid)
        t0 = embeds.shape[1]
        if t0 + max(budgets[r] for r in reqs) > s:
            raise ValueError(f"a prompt of {t0} slots and its new tokens do not fit the cache's {s} slots")
        slots = torch.arange(t0, device=device)
        positions = (kvalid.long().cumsum(1) - 1).clamp(min=0)
        mask = attention_mask(kvalid, slots, kvalid)
        if fastv:
            logits, kept = prefill_pruned(model, RowsPrefill(cache, idx), embeds, positions, mask, slots, kvalid,
                                          model.visual_positions(sub, ids, valid), model.visual_compress)
            fixed.deep_valid[idx] = False
            fixed.deep_valid[idx, :t0] = kept
        else:
            logits = prefill(model, RowsPrefill(cache, idx), embeds, positions, mask, slots, conds)
        fixed.slot_valid[idx] = False
        fixed.slot_valid[idx, :t0] = kvalid
        fixed.vis_mask[idx] = sub.mask
        for (k, u), (k1, u1) in zip(fixed.cond_kv, sub.cond_kv or ()):
            k[idx], u[idx] = k1, u1
        for a, a1 in zip(fixed.factors, sub.factors or ()):
            a[idx] = a1
        if guide is not None:
            guide.mask_(logits, reqs)
        first = sample(logits, gen.temperature, gen.top_p, rng)
        if guide is not None:
            guide.advance(reqs, first.tolist())
        pos[idx, 0], slot[idx, 0] = kvalid.long().sum(1), t0
        tok[idx], out[idx, 0], count[idx] = first, first, 1
        budget[idx] = torch.tensor([budgets[r] for r in reqs], device=device)
        done[idx] = torch.isin(first, eos) | (budget[idx] <= 1)
        for r, req in zip(free, reqs):
            owner[r] = req

    def collect() -> list[int]:
        """Store the finished rows' tokens; return the free rows."""
        finished = done.tolist()
        counts, toks = None, None
        newly = sum(1 for r in range(b) if finished[r] and owner[r] >= 0)
        if newly and on_done is not None:
            on_done(newly)
        for r in range(b):
            if finished[r] and owner[r] >= 0:
                if toks is None:
                    counts, toks = count.tolist(), out.tolist()
                row = toks[r][:counts[r]]
                end = next((i for i, t in enumerate(row) if t in eos_ids), None)
                results[owner[r]] = RowTokens(tokens=row if end is None else row[:end], finished=end is not None)
                owner[r] = -1
        return [r for r in range(b) if owner[r] < 0]

    with generator._recompiles():
        while True:
            free = collect()
            if waiting and free:
                admit(free)
            elif len(free) == b:
                break
            for _ in range(generator.check_every):
                live = ~done
                fixed.slot_valid[ar, slot[:, 0]] |= live  # the new token's slot, where a row goes on
                if fastv:
                    fixed.deep_valid[ar, slot[:, 0]] |= live
                if generator.compiled and generator.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                logits = generator.row_step(model, cache, tok[:, None], pos, fixed.slot_valid, slot,
                                       fixed.vis_mask, fixed.cond_kv, fixed.factors, fixed.deep_valid)
                serving = ([owner[r] if on else -1 for r, on in enumerate(live.tolist())]
                           if guide is not None else [])
                if guide is not None:
                    guide.mask_(logits, serving)
                nxt = sample(logits, gen.temperature, gen.top_p, rng)
                if guide is not None:
                    guide.advance(serving, nxt.tolist())
                tok = torch.where(live, nxt, tok)
                out[ar, count.clamp(max=width - 1)] = torch.where(live, nxt, out[ar, count.clamp(max=width - 1)])
                count = count + live.long()
                done = done | (live & (torch.isin(nxt, eos) | (count >= budget)))
                pos = pos + live.long()[:, None]
                slot = slot + live.long()[:, None]
    return results
