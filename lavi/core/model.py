"""LaVi: a decoder, a ViT and a fusion (ViLN, VLoRA or the concat baseline) in one module."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from lavi.visual_tokens.methods import VisualCompress
from lavi.core.config import CONTEXT_FUSION, VILN, VLORA, LaViConfig
from lavi.core.decoder import Decoder, LayerConds, OnDecoder
from lavi.core.fusion import Projector, ViLNConditioner, Visual
from lavi.core.vision import VisionTower, pixels_from_frames
from lavi.resolution import DynamicResolution
from lavi.core.vlora import PerceptualWeights


def attention_mask(valid: Tensor, q_slots: Tensor, q_valid: Tensor) -> Tensor:
    """Key mask for cached attention. valid (B, S) marks real keys; q_slots (T,) the queries' cache slots;
    q_valid (B, T). Real queries see real keys at or before their slot; pad queries see every earlier
    slot (their outputs are discarded; this only keeps them finite). -> (B, 1, T, S) bool."""
    s = valid.shape[1]
    causal = torch.arange(s, device=valid.device)[None, :] <= q_slots[:, None]  # (T, S)
    return (causal[None] & (valid[:, None, :] | ~q_valid[:, :, None]))[:, None]


def rope_positions(valid: Tensor) -> Tensor:
    """valid (B, T) real tokens -> their RoPE positions (B, T): pads do not advance them (a pad takes its neighbour's,
    0 before the first real token), so a row's positions are the same padded in a batch as alone. The one
    definition: the model, both generation loops, training's shared prefix and the FLOP count use it."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)


class LaVi(OnDecoder, nn.Module):
    def __init__(self, config: LaViConfig, decoder: Decoder | None = None, vision: VisionTower | None = None) -> None:
        """`decoder`, `vision`: backbones already built (and trained) to take, in place of new ones."""
        super().__init__()
        self.config = config
        self.decoder = decoder if decoder is not None else Decoder(config.decoder)
        self.vision = vision if vision is not None else VisionTower(config.vision)
        self.viln = ViLNConditioner(config) if config.fusion == VILN else None
        self.projector = Projector(config) if config.fusion == CONTEXT_FUSION else None
        self.vlora = PerceptualWeights(config) if config.fusion == VLORA else None
        self.visual_compress: VisualCompress | None = None  # concat: fewer visual tokens (lavi.visual_tokens.methods), at load

    @property
    def image_size(self) -> int:
        """The square side its frames are resized to (`encode_frames` takes them so)."""
        return self.config.vision.image_size

    @property
    def dynamic(self) -> DynamicResolution | None:
        """A dynamic-resolution tower's input contract (lavi.resolution, lavi.qwenvl.lavi_model); None: square."""
        return None

    def encode_frames(self, visuals: list[np.ndarray], media: list[tuple] | None = None) -> Visual:
        """uint8 clips (F, S, S, 3) of side `image_size`, one per item (media: each item's (kind, (height, width)),
        unused: a square tower sees every input as frames) -> their visual state: what the engine encodes."""
        pixels, fmask = pixels_from_frames(visuals, self.config.image_mean, self.config.image_std, self.image_size)
        return self.encode(pixels.to(self.device), fmask.to(self.device))

    @property
    def vision_in_context(self) -> bool:
        """Whether its visual tokens enter the decoder's context (concat) or not (ViLN, VLoRA)."""
        return self.projector is not None

    def encode(self, pixels: Tensor, frame_mask: Tensor | None = None) -> Visual:
        """pixels (N, F, 3, S, S) normalised; frame_mask (N, F) bool (None: all frames real, and nothing is
        read back from the device, so shapes alone will do: FLOP counting runs this on the meta device).
        Frames are encoded independently; their features are concatenated along the token axis."""
        n, f = pixels.shape[:2]
        if f > self.config.max_frames:
            raise ValueError(f"{f} frames per item exceeds the model's max_frames={self.config.max_frames}")
        # padding frames (an image beside videos) skip the ViT: zeros, masked out
        padded = frame_mask is not None and not bool(frame_mask.all())
        if frame_mask is None:
            frame_mask = torch.ones(n, f, dtype=torch.bool, device=pixels.device)
        p = self.config.vision.num_patches
        mask = frame_mask.repeat_interleave(p, dim=1)  # (N, F*P)
        flat = pixels.reshape(n * f, *pixels.shape[2:]).to(self.dtype)  # (N*F, 3, S, S)
        real = frame_mask.reshape(-1)

        def unpad(x: Tensor) -> Tensor:  # (R, P, d) real frames -> (N*F, P, d)
            return x.new_zeros(n * f, *x.shape[1:]).index_copy_(0, real.nonzero().flatten(), x) if padded else x

        frames = flat[real] if padded else flat
        if self.viln is not None:
            _, taps = self.vision(frames, self.config.vision_taps())
            return self.viln.visual([unpad(t) for t in taps], n, f, mask)
        last, _ = self.vision(frames)
        if self.vlora is not None:
            return self.vlora.visual(unpad(last), n, f, mask)
        return self.projector.visual(unpad(last), n, f, mask, self.visual_compress)

    def inputs(self, vis: Visual, ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, LayerConds | None]:
        """Text ids (B, T) + a per-row visual -> decoder embeddings, key validity and norm conditioners: what
        a prefill runs (lavi.serving.generate). concat prepends the visual tokens: (B, Nv + T, d); viln and vlora leave
        the context text-only."""
        embeds = self.decoder.embed_tokens(ids)
        if self.projector is None:
            return embeds, valid, self.conds(vis)
        return torch.cat([vis.tokens.to(embeds.dtype), embeds], 1), torch.cat([vis.mask, valid], 1), None

    def visual_positions(self, vis: Visual, ids: Tensor, valid: Tensor) -> Tensor:
        """(B, T0) bool: which positions of `inputs`' context are visual tokens (concat: its first Nv)."""
        if vis.tokens is None:
            return torch.zeros_like(valid)
        return torch.cat([vis.mask, torch.zeros_like(valid)], 1)

    def conds(self, vis: Visual) -> LayerConds | None:
        """The per-layer conditioning of a per-row visual state: ViLN's norm conditioners, VLoRA's weight deltas
        (None: concat, whose vision is in the context). Each decode step asks again, from the visual state's
        fixed-address copy (lavi.serving.generate)."""
        fusion = self.viln if self.viln is not None else self.vlora
        return fusion.conds(vis) if fusion is not None else None

    def forward(self, ids: Tensor, valid: Tensor, vis: Visual) -> Tensor:
        """Full-sequence forward for training and reference: ids (B, T), valid (B, T), vis gathered per
        row. Returns logits for the text positions (B, T, V); no cache is touched."""
        embeds, kvalid, conds = self.inputs(vis, ids, valid)
        s = embeds.shape[1]
        slots = torch.arange(s, device=ids.device)
        positions = rope_positions(kvalid)  # (B, S)
        logits, _ = self.decoder(embeds, positions, attention_mask(kvalid, slots, kvalid), conds=conds)
        return logits[:, s - ids.shape[1]:]
