"""The Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers in plain PyTorch, equal to transformers 5's.

Input is what the Qwen image processors emit: `pixel_values` (N, C*tp*p*p), one row per patch, every frame's patches
in merge-block order (each spatial_merge_size x spatial_merge_size block of patches contiguous, blocks in raster
order), and `grid_thw` (n, 3), the (frames, patch rows, patch cols) of each image or video. Attention stays within one
frame (as transformers' cu_seqlens), or within one window for Qwen2.5-VL's windowed blocks. Output: the merged tokens
(N / merge**2, out_hidden_size) and, for Qwen3-VL, one more such tensor per deepstack block.

Submodule names are transformers' `visual.*` ones, so a checkpoint loads by a prefix rename (`visual_weights`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lavi.qwenvl.kinds import QWEN2_5_VL, QWEN2_VL, QWEN3_VL
from lavi.qwenvl.vision_config import QwenVisionConfig
from lavi.qwenvl.vision_grid import by_block, patch_positions, patch_rope, segments, window_order  # noqa: F401

VISUAL_PREFIXES = ("model.visual.", "visual.")  # transformers 5 (and Qwen3-VL's hub layout), then the hub's older one
EPS = 1e-6  # every norm of the three towers

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


def visual_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's tower weights under our names: `model.visual.x` or `visual.x` -> `x`; other weights dropped."""
    out = {}
    for name, tensor in state.items():
        prefix = next((p for p in VISUAL_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            out[name[len(prefix):]] = tensor
    return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + EPS)
        return self.weight * y.to(x.dtype)


def _norm(c: QwenVisionConfig, dim: int) -> nn.Module:
    return RMSNorm(dim) if c.kind == QWEN2_5_VL else nn.LayerNorm(dim, eps=EPS)


class PatchEmbed(nn.Module):
    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel, stride=kernel, bias=c.kind == QWEN3_VL)

    def forward(self, pixels: Tensor) -> Tensor:
        # a Conv3d whose kernel is the whole patch is one matmul over the flattened patch (C, tp, p, p)
        w = self.proj.weight
        return F.linear(pixels.to(w.dtype), w.flatten(1), self.proj.bias)  # (N, d)


class Attention(nn.Module):
    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], segments: list[Tensor]) -> Tensor:
        """x (N, d); rope: cos, sin (N, Dh); segments: token indices (S, L) of S equal-length segments each."""
        n, d = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, d // self.heads).unbind(1)  # (N, H, Dh) each
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        out = torch.empty_like(q)
        for index in segments:  # (S, L): no token attends outside its own segment
            qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))  # (S, H, L, Dh)
            out[index] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)  # (S, L, H, Dh)
        return self.proj(out.view(n, d))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rope in float32 (as transformers): x (N, H, Dh), cos/sin (N, Dh)."""
    y = x.float()
    half = y.shape[-1] // 2
    rotated = torch.cat((-y[..., half:], y[..., :half]), dim=-1)
    return (y * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class MLP(nn.Module):
    """Qwen2-VL: fc1 -> act -> fc2."""

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LinearMLP(nn.Module):
    """Qwen3-VL: linear_fc1 -> act -> linear_fc2 (Qwen2-VL's MLP under other names)."""

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.linear_fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.linear_fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


MLPS = {QWEN2_VL: MLP, QWEN2_5_VL: GatedMLP, QWEN3_VL: LinearMLP}


class Block(nn.Module):
    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.norm1 = _norm(c, c.hidden_size)
        self.attn = Attention(c)
        self.norm2 = _norm(c, c.hidden_size)
        self.mlp = MLPS[c.kind](c)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], segments: list[Tensor]) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, segments)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    """Qwen2-VL / Qwen2.5-VL: norm each patch, concatenate a merge block's patches, 2-layer GELU MLP."""

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        width = c.hidden_size * c.spatial_merge_size ** 2
        self.ln_q = _norm(c, c.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, c.out_hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))  # (N / m**2, out)


class Merger3(nn.Module):
    """Qwen3-VL: the same MLP; its norm is over each patch, or over the concatenated block (`post_shuffle`)."""

    def __init__(self, c: QwenVisionConfig, post_shuffle: bool) -> None:
        super().__init__()
        width = c.hidden_size * c.spatial_merge_size ** 2
        self.post_shuffle = post_shuffle
        self.norm = nn.LayerNorm(width if post_shuffle else c.hidden_size, eps=EPS)
        self.linear_fc1 = nn.Linear(width, width)
        self.linear_fc2 = nn.Linear(width, c.out_hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        width = self.linear_fc1.in_features
        x = self.norm(x.view(-1, width)) if self.post_shuffle else self.norm(x).view(-1, width)  # (N / m**2, m*m*d)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class QwenVision(nn.Module):
    """The tower: patches -> (learned positions, Qwen3-VL) -> blocks with a 2D rope -> merger (+ deepstack mergers)."""

    def __init__(self, c: QwenVisionConfig) -> None:
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        if c.kind == QWEN3_VL:
            self.pos_embed = nn.Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        if c.kind == QWEN3_VL:
            self.merger: nn.Module = Merger3(c, post_shuffle=False)
            self.deepstack_merger_list = nn.ModuleList(Merger3(c, post_shuffle=True)
                                                       for _ in c.deepstack_visual_indexes)
        else:
            self.merger = Merger(c)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> tuple[Tensor, list[Tensor]]:
        """pixel_values (N, C*tp*p*p), grid_thw (n, 3) -> (tokens (N / m**2, out_hidden_size), deepstack: one
        (N / m**2, out_hidden_size) per deepstack layer, shallow first; empty but for Qwen3-VL)."""
        c = self.config
        x, rope, per_block, order = self.embed(pixel_values, grid_thw)
        deepstack = []
        for i, (block, attend) in enumerate(zip(self.blocks, per_block)):
            x = block(x, rope, attend)
            if i in c.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[c.deepstack_visual_indexes.index(i)](x))
        tokens = self.merger(x)  # (N / m**2, out)
        if order is not None:
            tokens = tokens[torch.argsort(order)]  # back to the processor's order
        return tokens, deepstack

    def embed(self, pixel_values: Tensor, grid_thw: Tensor
              ) -> tuple[Tensor, tuple[Tensor, Tensor], list[list[Tensor]], Tensor | None]:
        """What the blocks run on: the patches' embeddings (N, d), the 2D rope's cos and sin, each block's attention
        segments, and (Qwen2.5-VL) the order of merge blocks the patches were put in (window by window; None: the
        processor's order, which `x.view(-1, m*m, d)[argsort(order)]` restores)."""
        c, unit = self.config, self.config.spatial_merge_size ** 2
        grids = self._grids(pixel_values, grid_thw)
        x = self.patch_embed(pixel_values)  # (N, d)
        rows, cols = patch_positions(grids, c.spatial_merge_size, x.device)  # (N,) each
        if c.kind == QWEN3_VL:
            x = x + self._learned_positions(grids, rows, cols).to(x.dtype)
        rope = patch_rope(rows, cols, c)
        frames = segments([h * w for t, h, w in grids for _ in range(t)], x.device)
        per_block = [frames] * c.depth
        order = None
        if c.kind == QWEN2_5_VL:  # merge blocks put window by window (each frame's stay within the frame)
            order, sizes = window_order(grids, c.spatial_merge_size, c.window_units)
            order = order.to(x.device)
            x = by_block(x, order, unit)
            rope = (by_block(rope[0], order, unit), by_block(rope[1], order, unit))
            windows = segments([n * unit for n in sizes], x.device)
            per_block = [frames if i in c.fullatt_block_indexes else windows for i in range(c.depth)]
        return x, rope, per_block, order

    def _grids(self, pixel_values: Tensor, grid_thw: Tensor) -> list[tuple[int, int, int]]:
        c, m = self.config, self.config.spatial_merge_size
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or len(grid_thw) == 0:
            raise ValueError(f"grid_thw must be (n >= 1, 3), got {tuple(grid_thw.shape)}")
        grids = [(int(t), int(h), int(w)) for t, h, w in grid_thw.tolist()]
        if any(t < 1 or h < m or w < m or h % m or w % m for t, h, w in grids):
            raise ValueError(f"every grid needs t >= 1 and h, w multiples of spatial_merge_size {m}: {grids}")
        n = sum(t * h * w for t, h, w in grids)
        if tuple(pixel_values.shape) != (n, c.patch_dim):
            raise ValueError(f"pixel_values must be ({n}, {c.patch_dim}) for grids {grids}, "
                             f"got {tuple(pixel_values.shape)}")
        return grids

    def _learned_positions(self, grids: list[tuple[int, int, int]], rows: Tensor, cols: Tensor) -> Tensor:
        """Qwen3-VL: the square position table resized to each grid (bilinear, corners aligned), at each patch (N, d),
        float32. Written as transformers 5 computes it (each patch's four table rows times float32 weights, summed),
        not as F.interpolate (the same values, other roundings: a bf16 tower then differs in its last bit)."""
        side = self.config.position_side
        out, start = [], 0
        for t, h, w in grids:  # a grid's frames share their patches' positions: computed on its first
            rows_0, cols_0 = rows[start:start + h * w], cols[start:start + h * w]
            h_taps, h_weights = _bilinear_taps(rows_0, h, side)
            w_taps, w_weights = _bilinear_taps(cols_0, w, side)
            index = (h_taps[:, :, None] * side + w_taps[:, None, :]).flatten(1)  # (h*w, 4)
            weight = (h_weights[:, :, None] * w_weights[:, None, :]).flatten(1)  # (h*w, 4) float32
            out.append((self.pos_embed(index) * weight[:, :, None]).sum(1).repeat(t, 1))  # (t*h*w, d)
            start += t * h * w
        return torch.cat(out)

def _bilinear_taps(index: Tensor, size: int, side: int) -> tuple[Tensor, Tensor]:
    """Along one axis of `size` patches, the two table entries a patch at `index` reads (clamped to the table's
    `side`) and their float32 weights, corners aligned: (N, 2), (N, 2)."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    return taps, (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
