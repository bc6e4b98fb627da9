"""Training LaVi: batches of (frames, prompt, target), next-token loss on the target, AdamW, resumable.

torch only: the data comes in as an iterator of `Example` lists from the caller (shapes-v1 renderer,
a Parquet of media and targets, ...). A checkpoint is a LaVi directory (or, for a LLaVA-OneVision, a
Hugging Face one) plus `train_state.safetensors` (optimizer moments) and `train_state.json` (step, config),
so a run resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lavi.core import checkpoint
from lavi.onevision import checkpoint as onevision_checkpoint
from lavi.training.collate import Batch, Example, Tiles, collate
from lavi.training.losses import GridProbe, encode, losses
from lavi.core.model import LaVi
from lavi.onevision.model import OneVision
from lavi.serving.prompts import ChatPrompts
from lavi.serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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


def init_from_scratch(model: LaVi | OneVision, std: float = 0.02) -> None:
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
    if isinstance(model, OneVision):
        onevision_checkpoint.save(model, out, assets=tok_dir)
    else:
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


def _step_loss(model: LaVi, batch: Batch, cfg: TrainConfig, probe: GridProbe | None,
               vision: bool) -> tuple[Tensor, dict[str, Tensor | None]]:
    """The loss one step minimises, and its parts by log name."""
    if vision:  # the ViT alone: the fusion's output is not part of the loss, so nothing else moves
        encode(model, batch)
        aux = probe.batch_loss(batch)
        return aux, {"grid_loss": aux}
    lm, foc = losses(model, batch, cfg.row_mean, focus=cfg.focus_weight > 0)
    loss = lm if foc is None else lm + cfg.focus_weight * foc
    aux = None
    if probe is not None and batch.grid is not None:
        aux = probe.batch_loss(batch)
        loss = loss + cfg.grid_weight * aux
    return loss, {"loss": lm, "grid_loss": aux, "focus_loss": foc}


class DataParallel:
    """Data-parallel training over the default torch.distributed process group (gloo on CPU, NCCL on GPU: Ray
    Train's TorchTrainer sets it up): every rank starts from rank 0's weights, each trains on its shard of a step's
    batch, and the gradients are averaged over the ranks before clipping and the optimizer step, so that W ranks
    step as one process on the whole batch would (exactly so with a per-row loss mean and equal rows per rank).
    Only rank 0 writes checkpoints; `on_checkpoint(step)` runs on every rank after each one."""

    def __init__(self, on_checkpoint: Callable[[int, dict], None] | None = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.on_checkpoint = on_checkpoint

    def broadcast(self, *modules: torch.nn.Module | None) -> None:
        for m in modules:
            if m is not None:
                for t in m.state_dict().values():
                    self.dist.broadcast(t, 0)

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """One all-reduce of every trainable parameter's gradient (zeros where a rank's batch left none, so that
        every rank reduces the same buffer)."""
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        self.dist.all_reduce(flat)
        flat /= self.world
        for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
            p.grad = g.view_as(p)

    def mean(self, parts: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """The ranks' mean of each logged loss (the whole batch's, as a rank logs its shard's)."""
        keys = [k for k, v in parts.items() if v is not None]
        if not keys:
            return parts
        flat = torch.stack([parts[k].detach().float() for k in keys])
        self.dist.all_reduce(flat)
        return {**parts, **dict(zip(keys, flat / self.world))}


def train(model: LaVi, tok_dir: Path, data: Callable[[int], list[Example]], cfg: TrainConfig, out: Path,
          resume: bool = True, on_log: Callable[[dict], None] | None = None,
          vision_data: Callable[[int], list[Example]] | None = None, parallel: DataParallel | None = None,
          on_saved: Callable[[int], None] | None = None, tiles: Tiles | None = None) -> dict:
    """Train for cfg.steps; `data(step)` returns that step's examples (deterministic per step, so a resumed
    run sees the same batches; under `parallel`, this rank's shard of them), `vision_data(step)` those of the
    vision phase (examples with grid labels). Checkpoints to `out` every cfg.checkpoint_every steps and at the end;
    `on_saved(step)` runs where a checkpoint was written, right after it (the caller's upload of `out`). `tiles`
    cuts a LLaVA-OneVision's images (collate's, workers.anyres.anyres_tiles)."""
    if cfg.vision_steps and vision_data is None:
        raise ValueError("cfg.vision_steps > 0 needs vision_data")
    torch.manual_seed(cfg.seed)
    if cfg.freeze_backbones:
        model.freeze_backbones()
    model.train()
    tok = Tokenizer(tok_dir)
    chat = ChatPrompts.load(tok_dir, tok) if isinstance(model, OneVision) else None
    opt, probe, hook, start, wall0 = _prepare(model, cfg, out, resume, parallel)
    params = [p for g in opt.param_groups for p in g["params"]]
    t0 = session = time.time()
    seen, last = 0, {}
    for step in range(start, cfg.steps):
        vision = step < cfg.vision_steps
        if step == cfg.vision_steps and step > 0:
            t0, seen = time.time(), 0  # rates of the main phase
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = collate((vision_data if vision else data)(step), model, tok, chat, tiles)
        loss, parts = _step_loss(model, batch, cfg, probe, vision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if parallel is not None:
            parallel.average_grads(params)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        seen += int(batch.frame_mask.sum()) if vision else len(batch.ids)
        if (step + 1) % cfg.log_every == 0 or step + 1 in (cfg.vision_steps, cfg.steps):
            last = _record(step, vision, parts, seen, time.time() - t0, cfg, parallel)
            if on_log:
                on_log(last)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            model.eval()
            if parallel is None or parallel.rank == 0:
                save_state(out, model, opt, step + 1, cfg, tok_dir, probe, wall_s=wall0 + time.time() - session)
                if on_saved is not None:
                    on_saved(step + 1)
            if parallel is not None and parallel.on_checkpoint is not None:
                parallel.on_checkpoint(step + 1, last)
            model.train()
    if hook is not None:
        hook.remove()
    model.eval()
    return last


def _prepare(model: LaVi, cfg: TrainConfig, out: Path, resume: bool, parallel: DataParallel | None) -> tuple:
    """(optimizer, grid probe or None, the probe's recording hook or None, step to start at, wall time so far):
    restored from `out`'s checkpoint when resuming; under `parallel`, every rank holding rank 0's weights."""
    probe = hook = None
    if cfg.grid_weight > 0:
        vc = model.config.vision
        probe = GridProbe(vc.hidden_size, cfg.grid_classes, cfg.grid_side, vc.layer_norm_eps).to(model.device)
        hook = probe.watch(model)
    opt = _optimizer(model, cfg, probe)
    start, wall0 = 0, 0.0
    if resume and (out / "train_state.json").exists():
        start, wall0 = load_state(out, opt, probe)
        log.info("resuming from step %d in %s", start, out)
    if parallel is not None:  # resumed ranks hold the same checkpoint; fresh ones may not hold the same init
        parallel.broadcast(model, probe)
    return opt, probe, hook, start, wall0


def _record(step: int, vision: bool, parts: dict[str, Tensor | None], seen: int, dt: float, cfg: TrainConfig,
            parallel: DataParallel | None) -> dict:
    """The log record after `step`: phase, lr, the rate of rows (frames, in the vision phase) over `dt` seconds
    and the losses; under `parallel`, every rank's rows and the ranks' mean losses."""
    if parallel is not None:
        parts = parallel.mean(parts)
        seen_all = torch.tensor(float(seen))
        parallel.dist.all_reduce(seen_all)
        seen = float(seen_all)
    rec = {"step": step + 1, "phase": "vision" if vision else "main", "lr": lr_at(step, cfg),
           "frames_per_s" if vision else "rows_per_s": seen / dt, "elapsed_s": dt}
    rec.update({key: float(value.detach()) for key, value in parts.items() if value is not None})
    return rec
