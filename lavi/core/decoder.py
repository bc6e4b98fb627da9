"""A Qwen2/Llama-family decoder in plain PyTorch, gpt-fast style, with a static KV cache.

Module names follow the Hugging Face layout (`layers.{i}.self_attn.q_proj` ...) so that loading
is a prefix rename. Vision conditions a layer through `Conditioning`: every RMSNorm takes an optional
`cond`, the ViLN hook that turns the unscaled normalised state into token-wise (delta_gamma, delta_beta);
q, k, v, o and the MLP take an optional `delta`, VLoRA's per-row low-rank term added to their output; a layer's
output takes an optional `residual` (Qwen3-VL's deepstack: visual features added at the visual positions, prefill only).

Positions are plain RoPE's (B, T), or M-RoPE's (3, B, T) (Qwen-VL: temporal, height and width positions, each axis
rotating its own section of the frequencies); a decoder with M-RoPE given (B, T) positions rotates as M-RoPE does
with all three axes equal, which is what its decode steps are.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lavi.core.config import DecoderConfig
from lavi.core.rope import apply_rope, rope_cos_sin

# cond(x_unscaled) -> (delta_gamma, delta_beta), both (B, T, d)
NormCond = Callable[[Tensor], tuple[Tensor, Tensor]]
# delta(name, x) -> the term added to weight `name`'s output y = W x (q, k, v, o; "m": the MLP's), or None
WeightDelta = Callable[[str, Tensor], Tensor | None]


class Conditioning(NamedTuple):
    """How vision conditions one decoder layer: ViLN's norm conditioners, VLoRA's weight deltas."""

    attn: NormCond | None = None  # the attention norm's
    ffn: NormCond | None = None  # the ffn norm's
    delta: WeightDelta | None = None
    residual: Tensor | None = None  # (B, T, d) added to the layer's output (Qwen3-VL's deepstack, in prefill)


NONE = Conditioning()
# conds(layer) -> that layer's Conditioning
LayerConds = Callable[[int], Conditioning]


def plus_delta(y: Tensor, delta: WeightDelta | None, name: str, x: Tensor) -> Tensor:
    """y = W x, plus vision's delta for weight `name` where it has one."""
    d = delta(name, x) if delta is not None else None
    return y if d is None else y + d


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, h: Tensor, cond: NormCond | None = None) -> Tensor:
        dtype = h.dtype
        x = h.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)  # RMSNorm_unscaled(h)
        if cond is None:
            return self.weight * x
        dg, db = cond(x)
        return (self.weight + dg) * x + db  # ViLN: (gamma + dg) * x + db


class LayerCache(Protocol):
    """What one attention layer attends through: `update` takes this call's K/V (B, Hkv, T, D), to be
    written at cache slots `input_pos` (T,), and returns the keys and values to attend to (B, Hkv, S, D)."""

    def update(self, input_pos: Tensor | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


class Cache(Protocol):
    """What the decoder runs over: a `LayerCache` per layer. `KVCache` is generation's static cache;
    training's shared visual prefix (lavi.training.shared_prefix) is another."""

    layers: Sequence[LayerCache]


class LayerKV(nn.Module):
    """One layer's K and V buffers, written in place at `input_pos`, never grown."""

    def __init__(self, max_batch: int, n_kv: int, max_seq: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        shape = (max_batch, n_kv, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """input_pos (T,): the same slots for every row; (B, T): each row's own (in-flight batching, whose rows
        started at different times)."""
        b = k.shape[0]
        if input_pos.ndim == 2:
            rows = torch.arange(b, device=k.device)[:, None]
            self.k[rows, :, input_pos] = k.transpose(1, 2)  # (B, T, Hkv, D): advanced indices lead
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        else:
            self.k[:b, :, input_pos] = k  # k: (B, Hkv, T, D)
            self.v[:b, :, input_pos] = v
        return self.k[:b], self.v[:b]


class RowsPrefill:
    """A prefill into some rows of a `KVCache`: each layer's K/V of the new rows' prompts go to those rows'
    first slots, and the prompts attend among themselves (in-flight batching admits requests into free rows)."""

    def __init__(self, cache: "KVCache", rows: Tensor) -> None:
        self.layers = [_RowsLayer(layer, rows) for layer in cache.layers]


class _RowsLayer:
    def __init__(self, layer: LayerKV, rows: Tensor) -> None:
        self.layer, self.rows = layer, rows

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.layer.k[self.rows[:, None], :, input_pos[None, :]] = k.transpose(1, 2)
        self.layer.v[self.rows[:, None], :, input_pos[None, :]] = v.transpose(1, 2)
        return k, v


class KVCache(nn.Module):
    """A decoder's static KV cache: per layer, K and V of (max_batch, Hkv, max_seq, D), allocated once.
    Whoever generates owns it (lavi.serving.generate.Generator) and hands it to `Decoder.forward` with the slots
    to write: buffers at fixed addresses, which a CUDA graph can replay."""

    def __init__(self, c: DecoderConfig, max_batch: int, max_seq: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.max_batch, self.max_seq = max_batch, max_seq
        self.layers = nn.ModuleList(LayerKV(max_batch, c.num_kv_heads, max_seq, c.head_dim, dtype, device)
                                    for _ in range(c.num_layers))

    def fits(self, batch: int, seq: int) -> bool:
        return batch <= self.max_batch and seq <= self.max_seq


class Attend(nn.Module):
    """softmax(q k^T / sqrt(D), masked) v, each K/V head shared by a group of query heads (GQA). No weights:
    a module of its own so that training sees what attention sees through a forward hook (lavi.training.losses
    records one head's attention for the focus loss), and the model files stay the model."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        # q (B, H, T, D); k, v (B, Hkv, S, D); mask bool, broadcastable to (B, H, T, S), True = attend
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        self.attend = Attend()
        if c.qk_norm:  # Qwen3: over each head's D, before RoPE
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.qkv: nn.Module | None = None  # q, k and v as one product, in their place (lavi.serving.cpu_pack.pack)

    def projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.c.num_kv_heads * self.c.head_dim
        return self.qkv(x).split([self.c.num_heads * self.c.head_dim, kv, kv], dim=-1)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kv_cache: LayerCache | None = None,
                input_pos: Tensor | None = None, delta: WeightDelta | None = None) -> Tensor:
        b, t, _ = x.shape
        c = self.c
        q, k, v = self.projections(x)
        q = plus_delta(q, delta, "q", x).view(b, t, c.num_heads, -1)  # (B, T, H, D)
        k = plus_delta(k, delta, "k", x).view(b, t, c.num_kv_heads, -1)  # (B, T, Hkv, D)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = plus_delta(v, delta, "v", x).view(b, t, c.num_kv_heads, -1).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(input_pos, k, v)  # (B, Hkv, S, D)
        y = self.attend(q, k, v, mask).transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim)  # (B, T, H*D)
        return plus_delta(self.o_proj(y), delta, "o", y)


class MLP(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.gate_up: nn.Module | None = None  # gate and up as one product, in their place (lavi.serving.cpu_pack.pack)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = (self.gate_proj(x), self.up_proj(x)) if self.gate_up is None else self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cond: Conditioning = NONE,
                kv_cache: LayerCache | None = None, input_pos: Tensor | None = None) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h, cond.attn), cos, sin, mask, kv_cache, input_pos, cond.delta)
        x = self.post_attention_layernorm(h, cond.ffn)
        h = h + plus_delta(self.mlp(x), cond.delta, "m", x)
        return h if cond.residual is None else h + cond.residual


class Decoder(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, embeds: Tensor, positions: Tensor, mask: Tensor, *, conds: LayerConds | None = None,
                kv_cache: Cache | None = None, input_pos: Tensor | None = None, output_hidden_states: bool = False,
                last_only: bool = False, pruned: tuple[int, Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """embeds (B, T, d); positions (B, T) RoPE positions (M-RoPE: (3, B, T) or (B, T)); mask (B, 1, T, S) bool, True = attend; conds:
        vision's Conditioning per layer (ViLN's norms, VLoRA's weight deltas); kv_cache: what each layer attends
        through, with input_pos (T,) the slots this call's K/V go to (None: the T tokens attend among themselves, S = T).
        pruned (K, mask'): layers past K attend with mask' instead (FastV's pruned visual tokens, lavi.visual_tokens.fastv).
        Returns logits (B, T, V) (last_only: (B, 1, V), as prefill needs) and hidden states."""
        c = self.config
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.mrope_section, c.mrope_interleaved)
        h, hidden = embeds, []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden.append(h)
            if pruned is not None and i == pruned[0] + 1:
                mask = pruned[1]
            h = layer(h, cos.to(h.dtype), sin.to(h.dtype), mask, conds(i) if conds is not None else NONE,
                      kv_cache.layers[i] if kv_cache is not None else None, input_pos)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        if output_hidden_states:
            hidden.append(h)
        return self.lm_head(h), hidden


class OnDecoder:
    """A model whose device and dtype are its decoder's (LaVi, OneVision): what the generator asks of it. Its
    backbones are `decoder` and `vision`; the rest (the fusion) is what `freeze_backbones` leaves to train."""

    decoder: Decoder
    vision: nn.Module

    def freeze_backbones(self) -> None:
        """Train the fusion only: the decoder and the vision tower keep their weights."""
        for p in list(self.decoder.parameters()) + list(self.vision.parameters()):
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype
