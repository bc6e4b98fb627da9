"""Training losses: next-token on the targets, the focus loss on one attention head, the ViT's grid probe.

None of this is part of the model: inference never runs it, checkpoints do not hold it.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from lavi.training.collate import Batch
from lavi.core.fusion import Visual
from lavi.core.model import LaVi
from lavi.onevision.model import OneVision
from lavi.training.shared_prefix import forward_rows, prefix_kv


class GridProbe(torch.nn.Module):
    """An auxiliary training head on the ViT's last block: pool the patch grid onto a G x G grid of cells
    and classify each cell's attributes. Dense supervision teaches a tower trained from scratch where
    things are far sooner than the caption loss alone, which reaches it only through the fusion. It is
    not part of the model: inference never runs it and checkpoints do not hold it."""

    def __init__(self, d: int, classes: tuple[int, ...], side: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.classes, self.side = tuple(classes), side
        self.norm = torch.nn.LayerNorm(d, eps=eps)
        self.head = torch.nn.Linear(d, sum(classes))
        self.feats: Tensor | None = None  # the watched block's output at the last encode

    def watch(self, model: LaVi) -> torch.utils.hooks.RemovableHandle:
        """Keep, at every `model.encode`, the output of the block the probe reads (a forward hook): the
        deepest one ViLN runs (its last tap), or the ViT's last."""
        deepest = max(model.config.vision_taps()) if model.viln is not None else -1

        def keep(_module: torch.nn.Module, _args: tuple, out: Tensor) -> None:
            self.feats = out

        return model.vision.encoder.layers[deepest].register_forward_hook(keep)

    def batch_loss(self, b: Batch) -> Tensor:
        """The loss on the features the last encode (of `b`'s frames) left, which it then lets go."""
        feats, self.feats = self.feats, None
        return self.loss(feats, real_frames(b.grid, b.frame_mask).to(feats.device))

    def loss(self, feats: Tensor, target: Tensor) -> Tensor:
        """feats (N*F, P, d) block output; target (N*F, G*G, A) classes, -100 ignored."""
        nf, p, d = feats.shape
        h = int(round(p ** 0.5))
        grid = self.norm(feats).transpose(1, 2).reshape(nf, d, h, h)
        cells = torch.nn.functional.adaptive_avg_pool2d(grid, self.side).flatten(2).transpose(1, 2)  # (NF, G*G, d)
        logits = self.head(cells).split(self.classes, dim=-1)
        return sum(torch.nn.functional.cross_entropy(lg.flatten(0, 1).float(), target[..., a].flatten())
                   for a, lg in enumerate(logits)) / len(logits)


def encode(model: LaVi | OneVision, b: Batch) -> Visual:
    """The visual state training runs the text rows over: a LaVi's (`LaVi.encode`), or a LLaVA-OneVision's prefix
    (`OneVision.prefix`). The tower sees the batch's real frames (or tiles) in item order either way."""
    dev = model.device
    if b.grids is not None:  # a dynamic-resolution LaVi: its items' patches and grids
        return model.encode(b.pixels.to(dev), b.grids)
    if b.media is not None:
        return model.prefix(b.pixels.to(dev), b.frame_mask.to(dev), b.media, b.heads)
    return model.encode(b.pixels.to(dev), b.frame_mask.to(dev))


def real_frames(grid: Tensor, frame_mask: Tensor) -> Tensor:
    """(N, F, G*G, A) probe targets -> those of the real frames, in the order the ViT sees them (LaVi.encode)."""
    return grid.flatten(0, 1)[frame_mask.flatten()]


def length_groups(lengths: Tensor) -> list[Tensor]:
    """Split rows into at most two groups by length, at the cut that pads the fewest positions: short VQA
    answers and long captions in one batch need not all be padded to the longest caption."""
    order = lengths.argsort()
    srt = lengths[order].tolist()
    n = len(srt)
    cost = [k * srt[k - 1] + (n - k) * srt[-1] for k in range(1, n)]
    if not cost or min(cost) >= n * srt[-1] * 0.9:
        return [order]
    k = 1 + min(range(len(cost)), key=cost.__getitem__)
    return [order[:k], order[k:]]


def lm_loss(model: LaVi, b: Batch, row_mean: bool = False) -> Tensor:
    """Next-token loss on the targets: mean over all target tokens, or (row_mean) over each row's target
    tokens, then over rows. The visual state is computed once; rows run in length groups (same result)."""
    return losses(model, b, row_mean)[0]


def head0_probs(q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
    """Attention probabilities of head 0: q (B, H, T, D), k (B, Hk, S, D), mask broadcastable to (B, 1, T, S)
    bool -> (B, T, S). The focus loss teaches one head to find what a question names (a layer's other heads
    stay free)."""
    logits = (q[:, 0].float() @ k[:, 0].float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, T, S)
    return logits.masked_fill(~mask[:, 0].expand_as(logits), float("-inf")).softmax(-1)


class FocusRecorder:
    """While entered, records head 0's attention probabilities (`probs`, in call order) through forward
    pre-hooks on the `Attend` modules of the focus sites: ViLN's conditioner sites from layer 1 (layer 0's attention
    site sees only the token itself), or the concat decoder's self-attention from layer 1. The hooks go on
    exit, so a step never leaves recording switched on."""

    def __init__(self, model: LaVi) -> None:
        c = model.config
        if getattr(model, "vlora", None) is not None:
            raise ValueError("the focus loss teaches an attention head of the text over the image; VLoRA has none "
                             "(its image reaches the decoder as weights): train it without the focus loss")
        if model.viln is not None:
            self.sites = [model.viln.heads[f"{l}_{s}"].attend for l in c.modulated_layers() if l > 0
                          for s in c.site_names()]
        else:
            self.sites = [layer.self_attn.attend for layer in model.decoder.layers[1:]]
        self.probs: list[Tensor] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def _record(self, _module: torch.nn.Module, args: tuple) -> None:
        q, k, _v, mask = args
        self.probs.append(head0_probs(q, k, mask))

    def __enter__(self) -> "FocusRecorder":
        self.probs = []
        # before the attention itself runs, as an inline recording would: autograd then sums the gradients
        # of q and k in the same order, and training is bit-for-bit what it was
        self._hooks = [site.register_forward_pre_hook(self._record) for site in self.sites]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def losses(model: LaVi, b: Batch, row_mean: bool = False, focus: bool = False) -> tuple[Tensor, Tensor | None]:
    """(next-token loss, focus loss or None). The focus loss: at each position that predicts a target token
    about one object (Batch.focus), -log of the attention mass head 0 puts on that object's visual tokens,
    averaged over those positions and over the recorded layers/sites."""
    dev = model.device
    vis = encode(model, b)
    total = torch.zeros((), device=dev)
    focus = focus and b.focus is not None and bool(b.focus.any())
    recorder = FocusRecorder(model) if focus else None
    f_sum, f_n = torch.zeros((), device=dev), 0
    nv = vis.mask.shape[1]
    for g in length_groups(b.valid.sum(1)):
        t = int(b.valid[g].sum(1).max())
        ids, valid, labels = (x[g, :t].to(dev) for x in (b.ids, b.valid, b.labels))
        rows = b.rows[g].to(dev)
        prefix = prefix_kv(model, vis)  # before recording: the focus sites are the text rows' attention
        with recorder if recorder is not None else nullcontext():
            logits = forward_rows(model, ids, valid, vis, rows, prefix)  # (B_g, t, V)
        tok = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
        total = total + ((tok.sum(1) / (labels != -100).sum(1).clamp(min=1)).sum() if row_mean else tok.sum())
        if recorder is not None:
            target = b.focus[g, :t].to(dev)  # (B_g, t, Nv)
            has = target.any(-1)  # (B_g, t)
            if has.any():
                for probs in recorder.probs:
                    at = probs[..., :nv]  # (B_g, t, Nv): viln's keys are the visual tokens; concat's begin with
                    # its prefix (LaVi's visual tokens; a LLaVA-OneVision's template head, then its visual tokens)
                    mass = (at * target).sum(-1)[has]
                    f_sum = f_sum - torch.log(mass + 1e-6).sum()
                    f_n += int(has.sum())
    lm = total / (len(b.ids) if row_mean else (b.labels != -100).sum().clamp(min=1).to(dev))
    return lm, (f_sum / f_n if f_n else None)
