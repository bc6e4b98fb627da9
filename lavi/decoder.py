"""A Qwen2/Llama-family decoder in plain PyTorch, gpt-fast style, with a static KV cache.

Module names follow the Hugging Face layout (`layers.{i}.self_attn.q_proj` ...) so that loading
is a prefix rename. Every RMSNorm takes an optional `cond`: the ViLN hook that turns the unscaled
normalised state into token-wise (delta_gamma, delta_beta).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DecoderConfig

# cond(x_unscaled) -> (delta_gamma, delta_beta), both (B, T, d)
NormCond = Callable[[Tensor], tuple[Tensor, Tensor]]


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


class KVCache(nn.Module):
    """Buffers sized once by `setup_caches`; written in place at `input_pos`, never grown."""

    def __init__(self, max_batch: int, n_kv: int, max_seq: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (max_batch, n_kv, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b = k.shape[0]
        self.k[:b, :, input_pos] = k  # k: (B, Hkv, T, D)
        self.v[:b, :, input_pos] = v
        return self.k[:b], self.v[:b]


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """positions (B, T) int -> cos, sin (B, 1, T, D) in fp32, the HF 'rotate_half' layout."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def head0_probs(q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
    """Attention probabilities of head 0: q (B, H, T, D), k (B, Hk, S, D), mask broadcastable to (B, 1, T, S)
    bool -> (B, T, S). For the training-only focus loss, which teaches one head to find what a question
    names (a layer's other heads stay free)."""
    logits = (q[:, 0].float() @ k[:, 0].float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, T, S)
    return logits.masked_fill(~mask[:, 0].expand_as(logits), float("-inf")).softmax(-1)


class Attention(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        self.kv_cache: KVCache | None = None
        self.focus_probs: list[Tensor] | None = None  # training: set to [] to record head 0's attention (focus loss)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor | None,
                kv: "KVPrefix | None" = None) -> Tensor:
        b, t, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, Hkv, S_max, D)
        elif kv is not None:
            k, v = kv.attend(k, v)
        if self.focus_probs is not None and (kv is None or kv.rows is not None):  # not while recording a prefix
            self.focus_probs.append(head0_probs(q, k, mask))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=c.num_kv_heads != c.num_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor | None,
                cond_attn: NormCond | None = None, cond_ffn: NormCond | None = None,
                kv: "KVPrefix | None" = None) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h, cond_attn), cos, sin, mask, input_pos, kv)
        return h + self.mlp(self.post_attention_layernorm(h, cond_ffn))


class KVPrefix:
    """Training-time shared prefix (the concat baseline's visual tokens): `record` keeps each layer's K/V of
    a prefix pass over N items; `replay(rows)` then prepends item rows[b]'s prefix K/V to text row b's own.
    Same attention as running every row's full sequence, without recomputing a prefix per text row."""

    def __init__(self) -> None:
        self.layers: list[tuple[Tensor, Tensor]] = []
        self.rows: Tensor | None = None
        self.i = 0

    def replay(self, rows: Tensor) -> "KVPrefix":
        self.rows, self.i = rows, 0
        return self

    def attend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.rows is None:
            self.layers.append((k, v))  # recording: (N, Hkv, Nv, D)
            return k, v
        pk, pv = self.layers[self.i]
        self.i += 1
        return torch.cat([pk.index_select(0, self.rows), k], 2), torch.cat([pv.index_select(0, self.rows), v], 2)


# conds(layer) -> (cond for the attention norm, cond for the ffn norm)
LayerConds = Callable[[int], tuple[NormCond | None, NormCond | None]]


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

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        """Allocate the static KV cache once; `forward(..., input_pos=...)` writes into it."""
        c = self.config
        dtype, device = self.embed_tokens.weight.dtype, self.embed_tokens.weight.device
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, c.num_kv_heads, max_seq, c.head_dim, dtype).to(device)

    def forward(self, embeds: Tensor, positions: Tensor, mask: Tensor, input_pos: Tensor | None = None,
                conds: LayerConds | None = None, output_hidden_states: bool = False,
                kv: KVPrefix | None = None, last_only: bool = False) -> tuple[Tensor, list[Tensor]]:
        """embeds (B, T, d); positions (B, T) RoPE positions; mask (B, 1, T, S) bool, True = attend;
        input_pos (T,) cache slots to write (None: no cache); kv: a shared prefix being recorded or replayed.
        Returns logits (B, T, V) (last_only: (B, 1, V), as prefill needs) and hidden states."""
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        h, hidden = embeds, []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden.append(h)
            ca, cf = conds(i) if conds is not None else (None, None)
            h = layer(h, cos.to(h.dtype), sin.to(h.dtype), mask, input_pos, ca, cf, kv)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        if output_hidden_states:
            hidden.append(h)
        return self.lm_head(h), hidden
