"""In-flight batching: a pool of the cache's rows that finished rows hand to waiting requests, across calls.

A request is a prompt on one item of a submission (a block of items and their prompts). A row that finishes (EOS,
or its own max_new_tokens) frees its cache row; at the next admission (every `check_every` decode steps) waiting
requests take the free rows: their items' visual states are encoded then (`encode`, once per item, batched over
the items of that admission, let go once every request of the item is admitted), their prompts are prefilled into
those rows from slot 0 (`RowsPrefill`), their visual states set in those rows of the decode step's fixed buffers,
and they decode beside the others, each with its own cache slot and RoPE position, so that its tokens are those it
would generate alone. Requests of the next submission are admitted while the current one drains: the pool stays
full across blocks (the labeler's actor submits each block as it arrives, `Engine.submit`).
"""
from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from lavi.serving.constrain import Constraint, Guide, Vocabulary
from lavi.core.decoder import RowsPrefill
from lavi.core.fusion import Visual
from lavi.serving.tickets import Item, Request, Ticket
from lavi.serving.steps import (GenerationConfig, RowTokens, StepInputs, context_lengths, left_pad, pick, prefill_groups,
                                prefill_positions, prunes_visual, run_prefill)

if TYPE_CHECKING:  # the pool runs over a Generator's cache and decode step; generate builds pools (no cycle)
    from lavi.serving.generate import Generator


class InflightPool:
    """The pool over `generator`'s cache (its max_batch rows) for one GenerationConfig. `submit` may be called from
    another thread than the one that runs `step`; everything else belongs to the stepping thread."""

    def __init__(self, generator: Generator, gen: GenerationConfig, eos_id: int | tuple[int, ...], pad_id: int = 0,
                 vocabulary: Vocabulary | None = None, guide: Guide | None = None, rows: int | None = None) -> None:
        """guide: the token masks of a pool that serves one submission whose constraints it already holds (request
        i is the guide's i); otherwise the pool makes its own from `vocabulary` when a constrained request comes.
        rows: the pool's size (default: every row of the cache)."""
        self.g, self.gen, self.pad_id = generator, gen, pad_id
        self.model = generator.model
        self.eos_ids = (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)
        self.vocab, self.guide, self._given_guide = vocabulary, guide, guide is not None
        cache = generator.kv_cache
        if cache is None:
            raise ValueError("in-flight batching needs the generator's cache (setup_caches)")
        self.b, self.s, device = min(cache.max_batch, rows or cache.max_batch), cache.max_seq, self.model.device
        self.device, self.fastv = device, prunes_visual(self.model)
        self.eos = torch.tensor(self.eos_ids, device=device)
        self.width = gen.max_new_tokens
        self.fixed: StepInputs | None = None  # allocated at the first admission (its visual state's shapes)
        self.pos = torch.zeros(self.b, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(self.b, 1, dtype=torch.long, device=device)
        self.tok = torch.full((self.b,), pad_id, dtype=torch.long, device=device)
        self.done = torch.ones(self.b, dtype=torch.bool, device=device)
        self.count = torch.zeros(self.b, dtype=torch.long, device=device)
        self.budget = torch.ones(self.b, dtype=torch.long, device=device)
        self.out = torch.full((self.b, self.width), pad_id, dtype=torch.long, device=device)
        self.ar = torch.arange(self.b, device=device)
        self.rng = torch.Generator(device=device).manual_seed(gen.seed) if gen.temperature > 0 else None
        self.owner: list[Request | None] = [None] * self.b  # the request each cache row serves
        self.left = [0] * self.b  # the most tokens each row may still take (on the host: no device sync to know it)
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()
        self.gids = 0
        self.on_admit: Callable[[], None] | None = None  # told once, after the next admission (then forgotten)

    # -- submissions ----------------------------------------------------------------------------------------
    def submit(self, encode: Callable[[list[int]], Visual], items: Sequence[int], prompts: Sequence[list[int]],
               budgets: Sequence[int] | None = None, constraints: Sequence[Constraint | None] | None = None,
               on_rows: Callable[[int], None] | None = None) -> Ticket:
        """Request i: prompts[i] on the submission's item items[i] (`encode(indices)` gives those items' visual
        state), at most budgets[i] new tokens (default: the pool's). on_rows(n): told as n more of them finish."""
        n = len(prompts)
        budgets = list(budgets) if budgets is not None else [self.width] * n
        if len(items) != n or len(budgets) != n or (n and not 1 <= min(budgets) <= max(budgets) <= self.width):
            raise ValueError(f"one item and one max_new_tokens in [1, {self.width}] per prompt")
        ticket = Ticket(results=[None] * n, ids=[], prompts=[list(p) for p in prompts], on_rows=on_rows, remaining=n)
        if n == 0:
            ticket.done.set()
            return ticket
        shared: dict[int, Item] = {}
        for j in items:
            shared.setdefault(j, Item(encode, j, 0)).waiting += 1
        with self.lock:
            if constraints is not None and any(c is not None for c in constraints) and not self._given_guide:
                if self.guide is None:
                    if self.vocab is None:
                        raise ValueError("constrained requests need the engine's vocabulary")
                    self.guide = Guide(self.vocab, [None] * self.gids)
                start = self.guide.extend(constraints)
                assert start == self.gids
            elif self.guide is not None and not self._given_guide:
                self.guide.extend([None] * n)
            for i in range(n):
                ticket.ids.append(self.gids)
                self.waiting.append(Request(ticket, i, shared[items[i]], list(prompts[i]), budgets[i], self.gids))
                self.gids += 1
        return ticket

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(o is not None for o in self.owner)

    # -- the stepping thread --------------------------------------------------------------------------------
    @property
    def in_flight(self) -> bool:
        return any(o is not None for o in self.owner)

    def resize(self) -> None:
        """Take the generator's cache as it is now (a larger one): only while no row is in flight."""
        if self.in_flight:
            raise RuntimeError("the in-flight pool's cache can change only while no row is in flight")
        cache = self.g.kv_cache
        self.b, self.s = min(self.b, cache.max_batch), cache.max_seq
        self.fixed, self.left = None, [0] * self.b

    @torch.no_grad()
    def step(self, admit: bool = True) -> bool:
        """Collect finished rows, admit waiting requests into free ones (unless not `admit`: the pool drains),
        then decode steps until the host looks again: every `check_every` tokens (an admission's first token
        counts), and no further than the rows' budgets reach (a row done at EOS is seen at the next look). False when there was nothing to do (no row in
        flight, none admitted)."""
        free = self._collect()
        with self.lock:
            n = min(len(free), len(self.waiting)) if admit else 0
            take = [self.waiting.popleft() for _ in range(n)]
        if take:
            try:
                self._admit(free[:len(take)], take)
            except BaseException:
                with self.lock:  # back in the queue, so that reset() fails their tickets (none waits forever)
                    self.waiting.extendleft(reversed(take))
                raise
        elif len(free) == self.b:
            return False
        steps = min(self.g.check_every - bool(take), max(self.left))  # no further than the rows' budgets reach
        with self.g._recompiles():
            for _ in range(steps):
                self._decode()
        self.left = [max(0, n - steps) for n in self.left]
        return True

    def run(self, ticket: Ticket | None = None) -> None:
        """Step until `ticket` is done (None: until the pool is idle)."""
        while not (ticket.done.is_set() if ticket is not None else False) and self.step():
            pass

    def reset(self, err: BaseException) -> list[Ticket]:
        """After a failed step: every ticket with a request in flight or waiting fails with `err`, and the pool
        starts empty. Returns those tickets."""
        with self.lock:
            reqs = [o for o in self.owner if o is not None] + list(self.waiting)
            self.waiting.clear()
        self.owner, self.left = [None] * self.b, [0] * self.b
        self.done.fill_(True)
        tickets = list({id(r.ticket): r.ticket for r in reqs}.values())
        for t in tickets:
            t.fail(err)
        return tickets

    def check(self, ticket: Ticket, i: int, text: str) -> str | None:
        """Why request i of `ticket`'s finished text breaks its constraint (None: it meets it, or has none)."""
        return self.guide.check(ticket.ids[i], text) if self.guide is not None else None

    def _collect(self) -> list[int]:
        """Store the finished rows' tokens in their tickets; return the free rows."""
        finished = self.done.tolist()
        counts = toks = None
        told: dict[int, tuple[Ticket, int]] = {}
        for r in range(self.b):
            req = self.owner[r]
            if finished[r] and req is not None:
                if toks is None:
                    counts, toks = self.count.tolist(), self.out.tolist()
                row = toks[r][:counts[r]]
                end = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
                req.ticket.finish(req.i, RowTokens(tokens=row if end is None else row[:end], finished=end is not None))
                t, k = told.get(id(req.ticket), (req.ticket, 0))
                told[id(req.ticket)] = (t, k + 1)
                self.owner[r], self.left[r] = None, 0
        for t, k in told.values():
            if t.on_rows is not None:
                t.on_rows(k)
        return [r for r in range(self.b) if self.owner[r] is None]

    def _visuals(self, take: list[Request]) -> Visual:
        """The admitted requests' visual state, one row each: items not encoded yet are encoded now, a batch per
        submission; an item whose requests are all admitted is let go."""
        fresh: dict[int, list[Item]] = {}
        for r in take:
            if r.item.vis is None and all(r.item is not x for x in fresh.get(id(r.item.encode), [])):
                fresh.setdefault(id(r.item.encode), []).append(r.item)
        for group in fresh.values():
            vis = group[0].encode([x.index for x in group])
            for k, x in enumerate(group):
                x.vis = vis.select(torch.tensor([k], device=vis.mask.device))
        parts = [r.item.vis for r in take]
        for r in take:
            r.item.waiting -= 1
            if r.item.waiting == 0:
                r.item.vis = None
        return Visual.cat(parts)

    def _fit(self, sub: Visual) -> StepInputs:
        """The decode step's fixed buffers, allocated at the first admission and grown (`StepInputs.grown`) when an
        item brings a longer visual token axis than any before it."""
        f = self.fixed
        if f is None or f.vis_mask.shape[1] < sub.mask.shape[1]:
            self.fixed = self.g._fixed(StepInputs.grown(f, sub, self.b, self.s, self.device, self.fastv))
        return self.fixed

    def _admit(self, free: list[int], take: list[Request]) -> None:
        """The requests `take` into the free cache rows `free`: their visual states encoded, then prefilled in groups
        of similar context length (`prefill_groups`: rows padded to a much longer neighbour's length would compute its
        padding, quadratically in attention), each row given its first token."""
        sub = self._visuals(take)
        fixed = self._fit(sub)
        lengths = context_lengths(self.model, sub, [r.prompt for r in take])
        for group in prefill_groups(lengths):
            self._prefill([free[i] for i in group], [take[i] for i in group],
                          sub.select(torch.tensor(group, device=sub.mask.device)), fixed)
        for row, r in zip(free, take):
            self.owner[row] = r
            self.left[row] = r.budget - 1
        if self.on_admit is not None:
            self.on_admit, told = None, self.on_admit
            told()

    def _prefill(self, rows: list[int], take: list[Request], sub: Visual, fixed: StepInputs) -> None:
        """One prefill of requests `take` (their visual state `sub`) into cache rows `rows`, and those rows' state in
        the decode step's buffers."""
        model, d = self.model, self.device
        idx = torch.tensor(rows, device=d)
        ids, valid = left_pad([r.prompt for r in take], self.pad_id, d)
        embeds, kvalid, conds = model.inputs(sub, ids, valid)
        t0 = embeds.shape[1]
        if t0 + max(r.budget for r in take) > self.s:
            raise ValueError(f"a prompt of {t0} slots and its new tokens do not fit the cache's {self.s} slots: give the "
                             "generator a larger one (setup_caches)")
        positions, nxt = prefill_positions(model, sub, ids, valid, kvalid)
        logits, kept = run_prefill(model, RowsPrefill(self.g.kv_cache, idx), embeds, kvalid, kvalid, conds,
                                   model.visual_positions(sub, ids, valid) if self.fastv else None, self.g.work,
                                   positions)
        if self.fastv:
            fixed.deep_valid[idx] = False
            fixed.deep_valid[idx, :t0] = kept
        nv = sub.mask.shape[1]
        fixed.slot_valid[idx] = False
        fixed.slot_valid[idx, :t0] = kvalid
        fixed.vis_mask[idx] = False
        fixed.vis_mask[idx, :nv] = sub.mask
        for (k, u), (k1, u1) in zip(fixed.cond_kv, sub.cond_kv or ()):
            k[idx], u[idx] = 0, 0
            k[idx, :, :nv], u[idx, :, :nv] = k1, u1
        for a, a1 in zip(fixed.factors, sub.factors or ()):
            a[idx] = a1
        first = pick(logits, self.gen, self.rng, self.guide, [r.gid for r in take])
        self.pos[idx, 0], self.slot[idx, 0] = nxt, t0
        self.tok[idx], self.out[idx, 0], self.count[idx] = first, first, 1
        self.budget[idx] = torch.tensor([r.budget for r in take], device=d)
        self.done[idx] = torch.isin(first, self.eos) | (self.budget[idx] <= 1)

    def _decode(self) -> None:
        """One decode step of every row (static shapes; free and finished rows compute and are ignored)."""
        fixed, g, gen = self.fixed, self.g, self.gen
        live = ~self.done
        fixed.slot_valid[self.ar, self.slot[:, 0]] |= live  # the new token's slot, where a row goes on
        if self.fastv:
            fixed.deep_valid[self.ar, self.slot[:, 0]] |= live
        if g.compiled and g.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        logits = g.step(self.model, g.kv_cache, self.tok[:, None], self.pos, fixed.slot_valid, self.slot,
                            fixed.vis_mask, fixed.cond_kv, fixed.factors, fixed.deep_valid)
        g.work.decode_steps += 1
        serving = ([self.owner[r].gid if on and self.owner[r] is not None else -1
                    for r, on in enumerate(live.tolist())] if self.guide is not None else [])
        nxt = pick(logits, gen, self.rng, self.guide, serving)
        at = self.count.clamp(max=self.width - 1)
        self.tok = torch.where(live, nxt, self.tok)
        self.out[self.ar, at] = torch.where(live, nxt, self.out[self.ar, at])
        self.count = self.count + live.long()
        self.done = self.done | (live & (torch.isin(nxt, self.eos) | (self.count >= self.budget)))
        self.pos = self.pos + live.long()[:, None]
        self.slot = self.slot + live.long()[:, None]

