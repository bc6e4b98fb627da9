"""How vision reaches the decoder: ViLN (vision-conditioned norm deltas) or the concat baseline.

ViLN, per DESIGN.md:
    x_t        = RMSNorm_unscaled(h_t)
    V_g        = proj_g(LN(ViT tap g)) + spatial + temporal embedding  (N, Nv, d_c)
    K, U       = W_k^g V_g, W_v^g V_g                                   once per item per stage
    q_t        = W_q^{l,s} x_t                                          d -> d_c
    c_t        = MultiHeadAttn(q_t, K, U)                               text -> vision, no causal mask
    [dg; db]   = W_o^{l,s} c_t                                          d_c -> 2d, zero-initialised
    ViLN(h_t)  = (gamma + dg) * x_t + db
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lavi.visual_tokens.methods import VisualCompress
from lavi.visual_tokens.dct import dct_lowpass
from lavi.core.config import LaViConfig
from lavi.core.decoder import NONE, Attend, Conditioning, LayerConds, NormCond


@dataclass
class Visual:
    """The visual state of a batch of items, computed once and reused by every decode step.

    viln: `cond_kv[g] = (K, U)`, the conditioner's keys and values of stage g, each (N, Hc, Nv, Dh).
    concat: `tokens` (N, Nv, d), the decoder's visual input.
    vlora: `factors[i]`, the per-item low-rank factors A of weight type `lora_types[i]` at every modulated layer,
    each (N, L_mod, d_in, r). `mask` (N, Nv) bool marks real (not padded-frame) visual tokens.
    Qwen-VL (lavi.qwenvl) adds, per item, what its prompt's layout and M-RoPE positions need: `grids` (N, 3) the
    (t, h, w) patch grid (transformers' grid_thw), `kinds` (N,) 1 image / 2 video (transformers' mm_token_type_ids
    values), `seconds` (N,) float32 a video's seconds per temporal patch (Qwen2.5-VL), `stamps` per item the token
    ids written before each temporal patch (Qwen3-VL's "<t seconds>"), and `deep`, per deepstack layer, features
    (N, Nv, d) added at the visual positions.
    """

    mask: Tensor
    cond_kv: tuple[tuple[Tensor, Tensor], ...] | None = None
    tokens: Tensor | None = None
    factors: tuple[Tensor, ...] | None = None
    grids: Tensor | None = None
    kinds: Tensor | None = None
    seconds: Tensor | None = None
    stamps: tuple[tuple[tuple[int, ...], ...], ...] | None = None
    deep: tuple[Tensor, ...] | None = None

    @staticmethod
    def cat(parts: list["Visual"]) -> "Visual":
        """Visual states of several batches as one, each padded (masked) to the longest visual token axis."""
        if len(parts) == 1:
            return parts[0]
        nv = max(p.mask.shape[1] for p in parts)

        def pad(t: Tensor | None, dim: int) -> Tensor | None:  # zeros (False) past a part's own tokens
            if t is None or t.shape[dim] == nv:
                return t
            shape = list(t.shape)
            shape[dim] = nv - t.shape[dim]
            return torch.cat([t, t.new_zeros(shape)], dim)

        def join(ts: list[Tensor | None]) -> Tensor | None:
            return None if ts[0] is None else torch.cat(ts)

        cond_kv = None
        if parts[0].cond_kv is not None:
            cond_kv = tuple(tuple(join([pad(p.cond_kv[g][j], 2) for p in parts]) for j in (0, 1))
                            for g in range(len(parts[0].cond_kv)))
        factors = None if parts[0].factors is None else tuple(
            torch.cat([p.factors[i] for p in parts]) for i in range(len(parts[0].factors)))
        deep = None if parts[0].deep is None else tuple(
            join([pad(p.deep[i], 1) for p in parts]) for i in range(len(parts[0].deep)))
        stamps = None if parts[0].stamps is None else tuple(s for p in parts for s in p.stamps)
        return Visual(mask=join([pad(p.mask, 1) for p in parts]), cond_kv=cond_kv,
                      tokens=join([pad(p.tokens, 1) for p in parts]), factors=factors,
                      grids=join([p.grids for p in parts]), kinds=join([p.kinds for p in parts]),
                      seconds=join([p.seconds for p in parts]), stamps=stamps, deep=deep)

    def select(self, rows: Tensor) -> "Visual":
        """Gather per text row: rows (B,) item index -> a Visual with B entries."""
        def pick(t: Tensor | None) -> Tensor | None:
            return t.index_select(0, rows.to(t.device)) if t is not None else None

        cond_kv = tuple((pick(k), pick(u)) for k, u in self.cond_kv or ()) or None
        factors = tuple(pick(a) for a in self.factors or ()) or None
        deep = tuple(pick(t) for t in self.deep) if self.deep is not None else None
        stamps = tuple(self.stamps[i] for i in rows.tolist()) if self.stamps is not None else None
        return Visual(mask=pick(self.mask), cond_kv=cond_kv, tokens=pick(self.tokens), factors=factors,
                      grids=pick(self.grids), kinds=pick(self.kinds), seconds=pick(self.seconds), stamps=stamps,
                      deep=deep)


def frames_to_tokens(feats: Tensor, n: int, f: int, temporal: Tensor) -> Tensor:
    """(N*F, P, d) frame features -> (N, F*P, d), with a learned temporal embedding per frame."""
    p, d = feats.shape[1:]
    x = feats.view(n, f, p, d) + temporal[:f].view(1, f, 1, d)
    return x.reshape(n, f * p, d)


class StageKV(nn.Module):
    """One ViT stage -> the conditioner's keys and values."""

    def __init__(self, d_vit: int, d_c: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_vit, eps=eps)
        self.proj = nn.Linear(d_vit, d_c)
        self.k_proj = nn.Linear(d_c, d_c, bias=False)
        self.v_proj = nn.Linear(d_c, d_c, bias=False)


class SiteHead(nn.Module):
    """Per (layer, site): the text query, its attention over the stage's K, U and the zero-initialised output
    to (dg, db)."""

    def __init__(self, d: int, d_c: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d_c, bias=False)
        self.attend = Attend()  # no weights: the point a training hook sees the attention at
        self.o_proj = nn.Linear(d_c, 2 * d)
        nn.init.zeros_(self.o_proj.weight)
        nn.init.zeros_(self.o_proj.bias)


class ViLNConditioner(nn.Module):
    """Vision-Infused LayerNorm's conditioner: per item, each stage's keys and values (`visual`); per text
    token, at every modulated norm site, the (dg, db) its attention over them gives (`conds`). The norm
    itself is the decoder's RMSNorm, which takes these as its `cond`."""

    def __init__(self, c: LaViConfig) -> None:
        super().__init__()
        self.c = c
        d, d_c = c.decoder.hidden_size, c.cond_dim
        self.stages = nn.ModuleList(
            StageKV(c.vision.hidden_size, d_c, c.vision.layer_norm_eps) for _ in range(c.num_stages))
        # Where a visual token is (patch index) and when (frame), added after the stage's norm and projection,
        # on an equal footing with what it shows (a projected unit-variance feature has std ~0.5 at init).
        # A ViT's own position embedding can be drowned by its patch features (seen training from scratch:
        # 0.4% of the variance), and unlike concat, whose visual tokens get RoPE positions in the decoder,
        # the conditioner's keys and values have no other source of place and time.
        # (drawn by nn.init, which a checkpoint's load skips: lavi.core.checkpoint.no_init)
        self.spatial = nn.Parameter(nn.init.normal_(torch.empty(c.vision.num_patches, d_c), std=0.5))
        self.temporal = nn.Parameter(nn.init.normal_(torch.empty(c.max_frames, d_c), std=0.5))
        self.heads = nn.ModuleDict(
            {f"{l}_{s}": SiteHead(d, d_c) for l in c.modulated_layers() for s in c.site_names()})

    def visual(self, taps: list[Tensor], n: int, f: int, mask: Tensor) -> Visual:
        h = self.c.cond_heads
        cond_kv = []
        for stage, feats in zip(self.stages, taps):
            v = frames_to_tokens(stage.proj(stage.norm(feats)) + self.spatial, n, f, self.temporal)  # (N, Nv, d_c)
            k, u = stage.k_proj(v), stage.v_proj(v)
            cond_kv.append(tuple(t.view(n, t.shape[1], h, -1).transpose(1, 2) for t in (k, u)))  # (N, Hc, Nv, Dh)
        return Visual(mask=mask, cond_kv=tuple(cond_kv))

    def _cond(self, head: SiteHead, k: Tensor, u: Tensor, vis_mask: Tensor) -> NormCond:
        def cond(x: Tensor) -> tuple[Tensor, Tensor]:
            b, t, _ = x.shape
            q = head.q_proj(x).view(b, t, self.c.cond_heads, -1).transpose(1, 2)  # (B, Hc, T, Dh)
            ctx = head.attend(q, k, u, vis_mask)  # (B, Hc, T, Dh)
            dg, db = head.o_proj(ctx.transpose(1, 2).reshape(b, t, -1)).chunk(2, dim=-1)  # 2 x (B, T, d)
            return dg, db
        return cond

    def conds(self, vis: Visual) -> LayerConds:
        """Per-layer norm conditioners for a batch whose visual state is already gathered per row."""
        vis_mask = vis.mask[:, None, None, :]  # (B, 1, 1, Nv)
        table: dict[int, Conditioning] = {}
        for l in self.c.modulated_layers():
            k, u = vis.cond_kv[self.c.stage_of_layer(l)]
            sites = self.c.site_names()
            table[l] = Conditioning(*(self._cond(self.heads[f"{l}_{s}"], k, u, vis_mask) if s in sites else None
                                      for s in ("attn", "ffn")))
        return lambda layer: table.get(layer, NONE)


class Projector(nn.Module):
    """The concat baseline: a 2-layer MLP from ViT features to decoder embeddings (LLaVA)."""

    def __init__(self, c: LaViConfig) -> None:
        super().__init__()
        d = c.decoder.hidden_size
        self.norm = nn.LayerNorm(c.vision.hidden_size, eps=c.vision.layer_norm_eps)
        self.fc1 = nn.Linear(c.vision.hidden_size, d)
        self.fc2 = nn.Linear(d, d)
        self.temporal = nn.Parameter(torch.randn(c.max_frames, d) * 0.02)

    def visual(self, last: Tensor, n: int, f: int, mask: Tensor, compress: VisualCompress | None = None) -> Visual:
        """compress: `dct` shrinks each frame's side x side grid of tokens to R x R (lavi.visual_tokens.methods)."""
        x = self.fc2(F.gelu(self.fc1(self.norm(last))))  # (N*F, P, d)
        if compress is not None and compress.lowpass:
            side = math.isqrt(x.shape[1])
            r = compress.side(side)
            x = dct_lowpass(x.view(-1, side, side, x.shape[-1]), r).flatten(1, 2)  # (N*F, R*R, d)
            mask = mask.view(n, f, -1)[..., : r * r].reshape(n, -1)  # a frame's tokens are all real or all not
        return Visual(mask=mask, tokens=frames_to_tokens(x, n, f, self.temporal))
