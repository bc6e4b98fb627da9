"""LLaVA-OneVision in plain PyTorch: the SigLIP tower, the 2-layer projector, anyres packing, video pooling, and
the Qwen2 decoder of `lavi.core.decoder`, so that it runs in the same engine and generation loop as LaVi.

transformers' `LlavaOnevisionForConditionalGeneration` is the spec (parity tests hold us to it):
    image:  tiles (1 + gh*gw, 3, S, S) -> tower hidden states at `vision_feature_layer` -> projector
            -> base view (side^2 tokens) ++ the tiles' grid, unpadded, shrunk past anyres_max_N,
               with `image_newline` closing every row
    video:  frames (F, 3, S, S) -> tower -> projector -> 2x2 bilinear pooling (ceil) -> F*pooled^2 ++ newline
    prompt: the chat template's one `<image>` / `<video>` token is replaced by those visual tokens
The visual tokens sit in the decoder's context (and its KV cache): this is the concat baseline LaVi is
measured against.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lavi.onevision import anyres
from lavi.visual_tokens.methods import VisualCompress
from lavi.visual_tokens.dct import dct_lowpass
from lavi.core.decoder import Decoder, OnDecoder
from lavi.core.fusion import Visual
from lavi.onevision.config import OneVisionConfig
from lavi.core.vision import VisionTower

ACTS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu,
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


def pixels(frames: np.ndarray, c: OneVisionConfig) -> Tensor:
    """uint8 tiles or frames (T, S, S, 3) -> normalised float32 (T, 3, S, S), with the reference's arithmetic:
    the rescale in float64, cast to float32, then (x - mean) / std in float32; contiguous, as the processor's (the
    patch convolution picks another kernel for the permuted layout, and a bf16 tower then rounds otherwise)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).double() * c.rescale_factor
    mean = torch.tensor(c.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(c.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x.float() - mean) / std).contiguous()


class Projector(nn.Module):
    """`multi_modal_projector`: linear_1 -> act -> linear_2, from the tower's (concatenated) layers to the LLM."""

    def __init__(self, c: OneVisionConfig) -> None:
        super().__init__()
        d_in, d = c.vision.hidden_size * len(c.feature_layers), c.decoder.hidden_size
        self.linear_1 = nn.Linear(d_in, d, bias=c.projector_bias)
        self.linear_2 = nn.Linear(d, d, bias=c.projector_bias)
        self.act = ACTS[c.projector_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class OneVision(OnDecoder, nn.Module):
    viln = None  # no norm conditioner: the decode step runs the plain decoder over the cache
    vision_in_context = True

    def __init__(self, config: OneVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.visual_compress: VisualCompress | None = None  # fewer visual tokens (lavi.visual_tokens.methods), set at load
        self.vision = VisionTower(config.vision)
        self.projector = Projector(config)
        self.image_newline = nn.Parameter(torch.zeros(config.decoder.hidden_size))
        self.decoder = Decoder(config.decoder)

    def features(self, pixels: Tensor) -> Tensor:
        """pixels (N, 3, S, S) normalised -> projected features (N, P, d) of the configured hidden states."""
        want = self.config.feature_layers
        x = self.vision.embeddings(pixels.to(self.dtype))
        hidden = [x]  # hidden_states[0] is the embeddings' output, [i] block i-1's (no post-layernorm)
        for layer in self.vision.encoder.layers[: max(want)]:
            x = layer(x)
            hidden.append(x)
        # one layer as it is (transformers: hidden_states[layer], in the patch embedding's transposed layout, which a
        # bf16 product rounds otherwise than a contiguous copy), several concatenated
        x = self.projector(hidden[want[0]] if len(want) == 1 else torch.cat([hidden[i] for i in want], dim=-1))
        vc = self.visual_compress
        if vc is not None and vc.lowpass:  # each tile's grid side^2 -> R^2
            side = self.config.side
            x = dct_lowpass(x.view(-1, side, side, x.shape[-1]), vc.side(side)).flatten(1, 2)
        return x

    def image_tokens(self, tiles: Tensor, size: tuple[int, int]) -> Tensor:
        """One image: tiles (1 + gh*gw, 3, S, S), the base view first; size its (height, width) -> (Nv, d)."""
        return self.pack_image(self.features(tiles), size)

    def pack_image(self, feats: Tensor, size: tuple[int, int]) -> Tensor:
        """An image's tile features (1 + gh*gw, side*side, d) -> its visual tokens (Nv, d)."""
        c, side = self.config, math.isqrt(feats.shape[1])  # the tile's grid side (smaller under dct compression)
        base, crops = feats[0], feats[1:]
        gh, gw = anyres.grid_shape(size, c.pinpoints, c.tile_size)
        if crops.shape[0] != gh * gw:
            raise ValueError(f"an image of {size[0]}x{size[1]} has {gh}x{gw} crops, got {crops.shape[0]}")
        grid = crops.view(gh, gw, side, side, -1).permute(4, 0, 2, 1, 3).reshape(-1, gh * side, gw * side)  # (d, H, W)
        r0, r1, c0, c1 = anyres.unpadded_extent(size, (gh * side, gw * side))
        grid = grid[:, r0:r1, c0:c1]
        ratio = anyres.downscale_ratio(grid.shape[1], grid.shape[2], side, c.max_tiles)
        if ratio > 1.1:
            shape = [int(grid.shape[1] // ratio), int(grid.shape[2] // ratio)]
            grid = F.interpolate(grid[None], shape, mode="bilinear")[0]
        newline = self.image_newline[:, None, None].expand(-1, grid.shape[1], 1).to(grid.dtype)
        grid = torch.cat([grid, newline], dim=-1).flatten(1).transpose(0, 1)  # (H' * (W' + 1), d)
        return torch.cat([base, grid], dim=0)

    def video_tokens(self, frames: Tensor) -> Tensor:
        """One clip: frames (F, 3, S, S) -> (F * ceil(side/2)^2 + 1, d), pooled 2x2 bilinear, one newline."""
        return self.pack_video(self.features(frames))

    def pack_video(self, feats: Tensor) -> Tensor:
        """A clip's frame features (F, side*side, d) -> its visual tokens."""
        f, p, d = feats.shape
        side = math.isqrt(p)
        grid = feats.view(f, side, side, d).permute(0, 3, 1, 2)  # (F, d, side, side)
        pooled = F.interpolate(grid, size=[-(-side // 2), -(-side // 2)], mode="bilinear")
        tokens = pooled.permute(0, 2, 3, 1).reshape(-1, d)  # (F * pooled^2, d)
        return torch.cat([tokens, self.image_newline[None].to(tokens.dtype)], dim=0)

    def splice(self, ids: list[int], visual: Tensor) -> Tensor:
        """One prompt with exactly one image or video token -> its embeddings (T - 1 + Nv, d), the token replaced
        by the visual tokens (transformers' masked_scatter over the expanded placeholder)."""
        c = self.config
        marks = [i for i, t in enumerate(ids) if t in (c.image_token_id, c.video_token_id)]
        if len(marks) != 1:
            raise ValueError(f"a prompt must hold one image or video token, found {len(marks)}")
        k = marks[0]
        ids_t = torch.tensor(ids, device=self.device)
        embeds = self.decoder.embed_tokens(ids_t)
        return torch.cat([embeds[:k], visual.to(embeds.dtype), embeds[k + 1:]], dim=0)

    def encode(self, visuals: list[np.ndarray], media: list[tuple[str, tuple[int, int]]]) -> Visual:
        """uint8 inputs per item (anyres tiles of an image, or a clip's frames) and (kind, (height, width)) per
        item -> their visual tokens, padded to the longest: `tokens` (N, Nv, d), `mask` (N, Nv)."""
        seqs = []
        for frames, (kind, size, *_) in zip(visuals, media):  # *_: a video's frame times
            x = pixels(frames, self.config).to(self.device)
            seqs.append(self.image_tokens(x, size) if kind == "image" else self.video_tokens(x))
        return self._padded(seqs)

    def prefix(self, pixels: Tensor, frame_mask: Tensor, media: list[tuple[str, tuple[int, int]]],
               heads: list[list[int]]) -> Visual:
        """Training's view of a batch (lavi.training.shared_prefix, as for LaVi's concat): per item, the embeddings of its
        prompt's text before the placeholder, then its visual tokens, one prefix its text rows attend to.
        pixels (N, F, 3, S, S) normalised tiles or frames, frame_mask (N, F); the tower runs once over every
        real tile and frame of the batch, in item order."""
        feats = self.features(pixels[frame_mask])  # (R, P, d)
        seqs = []
        for item, (kind, size), head in zip(feats.split(frame_mask.sum(1).tolist()), media, heads):
            tokens = self.pack_image(item, size) if kind == "image" else self.pack_video(item)
            text = self.decoder.embed_tokens(torch.tensor(head, dtype=torch.long, device=self.device))
            seqs.append(torch.cat([text.to(tokens.dtype), tokens]))
        return self._padded(seqs)

    def _padded(self, seqs: list[Tensor]) -> Visual:
        n, d = max(len(s) for s in seqs), self.config.decoder.hidden_size
        tokens = torch.zeros(len(seqs), n, d, dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(seqs), n, dtype=torch.bool, device=self.device)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)], mask[i, : len(s)] = s, True
        return Visual(mask=mask, tokens=tokens)

    def inputs(self, vis: Visual, ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, None]:
        """Left-padded prompts (B, T) with one placeholder each + the per-row visual -> the prefill's embeddings
        (B, T', d), left-padded again, and key validity (B, T'). No conditioners: vision is in the context."""
        rows = [self.splice(ids[b][valid[b]].tolist(), vis.tokens[b][vis.mask[b]]) for b in range(ids.shape[0])]
        t = max(len(r) for r in rows)
        embeds = torch.zeros(len(rows), t, rows[0].shape[1], dtype=self.dtype, device=self.device)
        kvalid = torch.zeros(len(rows), t, dtype=torch.bool, device=self.device)
        for b, r in enumerate(rows):
            embeds[b, t - len(r):], kvalid[b, t - len(r):] = r, True
        return embeds, kvalid, None

    def visual_positions(self, vis: Visual, ids: Tensor, valid: Tensor) -> Tensor:
        """(B, T') bool: which positions of `inputs`' context are visual tokens (each row's spliced span)."""
        c = self.config
        n_vis = vis.mask.sum(1).tolist()
        lengths = [int(valid[b].sum()) - 1 + n_vis[b] for b in range(ids.shape[0])]
        t = max(lengths)
        out = torch.zeros(ids.shape[0], t, dtype=torch.bool, device=ids.device)
        for b, row in enumerate(ids.tolist()):
            real = [tok for tok, ok in zip(row, valid[b].tolist()) if ok]
            k = next(i for i, tok in enumerate(real) if tok in (c.image_token_id, c.video_token_id))
            start = t - lengths[b] + k
            out[b, start:start + n_vis[b]] = True
        return out

    def conds(self, vis: Visual) -> None:
        return None
