"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL in plain PyTorch: the dynamic-resolution vision tower (`lavi.qwenvl.vision`)
and the decoder of `lavi.core.decoder` (M-RoPE; Qwen3's q/k norms), in the engine and generation loop LaVi runs in.

transformers' `Qwen2VLForConditionalGeneration` (and its 2.5 and 3 siblings) is the spec; parity tests hold us to it:
    encode:  pixel_values (patches of every item, C*tp*p*p), grid_thw (N, 3) -> the tower's merged tokens per item
             (and Qwen3-VL's deepstack features), padded to the longest item: a `Visual`
    inputs:  each prompt's one placeholder expanded into its item's tokens (`lavi.qwenvl.layout.expand`), their
             embeddings replaced by the visual tokens; Qwen3-VL's deepstack features added to the hidden states at
             the visual positions after each of the first len(deepstack) layers (prefill only)
    positions: M-RoPE (3, B, T) for the prefill (`layout.rope_index`); decode steps continue with plain positions
             from each row's largest position + 1 (M-RoPE with three equal axes is plain RoPE)
The visual tokens sit in the decoder's context and its KV cache, as LLaVA-OneVision's do.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from lavi.core.decoder import NONE, Conditioning, Decoder, LayerConds, OnDecoder
from lavi.core.fusion import Visual
from lavi.core.model import attention_mask
from lavi.qwenvl import layout
from lavi.qwenvl.config import QwenVLConfig
from lavi.qwenvl.kinds import COMPRESS_METHODS
from lavi.qwenvl.vision import QwenVision
from lavi.qwenvl.vision_config import QwenVisionConfig
from lavi.visual_tokens.methods import VisualCompress


class QwenVL(OnDecoder, nn.Module):
    viln = None  # no norm conditioner: the decode step runs the plain decoder over the cache
    vision_in_context = True  # its merged patches sit in the decoder's context (lavi.serving.steps.context_lengths)
    compress_methods = COMPRESS_METHODS  # FastV (lavi.visual_tokens.fastv) prunes them past its layer

    def __init__(self, config: QwenVLConfig, decoder: Decoder | None = None) -> None:
        """decoder: one already built to take (the loader's, made on the meta device), in place of a new one."""
        super().__init__()
        self.config = config
        self.visual_compress: VisualCompress | None = None  # FastV's pruning, set at load (lavi.serving.load_prep)
        self.vision = QwenVision(QwenVisionConfig.from_hf(config.vision, config.kind))
        self.decoder = decoder if decoder is not None else Decoder(config.decoder)

    def encode(self, pixel_values: Tensor, grids: Tensor, kinds: Sequence[int],
               seconds: Sequence[float] | None = None, stamps: Sequence[Sequence[Sequence[int]]] | None = None
               ) -> Visual:
        """N items through the tower at once: pixel_values (sum of t*h*w, C*tp*p*p) normalised patches, grids
        (N, 3) each item's (t, h, w) in patches, kinds per item (layout IMAGE / VIDEO), seconds per item (a
        video's seconds per temporal patch, Qwen2.5-VL's time positions; None: 1), stamps per item (Qwen3-VL: a
        video's "<t seconds>" ids per temporal patch) -> `Visual`: tokens (N, Nv, d), mask (N, Nv), the layout."""
        grids = grids.long().cpu()
        tokens, deep = self.vision(pixel_values.to(self.device, self.dtype), grids.to(self.device))
        sizes = (grids.prod(-1) // self.config.merge_size ** 2).tolist()
        padded, mask = self._padded(tokens.split(sizes))
        n = len(sizes)
        return Visual(mask=mask, tokens=padded, grids=grids, kinds=torch.tensor(list(kinds), dtype=torch.long),
                      seconds=torch.tensor(list(seconds) if seconds is not None else [1.0] * n, dtype=torch.float32),
                      stamps=tuple(tuple(tuple(s) for s in item) for item in stamps) if stamps is not None else None,
                      deep=tuple(self._padded(d.split(sizes))[0] for d in deep) if len(deep) else None)

    def _padded(self, seqs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        n, d = max(len(s) for s in seqs), seqs[0].shape[-1]
        tokens = torch.zeros(len(seqs), n, d, dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(seqs), n, dtype=torch.bool, device=self.device)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)], mask[i, : len(s)] = s, True
        return tokens, mask

    def rows(self, vis: Visual, ids: Tensor, valid: Tensor) -> list[list[int]]:
        """Left-padded prompts (B, T) with one placeholder each, per-row `vis` -> each row's expanded ids."""
        kinds, grids, counts = vis.kinds.tolist(), vis.grids.tolist(), vis.mask.sum(1).tolist()
        out = []
        for b, (row, ok) in enumerate(zip(ids.tolist(), valid.tolist())):
            real = [t for t, keep in zip(row, ok) if keep]
            stamps = vis.stamps[b] if vis.stamps is not None else ()
            expanded = layout.expand(self.config, real, kinds[b], grids[b], stamps)
            if sum(bool(layout.kind_of(self.config, t)) for t in expanded) != counts[b]:
                raise ValueError(f"row {b}: its prompt's layout does not hold its item's {counts[b]} visual tokens")
            out.append(expanded)
        return out

    def context_lengths(self, vis: Visual, prompts: Sequence[list[int]], items: Sequence[int] | None = None
                        ) -> list[int]:
        """Each prompt's prefill context, exactly: its placeholder expanded as `rows` expands it (Qwen3-VL's video
        with its timestamps and each temporal patch's start and end). items: each prompt's item in `vis` (default:
        prompt i's is item i)."""
        kinds, grids = vis.kinds.tolist(), vis.grids.tolist()
        out = []
        for b, p in zip(range(len(prompts)) if items is None else items, prompts):
            stamps = vis.stamps[b] if vis.stamps is not None else ()
            out.append(len(layout.expand(self.config, p, kinds[b], grids[b], stamps)))
        return out

    def _left_padded(self, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), self.config.pad_token_id, dtype=torch.long)
        valid = torch.zeros(len(rows), t, dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, t - len(r):], valid[b, t - len(r):] = torch.tensor(r, dtype=torch.long), True
        return ids.to(self.device), valid.to(self.device)

    def inputs(self, vis: Visual, ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, LayerConds | None]:
        """Left-padded prompts (B, T) + the per-row visual -> the prefill's embeddings (B, T', d), its placeholders
        expanded and left-padded again, key validity (B, T'), and Qwen3-VL's deepstack as each of its layers'
        `Conditioning.residual` (None for the others)."""
        full, kvalid = self._left_padded(self.rows(vis, ids, valid))
        embeds = self.decoder.embed_tokens(full)  # (B, T', d)
        at = self._visual(full, kvalid)  # (B, T') the visual positions, row-major as the items' real tokens
        embeds[at] = vis.tokens[vis.mask].to(embeds.dtype)
        if vis.deep is None:
            return embeds, kvalid, None
        deep = []
        for feats in vis.deep:  # zeros but at the visual positions: adding them is transformers' indexed add
            dense = torch.zeros_like(embeds)
            dense[at] = feats[vis.mask].to(embeds.dtype)
            deep.append(dense)
        return embeds, kvalid, lambda i: Conditioning(residual=deep[i]) if i < len(deep) else NONE

    def _visual(self, full: Tensor, kvalid: Tensor) -> Tensor:
        c = self.config
        return ((full == c.image_token_id) | (full == c.video_token_id)) & kvalid

    def prefill_positions(self, vis: Visual, ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """The M-RoPE positions of `inputs`' context (3, B, T') (pads 0), and each row's first decode position (B,)."""
        rows = self.rows(vis, ids, valid)
        t = max(len(r) for r in rows)
        positions = torch.zeros(3, len(rows), t, dtype=torch.long)
        nxt = []
        grids, seconds = vis.grids.tolist(), vis.seconds
        for b, r in enumerate(rows):
            p, n = layout.rope_index(self.config, r, grids[b], seconds[b])
            positions[:, b, t - len(r):] = p
            nxt.append(n)
        return positions.to(self.device), torch.tensor(nxt, dtype=torch.long, device=self.device)

    def visual_positions(self, vis: Visual, ids: Tensor, valid: Tensor) -> Tensor:
        """(B, T') bool: which positions of `inputs`' context are visual tokens."""
        full, kvalid = self._left_padded(self.rows(vis, ids, valid))
        return self._visual(full, kvalid)

    def conds(self, vis: Visual) -> None:
        return None  # decode steps: the visual tokens are in the cache, deepstack was the prefill's

    def forward(self, vis: Visual, ids: Tensor, valid: Tensor) -> Tensor:
        """Full-sequence forward, no cache: left-padded prompts (B, T) with one placeholder each -> the logits of
        the expanded context (B, T', V) (what transformers' forward gives for the processor's expanded ids)."""
        embeds, kvalid, conds = self.inputs(vis, ids, valid)
        positions, _ = self.prefill_positions(vis, ids, valid)
        slots = torch.arange(embeds.shape[1], device=embeds.device)
        logits, _ = self.decoder(embeds, positions, attention_mask(kvalid, slots, kvalid), conds=conds)
        return logits
