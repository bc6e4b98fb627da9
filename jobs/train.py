"""`lavi-label train`: train a LaVi (or the concat baseline) on shapes-v1 or a Parquet of targets."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from jobs.console import cli_logging
from jobs.train_start import build


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


def _progress(log_path: Path, start: int, steps: int, t0: float):
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


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory (resumed if it holds one).")
@click.option("--fusion", type=click.Choice(["viln", "vlora", "concat", "llava-ov"]), default="viln",
              show_default=True,
              help="viln: LaVi. vlora: VLoRA (vision as per-image low-rank weight deltas). concat: the LLaVA-style "
                   "baseline on the same backbones, data and budget. llava-ov: that baseline as a LLaVA-OneVision "
                   "(anyres tiles, pooled video), saved as a Hugging Face checkpoint transformers loads.")
@click.option("--decoder", type=click.Path(exists=True, file_okay=False), help="Local HF Qwen2/Llama directory.")
@click.option("--vision", type=click.Path(exists=True, file_okay=False), help="Local HF SigLIP directory.")
@click.option("--init", type=click.Path(exists=True, file_okay=False),
              help="Fine-tune: start from this LaVi (or, with --fusion llava-ov, LLaVA-OneVision) checkpoint "
                   "directory (weights and tokenizer), with a fresh optimizer and schedule. A LaVi of another "
                   "--fusion gives its decoder, ViT and tokenizer to a new fusion of this one, at its own init (the "
                   "base LLM exactly): e.g. VLoRA on a trained LaVi's backbones, with --freeze-backbones.")
@click.option("--freeze-backbones", is_flag=True,
              help="Train only the fusion (conditioner, weights generator or projector).")
@click.option("--data", default="shapes", show_default=True,
              help="'shapes' (shapes-v1, rendered online), or a URI: a Parquet of (uri or bytes, prompt, target), the "
                   "pipeline's output directory (its ok rows), LLaVA conversation JSON (.json/.jsonl, with "
                   "--image-root) or a Parquet of embedded images and conversations/messages.")
@click.option("--image-root", help="The URI that relative image and video paths in --data are under.")
@click.option("--steps", type=int, default=3000, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup", type=int, default=200, show_default=True)
@click.option("--images", type=int, default=24, show_default=True, help="shapes: images per step.")
@click.option("--videos", type=int, default=8, show_default=True, help="shapes: videos per step.")
@click.option("--questions", type=int, default=3, show_default=True, help="shapes: VQA pairs per item beside the caption.")
@click.option("--batch-items", type=int, default=32, show_default=True,
              help="--data URI: items per step (an item gives all its targets: a conversation's turns, the "
                   "pipeline's caption and answers of one image or clip).")
@click.option("--frames", default="4", show_default=True,
              help="Frames per video clip; shapes: a comma-separated list is drawn from per clip. A new model's "
                   "default frames per clip is the first, its max_frames the largest.")
@click.option("--grid-probe", type=float, default=0.0, show_default=True,
              help="shapes: weight of a training-only probe that classifies each grid cell from the ViT (0: off).")
@click.option("--focus", type=float, default=0.0, show_default=True,
              help="shapes: weight of a training-only loss that teaches one attention head per layer to look at "
                   "the object a question names (0: off; not for vlora, whose text attends to no image tokens).")
@click.option("--vision-steps", type=int, default=0, show_default=True,
              help="shapes: a first phase of this many of the --steps that trains the ViT alone through the grid "
                   "probe (needs --grid-probe), on larger batches of images and videos of its own.")
@click.option("--vision-images", type=int, default=64, show_default=True, help="shapes: images per vision step.")
@click.option("--vision-videos", type=int, default=16, show_default=True, help="shapes: videos per vision step.")
@click.option("--loss-per", type=click.Choice(["token", "row"]), default="token", show_default=True,
              help="token: mean over all target tokens. row: mean per row, then over rows (answers weigh as "
                   "much as captions).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-every", type=int, default=250, show_default=True)
@click.option("--log-every", type=int, default=50, show_default=True, help="Steps per progress line and log record.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Data-parallel workers on Ray Train (TorchTrainer: gloo on CPU, NCCL on GPU), each reading its "
                   "shard of every step's batch; 1 trains in this process.")
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True, help="--workers > 1: GPUs per worker.")
@click.option("--address", default=None, help="--workers > 1: the Ray cluster to join (default: a local Ray).")
@click.option("--checkpoint-storage", default=None,
              help="--workers > 1: where Ray Train keeps checkpoints, a local path or object-storage URI (default: "
                   "OUT/ray_train); a rerun continues from the latest one there.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N; auto: cuda when available.")
@click.option("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default).")
@click.option("--no-resume", is_flag=True, help="Start over even if --out holds a checkpoint.")
def train_cmd(**options) -> None:
    """Train LaVi and write a checkpoint directory (config.json, model.safetensors, tokenizer.json)."""
    train_model(**options)


def train_model(out: str, fusion: str = "viln", decoder: str | None = None, vision: str | None = None,
                init: str | None = None, freeze_backbones: bool = False, data: str | tuple[str, ...] = "shapes",
                image_root: str | None = None, steps: int = 3000, lr: float = 1e-3, warmup: int = 200,
                images: int = 24, videos: int = 8, questions: int = 3, batch_items: int = 32, frames: str = "4",
                grid_probe: float = 0.0, focus: float = 0.0, vision_steps: int = 0, vision_images: int = 64,
                vision_videos: int = 16, loss_per: str = "token", seed: int = 0, checkpoint_every: int = 250,
                log_every: int = 50, device: str = "auto", threads: int = 0, no_resume: bool = False,
                workers: int = 1, gpus_per_worker: float = 0.0, address: str | None = None,
                checkpoint_storage: str | None = None) -> dict:
    """`lavi-label train` (and distill's student training): the option defaults are the command's; `data` may be
    several URIs read as one (workers.train_data.read_records). `workers` > 1: data-parallel on Ray Train
    (`jobs.train_ray`). Returns train_summary.json's document."""
    options = {k: v for k, v in locals().items() if k not in ("workers", "gpus_per_worker", "address",
                                                               "checkpoint_storage")}
    cli_logging(fmt="%(asctime)s %(levelname)s %(message)s")
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    if workers < 1:
        raise click.BadParameter("must be >= 1", param_hint="--workers")
    if workers > 1:
        from jobs.train_ray import train_on_ray

        return train_on_ray(options, outp, workers, gpus_per_worker, address, checkpoint_storage)
    if gpus_per_worker or address or checkpoint_storage:
        raise click.UsageError("--gpus-per-worker, --address and --checkpoint-storage are for --workers > 1 (Ray "
                               "Train); one worker trains in this process (--device)")
    setup = _prepare(options, outp)
    start = json.loads((outp / "train_state.json").read_text())["step"] if (outp / "train_state.json").exists() and not no_resume else 0
    t0 = time.time()
    on_log = _progress(outp / "train_log.jsonl", start, steps, t0)
    last = setup.run(outp, resume=not no_resume, on_log=on_log)
    return _summarise(outp, options, last, start, time.time() - t0, setup.device, setup.source.summary())


@dataclass
class _Setup:
    """What one training process (or Ray Train worker) trains: the model, its data and the loop's config."""

    model: object
    tok_dir: Path
    source: object
    vision_source: object
    cfg: object
    device: str

    def run(self, out: Path, resume: bool, on_log=None, parallel=None) -> dict:
        from lavi.train import train

        return train(self.model, self.tok_dir, self.source, self.cfg, out, resume=resume, on_log=on_log,
                     vision_data=self.vision_source, parallel=parallel)


def _prepare(o: dict, outp: Path, rank: int = 0, world: int = 1) -> _Setup:
    """The model (built, resumed from `outp` or fine-tuned), this rank's shard of the data, the TrainConfig."""
    import torch

    from lavi.train import TrainConfig
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
            source = TrainData(data, image_size=model.config.vision.image_size, frames=clip_frames[0],
                               batch_items=o["batch_items"], seed=o["seed"], image_root=o["image_root"],
                               rank=rank, world=world)
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
    return _Setup(model, tok_dir, source, vision_source, cfg, device)


class _Shard:
    """Rank `rank` of `world`'s share of a data source's step: every world-th example from its rank on."""

    def __init__(self, source, rank: int, world: int) -> None:
        self.source, self.rank, self.world = source, rank, world

    def __call__(self, step: int):
        return self.source(step)[self.rank::self.world]

    def summary(self):
        return "shapes"


def _summarise(outp: Path, o: dict, last: dict, start: int, session: float, device: str, data, **extra) -> dict:
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
