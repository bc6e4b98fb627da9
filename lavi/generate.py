"""Batched generation over a static KV cache, gpt-fast style: `prefill`, `decode_one_token`, `generate`.

Prompts are left-padded; pad slots are masked out of attention and do not advance RoPE positions,
so a row gives the same tokens in a batch as alone. The visual state is computed once per batch
of items (`LaVi.encode`) and gathered per text row; visual tokens never enter the ViLN KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


def decode_one_token(model: LaVi, tok: Tensor, pos: Tensor, slot_valid: Tensor, slot: Tensor, vis_mask: Tensor,
                     kv: list[Tensor]) -> Tensor:
    """One decode step for B rows, tensors in and tensors out, so that it compiles whole (CUDA graphs):
    tok (B, 1) last token; pos (B, 1) its RoPE position; slot_valid (B, S) real cache slots, the new one
    included; slot (1,) its cache slot; vis_mask (B, Nv) and kv [K_0, U_0, K_1, U_1, ...] the per-row
    visual state (ViLN; empty for concat, whose visual tokens are in the cache) -> logits (B, V)."""
    conds = None
    if model.viln is not None:
        conds = model.viln.conds(Visual(mask=vis_mask, kv=[(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)]))
    mask = attention_mask(slot_valid, slot, torch.ones_like(tok, dtype=torch.bool))  # (B, 1, 1, S)
    logits, _ = model.decoder(model.decoder.embed_tokens(tok), pos, mask, slot, conds)
    return logits[:, -1]


class Generator:
    """Batched generation over the model's static KV cache (`setup_caches`), gpt-fast style.

    Every per-batch tensor the decode step reads (slot validity, visual mask and K/U) lives in a buffer
    at a fixed address; the step takes and returns tensors only; EOS is tracked on the device, and the
    host looks at it once every `check_every` steps (to stop when every row is done), not every step.
    compile=True wraps the step in torch.compile(fullgraph=True): CUDA graphs ("reduce-overhead") on CUDA
    with the inductor backend; backend="eager" checks on CPU that the step traces whole.
    """

    def __init__(self, model: LaVi, compile: bool = False, backend: str = "inductor", check_every: int = 8) -> None:
        self.model = model
        self.cuda = model.device.type == "cuda"
        self.compiled = compile
        self.check_every = check_every
        self.step = decode_one_token
        if compile:
            for name in ("cache_size_limit", "recompile_limit"):  # one graph per batch shape
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            mode = "reduce-overhead" if backend == "inductor" and self.cuda else None
            self.step = torch.compile(decode_one_token, mode=mode, fullgraph=True, dynamic=False, backend=backend)
        self._static: dict[tuple, list[Tensor]] = {}

    def _buffers(self, like: list[Tensor]) -> list[Tensor]:
        """Fixed-address copies of per-batch tensors (CUDA graphs replay reads from fixed addresses)."""
        key = tuple((tuple(t.shape), t.dtype) for t in like)
        bufs = self._static.get(key)
        if bufs is None:
            bufs = [torch.empty_like(t) for t in like]
            if self.compiled:
                for t in bufs:
                    torch._dynamo.mark_static_address(t)
            self._static = {key: bufs}  # one shape at a time: the previous buffers are freed
        for buf, t in zip(bufs, like):
            buf.copy_(t)
        return bufs

    @torch.no_grad()
    def __call__(self, vis: Visual, rows: Tensor, prompts: list[list[int]], gen: GenerationConfig, eos_id: int,
                 pad_id: int = 0, on_first_token: Callable[[], None] | None = None) -> list[Generated]:
        """Generate for B text rows; row i is conditioned on item `rows[i]` of `vis` (N items, N <= B), so one
        item's visual state serves all of its prompts. `on_first_token` is called once the first token of
        every row exists (benchmarks time it)."""
        model, device = self.model, self.model.device
        b = len(prompts)
        ids, valid = left_pad(prompts, pad_id, device)
        vis = vis.select(rows.to(device))
        embeds, kvalid, conds = model.inputs(vis, ids, valid)
        t0 = embeds.shape[1]
        max_batch, max_seq = getattr(model, "cache_shape", (0, 0))
        if b > max_batch or t0 + gen.max_new_tokens > max_seq:
            raise ValueError(f"batch {b} x {t0 + gen.max_new_tokens} slots does not fit the cache "
                             f"({max_batch} x {max_seq}): call setup_caches with larger sizes")
        slot_valid = torch.zeros(b, max_seq, dtype=torch.bool, device=device)
        slot_valid[:, :t0] = kvalid
        kv = [t for pair in vis.kv for t in pair] if vis.kv else []
        slot_valid, vis_mask, *kv = self._buffers([slot_valid, vis.mask, *kv])
        slots = torch.arange(t0, device=device)
        positions = (kvalid.long().cumsum(1) - 1).clamp(min=0)  # (B, T0): pads do not advance RoPE
        pos = kvalid.long().sum(1, keepdim=True)  # (B, 1): the next token's position
        generator = torch.Generator(device=device).manual_seed(gen.seed) if gen.temperature > 0 else None

        logits = prefill(model, embeds, positions, attention_mask(slot_valid, slots, kvalid), slots, conds)
        out = torch.full((b, gen.max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        slot = torch.empty(1, dtype=torch.long, device=device)
        for i in range(gen.max_new_tokens):
            if i:
                slot.fill_(t0 + i - 1)
                slot_valid[:, t0 + i - 1] = True
                if self.compiled and self.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                logits = self.step(model, tok[:, None], pos, slot_valid, slot, vis_mask, kv)
                pos = pos + 1
            tok = sample(logits, gen.temperature, gen.top_p, generator)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            out[:, i] = tok
            done |= tok == eos_id
            if i == 0 and on_first_token is not None:
                on_first_token()
            if (i + 1) % self.check_every == 0 and bool(done.all()):  # one host sync every check_every steps
                break

        results = []
        for row in out.tolist():
            finished = eos_id in row
            results.append(Generated(tokens=row[: row.index(eos_id)] if finished else row, finished=finished))
        return results


def generate(model: LaVi, vis: Visual, rows: Tensor, prompts: list[list[int]], gen: GenerationConfig,
             eos_id: int, pad_id: int = 0) -> list[Generated]:
    """Eager generation with a throwaway `Generator` (see there)."""
    return Generator(model)(vis, rows, prompts, gen, eos_id, pad_id)
