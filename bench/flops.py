"""Prefill and decode FLOPs of LaVi and of the concat baseline: analytic, and counted on the real modules.

Only matrix products are counted, as `torch.utils.flop_counter` does: linear layers, the patch
convolution and attention (QK^T and AV, 2 * m * n * k each). Norms, softmax, RoPE, activations,
residual adds and embedding lookups are not matmuls and are left out of both.

Conventions (per item, one prompt of T text tokens, F frames of P patches, Nv = F * P):

    ViT       per frame: patch conv 2 P (3 p^2) d_v; per layer 4 * 2 P d_v^2 (q, k, v, out)
              + 4 P^2 d_v (attention) + 2 * 2 P d_v i_v (MLP)
    ViLN      per stage: 2 Nv d_v d_c (proj) + 2 * 2 Nv d_c^2 (W_k, W_v)            once per item
              per (layer, site): 2 T d d_c (W_q) + 4 T Nv d_c (attention) + 2 T d_c 2d (W_o)
    concat    projector 2 Nv d_v d + 2 Nv d d; the decoder then runs over S = Nv + T tokens
    decoder   per layer over S queries and S_k keys: 2 S d (H + 2 Hkv) Dh (q, k, v) + 2 S H Dh d (o)
              + 4 S S_k H Dh (attention, GQA broadcast) + 3 * 2 S d I (SwiGLU); lm_head 2 S_lm d V

S_k is the key length the kernel sees: S without a cache, the static cache's size with one
(masked slots are computed all the same). S_lm is the number of positions given to the lm_head:
all of them in `Decoder.forward`, the last one in a prefill that slices before the head.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lavi.config import LaViConfig
from lavi.decoder import NONE, KVCache, rope_cos_sin
from lavi.model import LaVi, attention_mask


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
    layers = max(c.vision_taps()) + 1 if c.fusion == "viln" else v.num_layers
    return frames * (2 * p * (v.num_channels * v.patch_size ** 2) * d + layers * per_layer)


def decoder_flops(c: LaViConfig, queries: int, keys: int) -> int:
    """The decoder's layers over `queries` tokens attending to `keys` slots (lm_head excluded)."""
    dc = c.decoder
    d, hd, h, hkv = dc.hidden_size, dc.head_dim, dc.num_heads, dc.num_kv_heads
    per_layer = (2 * queries * d * (h + 2 * hkv) * hd + 2 * queries * h * hd * d
                 + 4 * queries * keys * h * hd + 3 * 2 * queries * d * dc.intermediate_size)
    return dc.num_layers * per_layer


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


def prefill_flops(c: LaViConfig, frames: int, text_tokens: int, batch: int = 1, key_slots: int | None = None,
                  logits: str = "all") -> Flops:
    """Prefill of `batch` items (one prompt each): ViT + fusion + decoder over the context.

    key_slots: the attention's key length (None: the context itself, no cache; else the static
    cache's slot count). logits: "all" positions go through the lm_head (Decoder.forward) or "last".
    """
    if logits not in ("all", "last"):
        raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
    nv = frames * c.vision.num_patches
    context = text_tokens if c.fusion == "viln" else nv + text_tokens
    fusion = conditioner_flops(c, nv, text_tokens) if c.fusion == "viln" else projector_flops(c, nv)
    head = 2 * (context if logits == "all" else 1) * c.decoder.hidden_size * c.decoder.vocab_size
    dec = decoder_flops(c, context, key_slots or context)
    return Flops(vision=batch * vit_flops(c, frames), fusion=batch * fusion, decoder=batch * dec,
                 lm_head=batch * head)


def decode_step_flops(c: LaViConfig, frames: int, key_slots: int, batch: int = 1) -> Flops:
    """One decode step of `batch` rows: one query each against `key_slots` cache slots (+ ViLN per site)."""
    nv = frames * c.vision.num_patches
    fusion = conditioner_flops(c, nv, 1, per_item=False) if c.fusion == "viln" else 0
    head = 2 * c.decoder.hidden_size * c.decoder.vocab_size
    return Flops(vision=0, fusion=batch * fusion, decoder=batch * decoder_flops(c, 1, key_slots),
                 lm_head=batch * head)


def caption_flops(c: LaViConfig, frames: int, text_tokens: int, new_tokens: int, key_slots: int | None = None,
                  logits: str = "last") -> int:
    """Everything one caption costs: prefill + (new_tokens - 1) decode steps (the first token comes
    from the prefill). key_slots: the static cache size (None: the exact context + new tokens)."""
    nv = frames * c.vision.num_patches
    context = text_tokens if c.fusion == "viln" else nv + text_tokens
    slots = key_slots or context + new_tokens
    pre = prefill_flops(c, frames, text_tokens, key_slots=slots, logits=logits).total
    return pre + (new_tokens - 1) * decode_step_flops(c, frames, slots).total


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
    nothing allocated), so 7B shapes count on any machine."""
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
