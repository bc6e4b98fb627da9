"""A static-shape generation loop over LaVi's own modules, built for speed (gpt-fast pattern).

Same math as `lavi.generate.generate` (the tests check greedy tokens are equal), three changes:
- prefill slices the last position before the lm_head (the engine computes logits for every
  context position: for the concat baseline at 7,290 visual tokens and a 152k vocabulary that is
  ~8 TFLOP and a (B, 7354, 152064) logits tensor per batch, thrown away);
- the decode step is one function of tensors only, with no host sync (no `bool(done.all())`, no
  `torch.tensor([slot])` per step): EOS handling stays on the device, every row runs all steps;
- on CUDA that step is `torch.compile(mode="reduce-overhead", fullgraph=True)` (CUDA graphs) over
  static buffers: the KV cache, the slot-validity mask and the visual K/U live at fixed addresses.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from lavi.decoder import rope_cos_sin
from lavi.fusion import Visual
from lavi.generate import setup_caches
from lavi.model import LaVi, attention_mask


@dataclass(frozen=True)
class Timing:
    """Seconds, measured with a device sync at each boundary."""

    encode_s: float  # ViT + fusion (ViLN stage K/V, or projector)
    ttft_s: float  # start -> first token on the host (encode + prefill + first sample)
    total_s: float  # start -> last token


def prefill_last(model: LaVi, embeds: Tensor, positions: Tensor, mask: Tensor, slots: Tensor, conds) -> Tensor:
    """`Decoder.forward` over the context, writing the static cache, with the lm_head on the last position
    only -> logits (B, V). The final norm is per token, so slicing before it changes nothing."""
    dec = model.decoder
    cos, sin = rope_cos_sin(positions, dec.config.head_dim, dec.config.rope_theta)
    h = embeds
    for i, layer in enumerate(dec.layers):
        ca, cf = conds(i) if conds is not None else (None, None)
        h = layer(h, cos.to(h.dtype), sin.to(h.dtype), mask, slots, ca, cf)
    return dec.lm_head(dec.norm(h[:, -1:]))[:, -1]  # (B, V)


def decode_step(model: LaVi, tok: Tensor, pos: Tensor, slot_valid: Tensor, slot: Tensor, done: Tensor,
                vis_mask: Tensor, kv: list[Tensor], eos_id: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """One greedy step for B rows. tok (B,) last token; pos (B, 1) its RoPE position; slot_valid (B, S)
    with the new slot already marked; slot (1,) cache slot; done (B,) rows past EOS; vis_mask (B, Nv)
    and kv [K_0, U_0, K_1, U_1, ...] the per-row visual state (ViLN; empty for concat).
    -> (next token (B,), next position (B, 1), done (B,)). Tensors in, tensors out: compilable whole."""
    b = tok.shape[0]
    conds = None
    if model.viln is not None:
        vis = Visual(mask=vis_mask, kv=[(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)])
        conds = model.viln.conds(vis)
    mask = attention_mask(slot_valid, slot, torch.ones(b, 1, dtype=torch.bool, device=tok.device))  # (B,1,1,S)
    logits, _ = model.decoder(model.decoder.embed_tokens(tok[:, None]), pos, mask, slot, conds)
    nxt = logits[:, -1].argmax(-1)  # (B,)
    nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
    return nxt, pos + 1, done | (nxt == eos_id)


class FastGenerator:
    """Greedy generation with static caches for up to `max_batch` rows of `max_seq` slots.

    compile=True wraps `decode_step` in torch.compile(mode="reduce-overhead", fullgraph=True) (CUDA graphs
    on CUDA; on CPU pass backend="eager" to check the step traces whole without a graph break)."""

    def __init__(self, model: LaVi, max_batch: int, max_seq: int, compile: bool = False,
                 backend: str = "inductor") -> None:
        self.model = model.eval()
        self.max_batch, self.max_seq = max_batch, max_seq
        setup_caches(model, max_batch, max_seq)
        self.cuda = model.device.type == "cuda"
        if compile:
            mode = "reduce-overhead" if backend == "inductor" and self.cuda else None
            for name in ("cache_size_limit", "recompile_limit"):  # one graph per (batch, shape) benchmarked
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            self.step = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False, backend=backend)
        else:
            self.step = decode_step
        self.compiled = compile
        self._static: dict[tuple, list[Tensor]] = {}

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _buffers(self, key: tuple, like: list[Tensor]) -> list[Tensor]:
        """Fixed-address copies of per-batch tensors (CUDA graphs read inputs from fixed addresses)."""
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
    def generate(self, pixels: Tensor, frame_mask: Tensor | None, rows: Tensor, ids: Tensor, valid: Tensor,
                 new_tokens: int, eos_id: int, pad_id: int = 0) -> tuple[Tensor, Timing]:
        """pixels (N, F, 3, S, S) on the model's device; rows (B,) item of each text row; ids, valid (B, T)
        left-padded prompts -> tokens (B, new_tokens) (pad after EOS, as the engine) and the timing."""
        model, device = self.model, self.model.device
        b = ids.shape[0]
        self._sync()
        start = time.perf_counter()
        vis = model.encode(pixels, frame_mask)
        self._sync()
        encoded = time.perf_counter()
        vis = vis.select(rows.to(device))
        embeds, kvalid, conds = model.inputs(vis, ids, valid)
        t0 = embeds.shape[1]
        if b > self.max_batch or t0 + new_tokens > self.max_seq:
            raise ValueError(f"batch {b} x {t0 + new_tokens} slots does not fit ({self.max_batch} x {self.max_seq})")
        kv = [t for pair in vis.kv for t in pair] if vis.kv else []
        slot_valid = torch.zeros(b, self.max_seq, dtype=torch.bool, device=device)
        slot_valid[:, :t0] = kvalid
        slot_valid, vis_mask, *kv = self._buffers((b, t0, *(tuple(t.shape) for t in kv)),
                                                  [slot_valid, vis.mask, *kv])
        slots = torch.arange(t0, device=device)
        positions = (kvalid.long().cumsum(1) - 1).clamp(min=0)  # (B, T0): pads do not advance RoPE
        logits = prefill_last(model, embeds, positions, attention_mask(slot_valid, slots, kvalid), slots, conds)
        out = torch.full((b, new_tokens), pad_id, dtype=torch.long, device=device)
        tok = logits.argmax(-1)
        out[:, 0] = tok
        done = tok == eos_id
        pos = kvalid.long().sum(1, keepdim=True)  # (B, 1)
        slot = torch.empty(1, dtype=torch.long, device=device)
        self._sync()
        first = time.perf_counter()
        for i in range(1, new_tokens):
            slot.fill_(t0 + i - 1)
            slot_valid[:, t0 + i - 1] = True
            if self.compiled and self.cuda:
                torch.compiler.cudagraph_mark_step_begin()
            tok, pos, done = self.step(model, tok, pos, slot_valid, slot, done, vis_mask, kv, eos_id, pad_id)
            tok, pos, done = tok.clone(), pos.clone(), done.clone()  # graph outputs are overwritten next replay
            out[:, i] = tok
        self._sync()
        end = time.perf_counter()
        return out, Timing(encode_s=encoded - start, ttft_s=first - start, total_s=end - start)


def trim(tokens: Tensor, eos_id: int) -> list[list[int]]:
    """(B, N) tokens -> per row, the tokens before the first EOS (as `lavi.generate.Generated.tokens`)."""
    rows = []
    for row in tokens.tolist():
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows
