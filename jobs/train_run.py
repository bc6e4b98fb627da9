"""One training run's steps, shared by the in-process path (jobs.train) and each Ray Train worker (jobs.train_ray):
the setup (the model built, resumed or fine-tuned, this rank's shard of the data, the TrainConfig), the progress log,
and the summary written at the end."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from jobs.train_start import build


@dataclass
class Setup:
    """What one training process (or Ray Train worker) trains: the model, its data and the loop's config."""

    model: object
    tok_dir: Path
    source: object
    vision_source: object
    cfg: object
    device: str

    def run(self, out: Path, resume: bool, on_log=None, parallel=None, on_saved=None) -> dict:
        """lavi.training.train.train on this setup (a LLaVA-OneVision's images cut by workers.anyres)."""
        from lavi.training.train import train
        from workers.anyres import anyres_tiles

        return train(self.model, self.tok_dir, self.source, self.cfg, out, resume=resume, on_log=on_log,
                     vision_data=self.vision_source, parallel=parallel, on_saved=on_saved, tiles=anyres_tiles)


def prepare(o: dict, outp: Path, rank: int = 0, world: int = 1, storage_options: dict | None = None) -> Setup:
    """The model (built, resumed from `outp` or fine-tuned), this rank's shard of the data, the TrainConfig.
    storage_options: the data's object store settings (kept out of `o`, which Ray Train's loop config carries: on
    Ray Train's workers the environment's credentials read it)."""
    import torch

    from lavi.core.model import LaVi
    from lavi.training.train import TrainConfig
    from shapes.batches import GRID_CLASSES

    device = o["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if o["threads"]:
        torch.set_num_threads(o["threads"])
    torch.manual_seed(o["seed"])
    clip_frames = _clip_frames(o["frames"])
    data = o["data"]
    model, tok_dir = build(outp, o["fusion"], o["decoder"], o["vision"], resume=not o["no_resume"],
                            frames={"default_frames": clip_frames[0], "max_frames": max(clip_frames)}, init=o["init"])
    if o["focus"] and o["fusion"] == "vlora":
        raise click.BadParameter("VLoRA's text attends to no image tokens, so there is no attention to focus: "
                                 "train it with --focus 0", param_hint="--focus")
    if max(clip_frames) > model.config.max_frames:
        raise click.BadParameter(f"{max(clip_frames)} frames per clip is over the model's max_frames "
                                 f"{model.config.max_frames}", param_hint="--frames")
    model.to(device)
    vision_source = None
    if o["vision_steps"] and (data != "shapes" or o["grid_probe"] <= 0):
        raise click.UsageError("--vision-steps trains the ViT through the grid probe on shapes-v1: it needs "
                               "--data shapes and --grid-probe > 0")
    if o["image_root"] and data == "shapes":
        raise click.UsageError("--image-root goes with --data naming media by relative path")
    if data == "shapes":
        from shapes.batches import ShapesData
        source = _Shard(ShapesData(seed=o["seed"], images=o["images"], videos=o["videos"], questions=o["questions"],
                                   frames=clip_frames, grid=o["grid_probe"] > 0, focus=o["focus"] > 0), rank, world)
        vision_source = _Shard(ShapesData(seed=o["seed"], images=o["vision_images"], videos=o["vision_videos"],
                                          questions=0, frames=clip_frames, grid=True, stream=1), rank, world)
    else:
        from workers.train_data import TrainData
        try:
            dynamic = model.dynamic if isinstance(model, LaVi) else None  # a Qwen-VL tower's LaVi: its own sizes
            image_size = model.image_size if isinstance(model, LaVi) else model.config.vision.image_size
            source = TrainData(data, image_size=image_size, frames=clip_frames[0], dynamic=dynamic,
                               batch_items=o["batch_items"], seed=o["seed"], image_root=o["image_root"],
                               rank=rank, world=world, storage_options=storage_options or {})
        except (ValueError, FileNotFoundError) as err:
            raise click.BadParameter(str(err), param_hint="--data") from None
    shapes = data == "shapes"
    cfg = TrainConfig(steps=o["steps"], lr=o["lr"], warmup=o["warmup"], seed=o["seed"],
                      freeze_backbones=o["freeze_backbones"], checkpoint_every=o["checkpoint_every"],
                      log_every=o["log_every"], grid_weight=o["grid_probe"] if shapes else 0.0,
                      grid_classes=GRID_CLASSES, row_mean=o["loss_per"] == "row",
                      focus_weight=o["focus"] if shapes else 0.0, vision_steps=o["vision_steps"])
    if rank == 0:
        frozen = {id(p) for p in [*model.decoder.parameters(), *model.vision.parameters()]} \
            if o["freeze_backbones"] else set()
        n_train = sum(p.numel() for p in model.parameters() if id(p) not in frozen)
        click.echo(f"training {model.config.name} ({model.config.fusion}, {n_train / 1e6:.2f}M trainable params) "
                   f"on {data if isinstance(data, str) else ', '.join(data)} for {o['steps']} steps on {device}"
                   f"{f' x {world} workers' if world > 1 else ''} -> {o['out']}")
    return Setup(model, tok_dir, source, vision_source, cfg, device)


def _clip_frames(frames: str) -> tuple[int, ...]:
    """--frames: one number or a comma-separated list, each >= 1."""
    try:
        clip_frames = tuple(int(f) for f in frames.split(","))
    except ValueError:
        raise click.BadParameter(f"expected a number or a comma-separated list, got {frames!r}",
                                 param_hint="--frames") from None
    if not clip_frames or min(clip_frames) < 1:
        raise click.BadParameter("frames per clip must be >= 1", param_hint="--frames")
    return clip_frames


class _Shard:
    """Rank `rank` of `world`'s share of a data source's step: every world-th example from its rank on."""

    def __init__(self, source, rank: int, world: int) -> None:
        self.source, self.rank, self.world = source, rank, world

    def __call__(self, step: int):
        return self.source(step)[self.rank::self.world]

    def summary(self):
        return "shapes"


def progress(log_path: Path, start: int, steps: int, t0: float):
    """The training log's `on_log`: a progress line on the console and a JSON line in `log_path`. A resumed run
    redoes the steps after its checkpoint: their old records go first."""
    if log_path.exists():
        kept = [line for line in log_path.read_text().splitlines() if start and json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))
    logf = log_path.open("a")

    def on_log(rec: dict) -> None:
        eta = (steps - rec["step"]) * (time.time() - t0) / max(1, rec["step"] - start)
        losses = "".join(f"  {name} {rec[key]:.4f}" for key, name in
                         (("loss", "loss"), ("grid_loss", "grid"), ("focus_loss", "focus")) if key in rec)
        rate = f"{rec['rows_per_s']:.1f} rows/s" if "rows_per_s" in rec else f"{rec['frames_per_s']:.1f} frames/s"
        click.echo(f"step {rec['step']}/{steps} {rec['phase']}{losses}  lr {rec['lr']:.2e}  {rate}  "
                   f"eta {eta / 60:.1f} min")
        logf.write(json.dumps(rec) + "\n")
        logf.flush()

    return on_log


def summarise(outp: Path, o: dict, last: dict, start: int, session: float, device: str, data, **extra) -> dict:
    """train_summary.json, written and echoed."""
    import torch

    wall = json.loads((outp / "train_state.json").read_text())["wall_s"]  # every session's, to the last step
    summary = {"steps": o["steps"], "final": last, "wall_s": wall, "session_wall_s": session, "device": device,
               "threads": o["threads"] or torch.get_num_threads(), "resumed_from": start,
               "command": "lavi-label " + " ".join(sys.argv[1:]), "torch": torch.__version__, "data": data, **extra}
    (outp / "train_summary.json").write_text(json.dumps(summary, indent=2))
    click.echo(f"done in {wall / 60:.1f} min of training ({session / 60:.1f} min this session): final loss "
               f"{last.get('loss', float('nan')):.4f}; checkpoint in {outp}")
    return summary
