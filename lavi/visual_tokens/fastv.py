"""FastV-style pruning, in the prefill, of the visual tokens of a model that has them in its context (a concat LaVi, a
LLaVA-OneVision, a Qwen-VL; lavi.visual_tokens.methods, `fastv:KEEP@LAYER`).

The prompt runs whole through decoder layers 0..K (K = LAYER). At layer K, the last prompt token's attention over
the prompt (softmax of that layer's q.k, mean over heads) ranks each row's visual tokens; the row keeps the top
KEEP fraction of them (and all of its text). Layers past K run over the kept tokens only (their K/V go to the
kept tokens' own cache slots), and in every decode step they attend to the kept slots only (`Decoder.forward`'s
`pruned`), while layers 0..K still see every visual token, as in the prefill.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lavi.visual_tokens.methods import VisualCompress
from lavi.core.decoder import NONE, Attention, Conditioning, LayerConds, LayerKV
from lavi.core.rope import apply_rope, rope_cos_sin
from lavi.core.model import attention_mask


def last_token_attention(attn: Attention, x: Tensor, cos: Tensor, sin: Tensor, key_valid: Tensor) -> Tensor:
    """x (B, T, d) a layer's normalised input; key_valid (B, T) -> (B, T): the last token's attention
    probabilities over the T tokens at that layer, the mean over its heads."""
    c = attn.c
    b, t, _ = x.shape
    if attn.qkv is None:  # the last token's query alone (what the FLOP count has)
        q, k = attn.q_proj(x[:, -1:]), attn.k_proj(x)
    else:  # packed as one product (lavi.serving.cpu_pack): every token's, the last one's kept
        q, k, _ = attn.projections(x)
        q = q[:, -1:]
    q, k = q.reshape(b, 1, c.num_heads, -1), k.reshape(b, t, c.num_kv_heads, -1)
    if c.qk_norm:  # Qwen3's per-head norms, before RoPE (as Attention.forward)
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, 1, D), (B, Hkv, T, D)
    q, k = apply_rope(q, cos[:, :, -1:], sin[:, :, -1:]), apply_rope(k, cos, sin)
    k = k.repeat_interleave(c.num_heads // c.num_kv_heads, dim=1)  # (B, H, T, D)
    scores = (q.float() @ k.float().transpose(-1, -2)) * c.head_dim ** -0.5  # (B, H, 1, T)
    scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return scores.softmax(-1).mean(1)[:, 0]


def keep_mask(probs: Tensor, visual: Tensor, valid: Tensor, vc: VisualCompress) -> Tensor:
    """probs (B, T) attention from the last token; visual, valid (B, T) -> (B, T) the tokens a row keeps: its
    text, and the `vc.kept` of its visual tokens that get the most attention (ties: the earlier token)."""
    cand = visual & valid
    n_keep = torch.tensor([vc.kept(int(n)) for n in cand.sum(1).tolist()], device=probs.device)
    score = probs.float().masked_fill(~cand, float("-inf"))
    rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # (B, T): 0 for the most attended
    return valid & (~cand | (rank < n_keep[:, None]))


class _KeptSlots:
    """A pruned layer's cache in the prefill: the kept tokens' K/V go to their own slots of their rows (pads
    write nothing), and the kept tokens attend among themselves."""

    def __init__(self, layer: LayerKV, rows: Tensor, valid: Tensor) -> None:
        self.layer, self.rows, self.valid = layer, rows, valid

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        rows = self.rows[:, None].expand_as(input_pos)[self.valid]  # (n,)
        slots = input_pos[self.valid]
        self.layer.k[rows, :, slots] = k.transpose(1, 2)[self.valid]  # (n, Hkv, D)
        self.layer.v[rows, :, slots] = v.transpose(1, 2)[self.valid]
        return k, v


def _layer_and_rows(cache, i: int, b: int, device) -> tuple[LayerKV, Tensor]:
    """Layer i's buffers and the cache rows a prefill of b rows writes: a `RowsPrefill`'s rows, or the first b."""
    layer = cache.layers[i]
    if hasattr(layer, "rows"):  # RowsPrefill's
        return layer.layer, layer.rows
    return layer, torch.arange(b, device=device)


def _tokens(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """x's tokens along `dim` at idx (B, T1): a row's hidden states (B, T, d) at dim 1, cos/sin (B, 1, T, D) at 2."""
    index = idx.view(idx.shape[0], *([1] * (dim - 1)), idx.shape[1], *([1] * (x.ndim - dim - 1)))
    return x.gather(dim, index.expand(*x.shape[:dim], idx.shape[1], *x.shape[dim + 1:]))


def _kept_cond(cond: Conditioning, idx: Tensor) -> Conditioning:
    """A layer past K's conditioning over the kept tokens: a residual (Qwen3-VL's deepstack, at the visual
    positions) taken at them; a model with norm or weight conditioning has no visual tokens to prune."""
    return cond if cond.residual is None else cond._replace(residual=_tokens(cond.residual, idx, 1))


def prefill_pruned(model, cache, embeds: Tensor, positions: Tensor, mask: Tensor, slots: Tensor, valid: Tensor,
                   visual: Tensor, vc: VisualCompress, conds: LayerConds | None = None) -> tuple[Tensor, Tensor]:
    """`lavi.serving.steps.prefill` with FastV pruning: embeds (B, T0, d), positions (B, T0) (or M-RoPE's (3, B,
    T0)), mask the full prompt's attention mask (as prefill's), slots (T0,), valid (B, T0) real tokens, visual
    (B, T0) visual tokens, conds per layer (Qwen3-VL's deepstack residuals; None: none).
    Returns the last position's logits (B, V) and `kept` (B, T0), the prompt slots the layers past K attend to."""
    dec, c = model.decoder, model.decoder.config
    k_layer = min(vc.layer, len(dec.layers) - 1)
    cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.mrope_section, c.mrope_interleaved)
    cos, sin = cos.to(embeds.dtype), sin.to(embeds.dtype)
    cond = conds if conds is not None else (lambda i: NONE)
    h = embeds
    for i in range(k_layer + 1):
        if i == k_layer:
            probs = last_token_attention(dec.layers[i].self_attn, dec.layers[i].input_layernorm(h), cos, sin, valid)
        h = dec.layers[i](h, cos, sin, mask, cond(i), cache.layers[i], slots)
    kept = keep_mask(probs, visual, valid, vc)
    b, t0 = kept.shape
    t1 = int(kept.sum(1).max())
    order = torch.where(kept, torch.arange(t0, device=kept.device), -1).sort(1).values[:, -t1:]  # (B, T1) left-padded
    idx, valid1 = order.clamp(min=0), order >= 0
    h = _tokens(h, idx, 1)  # (B, T1, d)
    cos, sin = _tokens(cos, idx, 2), _tokens(sin, idx, 2)  # each kept token keeps its own (M-)RoPE angles
    mask1 = attention_mask(valid1, torch.arange(t1, device=h.device), valid1)  # (B, 1, T1, T1): slot order kept
    for i in range(k_layer + 1, len(dec.layers)):
        layer, rows = _layer_and_rows(cache, i, b, h.device)
        h = dec.layers[i](h, cos, sin, mask1, _kept_cond(cond(i), idx), _KeptSlots(layer, rows, valid1), idx)
    logits = dec.lm_head(dec.norm(h[:, -1:]))
    return logits[:, -1], kept
