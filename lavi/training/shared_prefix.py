"""Training's shortcut for many text rows per item: each item's visual prefix through the decoder once.

The concat baseline puts an item's visual tokens before its text, so a batch of B text rows over N items
would run N-fold prefixes B times. Here the prefix runs once per item and its per-layer K/V are recorded
(`prefix_kv`); each text row then attends to its item's recorded K/V before its own (`forward_rows`).
Same attention, RoPE positions and masks as `LaVi.forward` over every row's full sequence. Both passes
go through the decoder's cache protocol (`lavi.core.decoder.Cache`): the model has no training path of its own.
ViLN keeps its context text-only and needs no prefix: its rows gather the visual state instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lavi.core.fusion import Visual
from lavi.core.model import LaVi, attention_mask, rope_positions


class _Record:
    """A layer's cache that keeps the K/V it is given (N, Hkv, Nv, D) and attends to them as they are."""

    k: Tensor
    v: Tensor

    def update(self, input_pos: Tensor | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k, self.v = k, v
        return k, v


@dataclass
class _Replay:
    """A layer's cache that puts item rows[b]'s recorded prefix K/V before text row b's own."""

    k: Tensor  # (N, Hkv, Nv, D)
    v: Tensor
    rows: Tensor  # (B,)

    def update(self, input_pos: Tensor | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.cat([self.k.index_select(0, self.rows), k], 2),  # (B, Hkv, Nv + T, D)
                torch.cat([self.v.index_select(0, self.rows), v], 2))


@dataclass
class PrefixKV:
    """The visual prefix of N items as the decoder sees it: its validity (N, Nv) and, per layer, a cache
    (`_Record` while the prefix runs, `_Replay` while text rows attend to it)."""

    valid: Tensor
    layers: list[_Record] | list[_Replay]


def prefix_kv(model: LaVi, vis: Visual) -> PrefixKV | None:
    """Run each item's visual tokens through the decoder once, recording every layer's K/V (None for ViLN and VLoRA)."""
    if vis.tokens is None:  # viln, vlora: no visual tokens in the context
        return None
    tokens, valid = vis.tokens.to(model.dtype), vis.mask  # (N, Nv, d), (N, Nv)
    slots = torch.arange(tokens.shape[1], device=tokens.device)
    recorded = PrefixKV(valid, [_Record() for _ in model.decoder.layers])
    model.decoder(tokens, rope_positions(valid), attention_mask(valid, slots, valid),
                  kv_cache=recorded)  # its logits are not used
    return recorded


def forward_rows(model: LaVi, ids: Tensor, valid: Tensor, vis: Visual, rows: Tensor,
                 prefix: PrefixKV | None) -> Tensor:
    """Logits (B, T, V) of text rows ids (B, T), valid (B, T), row b about item rows[b] of `vis` (N items),
    equal to `model(ids, valid, vis.select(rows))`; concat attends to `prefix` (`prefix_kv(model, vis)`)."""
    if prefix is None:
        return model(ids, valid, vis.select(rows))
    n_p, t = prefix.valid.shape[1], ids.shape[1]
    kvalid = torch.cat([prefix.valid.index_select(0, rows), valid], 1)  # (B, Nv + T)
    positions = rope_positions(kvalid)[:, n_p:]  # (B, T)
    mask = attention_mask(kvalid, torch.arange(n_p, n_p + t, device=ids.device), valid)
    replay = PrefixKV(prefix.valid, [_Replay(layer.k, layer.v, rows) for layer in prefix.layers])
    logits, _ = model.decoder(model.decoder.embed_tokens(ids), positions, mask, kv_cache=replay)
    return logits


def forward_shared(model: LaVi, ids: Tensor, valid: Tensor, vis: Visual, rows: Tensor) -> Tensor:
    """`LaVi.forward` for many text rows per item, with `vis` per item (N) and rows (B,) -> item."""
    return forward_rows(model, ids, valid, vis, rows, prefix_kv(model, vis))
