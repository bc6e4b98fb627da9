"""Training LaVi: batches of (frames, prompt, target), next-token loss on the target, AdamW, resumable.

torch only: the data comes in as an iterator of `Example` lists from the caller (shapes-v1 renderer,
a Parquet of media and targets, ...). A checkpoint is a LaVi directory plus `train_state.safetensors`
(optimizer moments) and `train_state.json` (step, config), so a run resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import checkpoint
from .engine import pixels_from_frames
from .fusion import Visual
from .model import LaVi
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


# (start, end, cells): characters [start, end) of a target text are about one object, whose cells per frame
# are cells, bool (F, G*G). A VQA answer is one span; a caption has one span per object phrase.
Span = tuple[int, int, np.ndarray]


@dataclass(frozen=True)
class Example:
    frames: np.ndarray  # uint8 (F, S, S, 3)
    pairs: tuple[tuple[str, str], ...]  # (prompt, target) pairs asked of these frames
    grid: np.ndarray | None = None  # int (F, G*G, A): per-frame, per-cell attribute classes; -100 = unknown
    focus: tuple[tuple[Span, ...], ...] | None = None  # per pair: the spans of its target that are about one
    # object, each with that object's cells per frame (none: a count, an absent object)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    freeze_backbones: bool = False
    checkpoint_every: int = 500
    log_every: int = 50
    grid_weight: float = 0.0  # weight of the auxiliary grid probe loss on the ViT (0: off)
    grid_classes: tuple[int, ...] = ()  # classes per attribute of Example.grid
    grid_side: int = 3
    focus_weight: float = 0.0  # weight of the focus loss: one attention head per layer learns to look at the object
    # a question names (Example.focus); 0: off
    row_mean: bool = False  # loss: mean over each row's target tokens, then over rows (short answers weigh as
    # much as long captions); False: mean over all target tokens
    vision_steps: int = 0  # a first phase of this many steps (within `steps`) that trains the ViT alone through
    # the grid probe, on its own data, with its own warmup and decay; then the main phase starts afresh

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.warmup < 0:
            raise ValueError("steps must be >= 1, lr > 0 and warmup >= 0")
        if not 0 <= self.vision_steps < self.steps:
            raise ValueError(f"vision_steps must be in [0, steps={self.steps})")
        if self.vision_steps and self.grid_weight <= 0:
            raise ValueError("a vision phase trains the ViT through the grid probe: give grid_weight > 0")


@dataclass
class Batch:
    pixels: Tensor  # (N, F, 3, S, S)
    frame_mask: Tensor  # (N, F)
    rows: Tensor  # (B,) item of each text row
    ids: Tensor  # (B, T) right-padded prompt + target + EOS
    valid: Tensor  # (B, T)
    labels: Tensor  # (B, T) next-token targets, -100 where not scored
    grid: Tensor | None = None  # (N, F, G*G, A) probe targets, -100 where unknown or padded
    focus: Tensor | None = None  # (B, T, F*P) bool: per position, the visual tokens of the object the token it
    # predicts is about (none: no target)


def collate(examples: list[Example], model: LaVi, tok: Tokenizer) -> Batch:
    c = model.config
    pixels, fmask = pixels_from_frames([e.frames for e in examples], c.image_mean, c.image_std, c.vision.image_size)
    seqs, rows, offsets = [], [], []
    for i, e in enumerate(examples):
        for prompt, target in e.pairs:
            p = ([c.bos_token_id] if c.bos_token_id is not None else []) + tok.encode(c.prompt_template.format(prompt=prompt))
            y, off = tok.encode_offsets(target)
            seqs.append((p, y + [c.eos_token_id]))
            rows.append(i)
            offsets.append(off)
    t = max(len(p) + len(y) for p, y in seqs)
    ids = torch.full((len(seqs), t), c.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), t), -100, dtype=torch.long)
    valid = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, (p, y) in enumerate(seqs):
        n = len(p) + len(y)
        ids[i, :n] = torch.tensor(p + y)
        valid[i, :n] = True
        labels[i, len(p) - 1:n - 1] = torch.tensor(y)  # logits at t predict token t + 1
    grid = None
    if any(e.grid is not None for e in examples):
        g = next(e.grid for e in examples if e.grid is not None)
        grid = torch.full((len(examples), pixels.shape[1], *g.shape[1:]), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            if e.grid is not None:
                grid[i, :len(e.grid)] = torch.from_numpy(e.grid)
    focus = None
    if any(e.focus is not None for e in examples):
        npatch = c.vision.num_patches
        side = int(round(npatch ** 0.5))
        focus = torch.zeros(len(seqs), t, pixels.shape[1] * npatch, dtype=torch.bool)
        spans = [sp for e in examples for sp in (e.focus or ((),) * len(e.pairs))]
        for r, ((p, _), off, row_spans) in enumerate(zip(seqs, offsets, spans)):
            for start, end, cells in row_spans:
                patches = torch.from_numpy(cells_to_patches(cells, side)).flatten()  # (F*P,)
                for k, (a, b) in enumerate(off):
                    if a < end and b > start:  # target token k overlaps the span: the position predicting it
                        focus[r, len(p) - 1 + k, :len(patches)] = patches
    return Batch(pixels, fmask, torch.tensor(rows), ids, valid, labels, grid, focus)


def cells_to_patches(cells: np.ndarray, side: int) -> np.ndarray:
    """(F, G*G) per-cell flags -> (F, side*side) per-patch flags: a patch belongs to the cell its centre is in."""
    g = int(round(cells.shape[1] ** 0.5))
    of = ((np.arange(side) + 0.5) * g / side).astype(int)  # patch row/column -> cell row/column
    idx = (of[:, None] * g + of[None, :]).flatten()  # (side*side,) cell of each patch
    return cells[:, idx]


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

    def loss(self, feats: Tensor, target: Tensor) -> Tensor:
        """feats (N*F, P, d) block output; target (N*F, G*G, A) classes, -100 ignored."""
        nf, p, d = feats.shape
        h = int(round(p ** 0.5))
        grid = self.norm(feats).transpose(1, 2).reshape(nf, d, h, h)
        cells = torch.nn.functional.adaptive_avg_pool2d(grid, self.side).flatten(2).transpose(1, 2)  # (NF, G*G, d)
        logits = self.head(cells).split(self.classes, dim=-1)
        return sum(torch.nn.functional.cross_entropy(lg.flatten(0, 1).float(), target[..., a].flatten())
                   for a, lg in enumerate(logits)) / len(logits)


def _real_frames(grid: Tensor, frame_mask: Tensor) -> Tensor:
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


def _focus_modules(model: LaVi) -> list:
    """Where head 0's attention is recorded for the focus loss: ViLN's conditioner (its sites from layer 1;
    layer 0's attention site sees only the token itself), or the concat decoder's attention from layer 1."""
    return [model.viln] if model.viln is not None else [l.self_attn for l in model.decoder.layers[1:]]


def losses(model: LaVi, b: Batch, row_mean: bool = False, focus: bool = False) -> tuple[Tensor, Tensor | None]:
    """(next-token loss, focus loss or None). The focus loss: at each position that predicts a target token
    about one object (Batch.focus), -log of the attention mass head 0 puts on that object's visual tokens,
    averaged over those positions and over the recorded layers/sites."""
    dev = model.device
    vis: Visual = model.encode(b.pixels.to(dev), b.frame_mask.to(dev))
    total = torch.zeros((), device=dev)
    focus = focus and b.focus is not None and bool(b.focus.any())
    mods = _focus_modules(model) if focus else []
    f_sum, f_n = torch.zeros((), device=dev), 0
    nv = vis.mask.shape[1]
    try:
        for g in length_groups(b.valid.sum(1)):
            t = int(b.valid[g].sum(1).max())
            ids, valid, labels = (x[g, :t].to(dev) for x in (b.ids, b.valid, b.labels))
            for m in mods:
                m.focus_probs = []
            logits = model.forward_shared(ids, valid, vis, b.rows[g].to(dev))  # (B_g, t, V)
            tok = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
            total = total + ((tok.sum(1) / (labels != -100).sum(1).clamp(min=1)).sum() if row_mean else tok.sum())
            if mods:
                target = b.focus[g, :t].to(dev)  # (B_g, t, Nv)
                has = target.any(-1)  # (B_g, t)
                if has.any():
                    for probs in (p for m in mods for p in m.focus_probs):
                        at = probs[..., :nv]  # (B_g, t, Nv): viln's keys are the visual tokens; concat's begin with them
                        mass = (at * target).sum(-1)[has]
                        f_sum = f_sum - torch.log(mass + 1e-6).sum()
                        f_n += int(has.sum())
    finally:
        for m in mods:
            m.focus_probs = None
    lm = total / (len(b.ids) if row_mean else (b.labels != -100).sum().clamp(min=1).to(dev))
    return lm, (f_sum / f_n if f_n else None)


def init_from_scratch(model: LaVi, std: float = 0.02) -> None:
    """GPT-style init for backbones trained from scratch: N(0, std) weights, zero biases; the ViT's position
    embeddings at N(0, 1/sqrt(d)) so that where a patch is is not drowned by what it shows. The fusion
    keeps its own init, as on real backbones (fan-in scaled, so the conditioner's attention is not flat
    from the start; ViLN's output heads at zero, so the model still starts as its base LLM)."""
    for m in [*model.decoder.modules(), *model.vision.modules()]:
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d)):
            torch.nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)
    pos = model.vision.embeddings.position_embedding.weight
    torch.nn.init.normal_(pos, std=pos.shape[1] ** -0.5)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak, over the vision phase and again over the main one."""
    v = cfg.vision_steps
    step, steps = (step, v) if step < v else (step - v, cfg.steps - v)
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _optimizer(model: LaVi, cfg: TrainConfig, probe: GridProbe | None = None) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad] + (list(probe.parameters()) if probe else [])
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


def save_state(out: Path, model: LaVi, opt: torch.optim.AdamW, step: int, cfg: TrainConfig, tok_dir: Path,
               probe: GridProbe | None = None, wall_s: float = 0.0) -> None:
    """Write the model (a loadable LaVi directory) and the optimizer state (and the training-only probe's
    weights), then the step marker last, with the training wall time up to this step (over every session
    that led to it: the work after the last checkpoint of an interrupted session is redone, not counted)."""
    checkpoint.save(model, out, tokenizer_dir=tok_dir)
    state = opt.state_dict()
    tensors = {f"{pid}.{k}": v for pid, s in state["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    if probe is not None:
        tensors.update({f"probe.{k}": v for k, v in probe.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "train_state.safetensors"))
    (out / "train_state.json").write_text(json.dumps({"step": step, "wall_s": wall_s, "config": asdict(cfg)},
                                                     indent=2))


def load_state(out: Path, opt: torch.optim.AdamW, probe: GridProbe | None = None) -> tuple[int, float]:
    """Restore optimizer moments into `opt` (built for the same model) and the probe's weights; returns the
    step to resume at and the training wall time up to it."""
    meta = json.loads((out / "train_state.json").read_text())
    flat = load_file(str(out / "train_state.safetensors"))
    if probe is not None:
        probe.load_state_dict({k[len("probe."):]: v for k, v in flat.items() if k.startswith("probe.")})
        flat = {k: v for k, v in flat.items() if not k.startswith("probe.")}
    state = opt.state_dict()
    for pid in range(sum(len(g["params"]) for g in state["param_groups"])):
        keys = {k.split(".", 1)[1]: v for k, v in flat.items() if k.split(".", 1)[0] == str(pid)}
        if keys:
            state["state"][pid] = keys
    opt.load_state_dict(state)
    return int(meta["step"]), float(meta.get("wall_s", 0.0))


def train(model: LaVi, tok_dir: Path, data: Callable[[int], list[Example]], cfg: TrainConfig, out: Path,
          resume: bool = True, on_log: Callable[[dict], None] | None = None,
          vision_data: Callable[[int], list[Example]] | None = None) -> dict:
    """Train for cfg.steps; `data(step)` returns that step's examples (deterministic per step, so a resumed
    run sees the same batches), `vision_data(step)` those of the vision phase (examples with grid labels).
    Checkpoints to `out` every cfg.checkpoint_every steps and at the end."""
    if cfg.vision_steps and vision_data is None:
        raise ValueError("cfg.vision_steps > 0 needs vision_data")
    torch.manual_seed(cfg.seed)
    if cfg.freeze_backbones:
        model.freeze_backbones()
    model.train()
    tok = Tokenizer(tok_dir)
    probe, feats = None, {}
    if cfg.grid_weight > 0:
        vc = model.config.vision
        probe = GridProbe(vc.hidden_size, cfg.grid_classes, cfg.grid_side, vc.layer_norm_eps).to(model.device)
        deepest = max(model.config.vision_taps()) if model.viln is not None else -1  # viln stops at its last tap
        hook = model.vision.encoder.layers[deepest].register_forward_hook(lambda _m, _i, o: feats.__setitem__("x", o))
    opt = _optimizer(model, cfg, probe)
    start, wall0 = 0, 0.0
    if resume and (out / "train_state.json").exists():
        start, wall0 = load_state(out, opt, probe)
        log.info("resuming from step %d in %s", start, out)
    t0 = session = time.time()
    seen, last = 0, {}
    for step in range(start, cfg.steps):
        vision = step < cfg.vision_steps
        if step == cfg.vision_steps and step > 0:
            t0, seen = time.time(), 0  # rates of the main phase
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = collate((vision_data if vision else data)(step), model, tok)
        dev = model.device
        lm = foc = aux = None
        if vision:  # the ViT alone: the fusion's output is not part of the loss, so nothing else moves
            model.encode(batch.pixels.to(dev), batch.frame_mask.to(dev))
            loss = aux = probe.loss(feats.pop("x"), _real_frames(batch.grid, batch.frame_mask).to(dev))
        else:
            lm, foc = losses(model, batch, cfg.row_mean, focus=cfg.focus_weight > 0)
            loss = lm if foc is None else lm + cfg.focus_weight * foc
            if probe is not None and batch.grid is not None:
                aux = probe.loss(feats.pop("x"), _real_frames(batch.grid, batch.frame_mask).to(dev))
                loss = loss + cfg.grid_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        seen += int(batch.frame_mask.sum()) if vision else len(batch.ids)
        if (step + 1) % cfg.log_every == 0 or step + 1 in (cfg.vision_steps, cfg.steps):
            dt = time.time() - t0
            last = {"step": step + 1, "phase": "vision" if vision else "main", "lr": lr_at(step, cfg),
                    "frames_per_s" if vision else "rows_per_s": seen / dt, "elapsed_s": dt}
            for key, value in (("loss", lm), ("grid_loss", aux), ("focus_loss", foc)):
                if value is not None:
                    last[key] = float(value.detach())
            if on_log:
                on_log(last)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            model.eval()
            save_state(out, model, opt, step + 1, cfg, tok_dir, probe, wall_s=wall0 + time.time() - session)
            model.train()
    if probe is not None:
        hook.remove()
    model.eval()
    return last
