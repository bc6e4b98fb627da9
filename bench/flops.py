"""Prefill and decode FLOPs of LaVi and of the concat baseline: analytic, and counted on the real modules.

Only matrix products are counted, as `torch.utils.flop_counter` does: linear layers, the patch
convolution and attention (QK^T and AV, 2 * m * n * k each). Norms, softmax, RoPE, activations,
residual adds and embedding lookups are not matmuls and are left out of both.

Conventions (per item, one prompt of T text tokens, F frames of P patches, Nv = F * P):

    ViT       per frame: patch conv 2 P (3 p^2) d_v; per layer 4 * 2 P d_v^2 (q, k, v, out)
              + 4 P^2 d_v (attention) + 2 * 2 P d_v i_v (MLP)
    ViLN      per stage: 2 Nv d_v d_c (proj) + 2 * 2 Nv d_c^2 (W_k, W_v)            once per item
              per (layer, site): 2 T d d_c (W_q) + 4 T Nv d_c (attention) + 2 T d_c 2d (W_o)
    VLoRA     generator, once per item: 2 Nv d_v d_g (proj); per block over Q = types x layers queries:
              self-attention 2 Q d_g 3 d_g + 4 Q^2 d_g + 2 Q d_g^2, cross-attention 2 Q d_g^2 + 2 Nv d_g 2 d_g
              + 4 Q Nv d_g + 2 Q d_g^2, MLP 2 * 2 Q d_g 4 d_g; heads 2 L d_g d_in r per type
              per text token, per (type, layer): 2 d_in r (A^T x) + 2 r d_out (B)
    concat    projector 2 Nv d_v d + 2 Nv d d; the decoder then runs over S = Nv + T tokens
              dct:KEEP  per frame grid h x h -> r x r: 2 r h h d + 2 r r h d + 4 r^3 d; Nv = F r^2
              fastv:KEEP@K  layers 0..K over S; at K the last token's scores, 2 d H Dh + 2 S d Hkv Dh + 2 H S Dh;
                        layers past K over S' = T + kept visual tokens, attending among themselves
    decoder   per layer over S queries and S_k keys: 2 S d (H + 2 Hkv) Dh (q, k, v) + 2 S H Dh d (o)
              + 4 S S_k H Dh (attention, GQA broadcast) + 3 * 2 S d I (SwiGLU); lm_head 2 S_lm d V

S_k is the key length the kernel sees: S without a cache, the static cache's size with one
(masked slots are computed all the same). S_lm is the number of positions given to the lm_head:
all of them in `Decoder.forward`, the last one in a prefill that slices before the head.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lavi.visual_tokens.methods import VisualCompress
from lavi.core.config import CONTEXT_FUSION, VILN, VLORA, LaViConfig
from lavi.core.vlora import weight_shapes
from lavi.core.decoder import NONE, KVCache
from lavi.core.rope import rope_cos_sin
from lavi.visual_tokens.fastv import prefill_pruned
from lavi.core.model import LaVi, attention_mask, rope_positions


@dataclass(frozen=True)
class Flops:
    """A FLOP breakdown for one batch. `vision` = ViT; `fusion` = ViLN conditioner or projector."""

    vision: int
    fusion: int
    decoder: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.vision + self.fusion + self.decoder + self.lm_head

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def vit_flops(c: LaViConfig, frames: int) -> int:
    """The ViT over `frames` images (all layers run: the deepest tap is the last block)."""
    v = c.vision
    p, d = v.num_patches, v.hidden_size
    per_layer = 4 * 2 * p * d * d + 4 * p * p * d + 2 * 2 * p * d * v.intermediate_size
    layers = max(c.vision_taps()) + 1 if c.fusion == VILN else v.num_layers
    return frames * (2 * p * (v.num_channels * v.patch_size ** 2) * d + layers * per_layer)


def decoder_flops(c: LaViConfig, queries: int, keys: int, layers: int | None = None) -> int:
    """The decoder's layers (all, or `layers` of them) over `queries` tokens attending to `keys` slots (lm_head
    excluded)."""
    dc = c.decoder
    d, hd, h, hkv = dc.hidden_size, dc.head_dim, dc.num_heads, dc.num_kv_heads
    per_layer = (2 * queries * d * (h + 2 * hkv) * hd + 2 * queries * h * hd * d
                 + 4 * queries * keys * h * hd + 3 * 2 * queries * d * dc.intermediate_size)
    return (dc.num_layers if layers is None else layers) * per_layer


def generator_flops(c: LaViConfig, visual_tokens: int) -> int:
    """VLoRA's perceptual weights generator over one item's visual tokens: the factors A of every (type, layer)."""
    g, nv, layers = c.gen_dim, visual_tokens, len(c.modulated_layers())
    q = len(c.lora_types) * layers
    block = (2 * q * g * 3 * g + 4 * q * q * g + 2 * q * g * g
             + 2 * q * g * g + 2 * nv * g * 2 * g + 4 * q * nv * g + 2 * q * g * g
             + 2 * 2 * q * g * 4 * g)
    heads = sum(2 * layers * g * weight_shapes(c)[t][0] * c.lora_rank for t in c.lora_types)
    return 2 * nv * c.vision.hidden_size * g + c.gen_layers * block + heads


def lora_flops(c: LaViConfig, text_tokens: int) -> int:
    """VLoRA's per-row deltas over `text_tokens`: A^T x, then B, for every (type, modulated layer)."""
    shapes = weight_shapes(c)
    per_layer = sum(2 * shapes[t][0] * c.lora_rank + 2 * c.lora_rank * shapes[t][1] for t in c.lora_types)
    return text_tokens * len(c.modulated_layers()) * per_layer


def dct_flops(side: int, r: int, d: int) -> int:
    """One side x side grid of width d low-passed to r x r (lavi.visual_tokens.dct: forward over h, then w; inverse twice)."""
    return 2 * r * side * side * d + 2 * r * r * side * d + 4 * r ** 3 * d


def visual_context(c: LaViConfig, frames: int, compress: VisualCompress | None = None) -> int:
    """The visual tokens in the decoder's context: none for viln and vlora; concat's, after a dct compression."""
    if c.fusion != CONTEXT_FUSION:
        return 0
    if compress is not None:
        return frames * compress.grid_side(math.isqrt(c.vision.num_patches)) ** 2
    return frames * c.vision.num_patches


def _fastv(c: LaViConfig, compress: VisualCompress | None) -> bool:
    return c.fusion == CONTEXT_FUSION and compress is not None and compress.prunes


def conditioner_flops(c: LaViConfig, visual_tokens: int, text_tokens: int, per_item: bool = True) -> int:
    """ViLN: stage K/V (once per item, if `per_item`) + every modulated (layer, site) over the text tokens."""
    d, dc = c.decoder.hidden_size, c.cond_dim
    sites = len(c.modulated_layers()) * len(c.site_names())
    kv = c.num_stages * (2 * visual_tokens * c.vision.hidden_size * dc + 2 * 2 * visual_tokens * dc * dc)
    per_site = 2 * text_tokens * d * dc + 4 * text_tokens * visual_tokens * dc + 2 * text_tokens * dc * 2 * d
    return (kv if per_item else 0) + sites * per_site


def projector_flops(c: LaViConfig, visual_tokens: int) -> int:
    d = c.decoder.hidden_size
    return 2 * visual_tokens * c.vision.hidden_size * d + 2 * visual_tokens * d * d


def fusion_flops(c: LaViConfig, frames: int, text_tokens: int, compress: VisualCompress | None = None) -> int:
    """The fusion's share of one item's prefill: ViLN's conditioner, VLoRA's generator and deltas, or concat's
    projector (and its dct compression)."""
    nv = frames * c.vision.num_patches
    if c.fusion == VILN:
        return conditioner_flops(c, nv, text_tokens)
    if c.fusion == VLORA:
        return generator_flops(c, nv) + lora_flops(c, text_tokens)
    out = projector_flops(c, nv)
    if compress is not None and compress.lowpass:
        side = math.isqrt(c.vision.num_patches)
        out += frames * dct_flops(side, compress.side(side), c.decoder.hidden_size)
    return out


def prefill_flops(c: LaViConfig, frames: int, text_tokens: int, batch: int = 1, key_slots: int | None = None,
                  logits: str = "all", compress: VisualCompress | None = None) -> Flops:
    """Prefill of `batch` items (one prompt each): ViT + fusion + decoder over the context.

    key_slots: the attention's key length (None: the context itself, no cache; else the static
    cache's slot count). logits: "all" positions go through the lm_head (Decoder.forward) or "last".
    compress: a concat model's visual compression (lavi.visual_tokens.methods).
    """
    if logits not in ("all", "last"):
        raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
    nv = visual_context(c, frames, compress)
    context = nv + text_tokens
    head = 2 * (context if logits == "all" else 1) * c.decoder.hidden_size * c.decoder.vocab_size
    keys = key_slots or context
    if _fastv(c, compress):
        dc = c.decoder
        k = min(compress.layer, dc.num_layers - 1)
        kept = text_tokens + compress.kept(nv)
        scores = (2 * dc.hidden_size * dc.num_heads * dc.head_dim + 2 * context * dc.hidden_size * dc.num_kv_heads
                  * dc.head_dim + 2 * dc.num_heads * context * dc.head_dim)
        dec = (decoder_flops(c, context, keys, k + 1) + scores
               + decoder_flops(c, kept, kept, dc.num_layers - k - 1))
    else:
        dec = decoder_flops(c, context, keys)
    return Flops(vision=batch * vit_flops(c, frames), fusion=batch * fusion_flops(c, frames, text_tokens, compress),
                 decoder=batch * dec, lm_head=batch * head)


def decode_step_flops(c: LaViConfig, frames: int, key_slots: int, batch: int = 1) -> Flops:
    """One decode step of `batch` rows: one query each against `key_slots` cache slots (+ ViLN per site, VLoRA's
    deltas). FastV's pruned slots are masked, not skipped: a step costs what the unpruned one does."""
    nv = frames * c.vision.num_patches
    fusion = {VILN: conditioner_flops(c, nv, 1, per_item=False), VLORA: lora_flops(c, 1)}.get(c.fusion, 0)
    head = 2 * c.decoder.hidden_size * c.decoder.vocab_size
    return Flops(vision=0, fusion=batch * fusion, decoder=batch * decoder_flops(c, 1, key_slots),
                 lm_head=batch * head)


def caption_flops(c: LaViConfig, frames: int, text_tokens: int, new_tokens: int, key_slots: int | None = None,
                  logits: str = "last", compress: VisualCompress | None = None) -> int:
    """Everything one caption costs: prefill + (new_tokens - 1) decode steps (the first token comes
    from the prefill). key_slots: the static cache size (None: the exact context + new tokens)."""
    context = visual_context(c, frames, compress) + text_tokens
    slots = key_slots or context + new_tokens
    pre = prefill_flops(c, frames, text_tokens, key_slots=slots, logits=logits, compress=compress).total
    return pre + (new_tokens - 1) * decode_step_flops(c, frames, slots).total


def growing_decode_flops(c: LaViConfig, context: int, new_tokens: int) -> int:
    """One row's (new_tokens - 1) decode steps over a cache that grows from `context` + 1 keys (transformers'
    dynamic cache: no static slots, no fusion per step), lm_head included: what generate() adds to its prefill."""
    head = 2 * c.decoder.hidden_size * c.decoder.vocab_size
    return sum(decoder_flops(c, 1, context + i) + head for i in range(1, new_tokens))


# ---- counted -------------------------------------------------------------------------------------
def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """4 b h_q s_q s_k d for any SDPA kernel, K/V heads broadcast to the query's (GQA)."""
    b, h, sq, d = query_shape
    return 2 * b * h * sq * key_shape[-2] * d + 2 * b * h * sq * key_shape[-2] * value_shape[-1]


def _sdpa_ops() -> dict:
    names = ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    return {getattr(torch.ops.aten, n): _sdpa for n in names if hasattr(torch.ops.aten, n)}


def count(fn, *args, **kwargs) -> tuple[int, object]:
    """Run fn under FlopCounterMode (fused CPU/GPU SDPA kernels included, GQA-aware) -> (flops, result)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_sdpa_ops()) as counter:
        result = fn(*args, **kwargs)
    return counter.get_total_flops(), result


@torch.no_grad()
def counted_prefill_flops(model: LaVi, frames: int, text_tokens: int, batch: int = 1,
                          key_slots: int | None = None, logits: str = "all") -> Flops:
    """Count the real modules' prefill: `LaVi.encode`, `LaVi.inputs`, then the decoder's layers over the
    context (and the lm_head over all positions or the last). Works on the meta device (shapes only,
    nothing allocated), so 7B shapes count on any machine; a model set to `fastv` (whose choice of tokens reads
    the attention's values) runs its pruned prefill (lavi.visual_tokens.fastv) for real, its lm_head on the last position."""
    c = model.config
    device = model.device
    size = c.vision.image_size
    pixels = torch.zeros(batch, frames, 3, size, size, device=device)
    ids = torch.zeros(batch, text_tokens, dtype=torch.long, device=device)
    valid = torch.ones(batch, text_tokens, dtype=torch.bool, device=device)
    with torch.device(device):
        vision_flops, taps = count(_vision_only, model, pixels)
        encode_flops, vis = count(model.encode, pixels)
        fusion = encode_flops - vision_flops
        fusion_inputs, (embeds, kvalid, conds) = count(model.inputs, vis, ids, valid)
        dec = model.decoder
        s = embeds.shape[1]
        slots = key_slots or s
        kv_valid = torch.zeros(batch, slots, dtype=torch.bool)
        kv_valid[:, :s] = kvalid
        q_slots = torch.arange(s)
        mask = attention_mask(kv_valid, q_slots, kvalid)
        if _fastv(c, getattr(model, "visual_compress", None)):
            cache = KVCache(dec.config, batch, slots, embeds.dtype, device)
            positions = rope_positions(kvalid)
            total, _ = count(prefill_pruned, model, cache, embeds, positions, mask, q_slots, kvalid,
                             model.visual_positions(vis, ids, valid), model.visual_compress)
            head_flops, _ = count(lambda x: dec.lm_head(dec.norm(x)), embeds[:, -1:])
            return Flops(vision=vision_flops, fusion=fusion + fusion_inputs, decoder=total - head_flops,
                         lm_head=head_flops)
        layer_flops, h = count(_layers, dec, embeds, mask, conds, keys=slots)
        plain_flops, _ = count(_layers, dec, embeds, mask, None, keys=slots) if conds is not None else (layer_flops, h)
        head_in = h if logits == "all" else h[:, -1:]
        head_flops, _ = count(lambda x: dec.lm_head(dec.norm(x)), head_in)
    per_site = layer_flops - plain_flops  # the ViLN heads run inside the norms: layers with - without them
    return Flops(vision=vision_flops, fusion=fusion + fusion_inputs + per_site,
                 decoder=layer_flops - per_site, lm_head=head_flops)


def _vision_only(model: LaVi, pixels: Tensor):
    n, f = pixels.shape[:2]
    flat = pixels.reshape(n * f, *pixels.shape[2:]).to(model.dtype)  # (N*F, 3, S, S)
    if model.viln is not None:
        return model.vision(flat, model.config.vision_taps())
    return model.vision(flat)


def _layers(dec, embeds: Tensor, mask: Tensor, conds, keys: int) -> Tensor:
    """The decoder's layers without the head. With keys > S, over a cache of `keys` slots, so that the
    attention sees exactly the engine's key length."""
    b, s, _ = embeds.shape
    positions = torch.arange(s, device=embeds.device).expand(b, s)
    cos, sin = rope_cos_sin(positions, dec.config.head_dim, dec.config.rope_theta)
    cache = KVCache(dec.config, b, keys, embeds.dtype, embeds.device) if keys != s else None
    slots = torch.arange(s, device=embeds.device) if cache is not None else None
    h = embeds
    for i, layer in enumerate(dec.layers):
        h = layer(h, cos.to(h.dtype), sin.to(h.dtype), mask, conds(i) if conds is not None else NONE,
                  cache.layers[i] if cache is not None else None, slots)
    return h
