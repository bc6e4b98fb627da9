"""`lavi-label train`: train a LaVi (or the concat baseline) on shapes-v1 or a Parquet of targets."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

log = logging.getLogger(__name__)


def _load(directory: str | Path):
    """A LaVi or LLaVA-OneVision checkpoint directory, by its config.json's model_type."""
    import torch

    from lavi import checkpoint, onevision_checkpoint
    from lavi.onevision_config import MODEL_TYPE
    config = json.loads((Path(directory) / "config.json").read_text())
    if config.get("model_type") == MODEL_TYPE:
        return onevision_checkpoint.load(directory, dtype=torch.float32)
    return checkpoint.load(directory)


def _build(out: Path, fusion: str, decoder: str | None, vision: str | None, resume: bool, frames: dict,
           init: str | None = None) -> tuple:
    """The model to train and its tokenizer directory: resumed, fine-tuned from a checkpoint (`init`), from
    backbones, or tiny-shapes (or, `llava-ov`, its LLaVA-OneVision counterpart) from scratch. A new model takes its
    default and max frames per clip from `frames` (those it is trained on); a fine-tuned one keeps its own."""
    from lavi import checkpoint
    from lavi.onevision import OneVision
    from lavi.tiny import save_word_tokenizer, tiny_shapes_config, tiny_shapes_onevision
    from lavi.train import init_from_scratch
    if resume and (out / "train_state.json").exists():
        return _load(out), out
    if init:
        if decoder or vision:
            raise click.UsageError("--init starts from a whole checkpoint: leave out --decoder and --vision")
        model = _load(init)
        kind = "llava-ov" if isinstance(model, OneVision) else model.config.fusion
        if kind != fusion:
            raise click.UsageError(f"--init {init} is a {kind} model: pass --fusion {kind}")
        return model, Path(init)  # train() puts it in training mode
    if decoder or vision:
        if fusion == "llava-ov":
            raise click.UsageError("--fusion llava-ov trains tiny-shapes' LLaVA-OneVision from scratch, or fine-tunes "
                                   "one (--init DIR): it takes no --decoder or --vision")
        if not (decoder and vision):
            raise click.UsageError("--decoder and --vision go together (two local Hugging Face directories)")
        return checkpoint.from_backbones(decoder, vision, fusion=fusion, **frames), Path(decoder)
    from shapes.spec import vocabulary
    tok_dir = out / "_tokenizer"
    if fusion == "llava-ov":
        model = tiny_shapes_onevision(vocabulary(), tok_dir, **frames)
    else:
        tok = save_word_tokenizer(vocabulary(), tok_dir)
        model = checkpoint.LaVi(tiny_shapes_config(tok.get_vocab_size(), fusion, **frames))
    init_from_scratch(model)
    return model, tok_dir


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
@click.option("--fusion", type=click.Choice(["viln", "concat", "llava-ov"]), default="viln", show_default=True,
              help="viln: LaVi. concat: the LLaVA-style baseline on the same backbones, data and budget. llava-ov: "
                   "that baseline as a LLaVA-OneVision (anyres tiles, pooled video), saved as a Hugging Face "
                   "checkpoint transformers loads.")
@click.option("--decoder", type=click.Path(exists=True, file_okay=False), help="Local HF Qwen2/Llama directory.")
@click.option("--vision", type=click.Path(exists=True, file_okay=False), help="Local HF SigLIP directory.")
@click.option("--init", type=click.Path(exists=True, file_okay=False),
              help="Fine-tune: start from this LaVi (or, with --fusion llava-ov, LLaVA-OneVision) checkpoint "
                   "directory (weights and tokenizer), with a fresh optimizer and schedule.")
@click.option("--freeze-backbones", is_flag=True, help="Train only the fusion (conditioner or projector).")
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
                   "the object a question names (0: off).")
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
                device: str = "auto", threads: int = 0, no_resume: bool = False) -> dict:
    """`lavi-label train` (and distill's student training): the option defaults are the command's; `data` may be
    several URIs read as one (workers.train_data.read_records). Returns train_summary.json's document."""
    import torch

    from lavi.train import TrainConfig, train
    from shapes.batches import GRID_CLASSES

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    clip_frames = _clip_frames(frames)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    model, tok_dir = _build(outp, fusion, decoder, vision, resume=not no_resume,
                            frames={"default_frames": clip_frames[0], "max_frames": max(clip_frames)}, init=init)
    if max(clip_frames) > model.config.max_frames:
        raise click.BadParameter(f"{max(clip_frames)} frames per clip is over the model's max_frames "
                                 f"{model.config.max_frames}", param_hint="--frames")
    model.to(device)
    size = model.config.vision.image_size
    vision_source = None
    if vision_steps and (data != "shapes" or grid_probe <= 0):
        raise click.UsageError("--vision-steps trains the ViT through the grid probe on shapes-v1: it needs "
                               "--data shapes and --grid-probe > 0")
    if image_root and data == "shapes":
        raise click.UsageError("--image-root goes with --data naming media by relative path")
    if data == "shapes":
        from shapes.batches import ShapesData
        source = ShapesData(seed=seed, images=images, videos=videos, questions=questions, frames=clip_frames,
                            grid=grid_probe > 0, focus=focus > 0)
        vision_source = ShapesData(seed=seed, images=vision_images, videos=vision_videos, questions=0,
                                   frames=clip_frames, grid=True, stream=1)
    else:
        from workers.train_data import TrainData
        try:
            source = TrainData(data, image_size=size, frames=clip_frames[0], batch_items=batch_items, seed=seed,
                               image_root=image_root)
        except (ValueError, FileNotFoundError) as err:
            raise click.BadParameter(str(err), param_hint="--data") from None
    cfg = TrainConfig(steps=steps, lr=lr, warmup=warmup, seed=seed, freeze_backbones=freeze_backbones,
                      checkpoint_every=checkpoint_every, grid_weight=grid_probe if data == "shapes" else 0.0,
                      grid_classes=GRID_CLASSES, row_mean=loss_per == "row",
                      focus_weight=focus if data == "shapes" else 0.0, vision_steps=vision_steps)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad or not freeze_backbones)
    click.echo(f"training {model.config.name} ({model.config.fusion}, {n_train / 1e6:.2f}M trainable params) "
               f"on {data if isinstance(data, str) else ', '.join(data)} for {steps} steps on {device} -> {out}")
    start = json.loads((outp / "train_state.json").read_text())["step"] if (outp / "train_state.json").exists() and not no_resume else 0
    t0 = time.time()
    on_log = _progress(outp / "train_log.jsonl", start, steps, t0)
    last = train(model, tok_dir, source, cfg, outp, resume=not no_resume, on_log=on_log, vision_data=vision_source)
    session = time.time() - t0
    wall = json.loads((outp / "train_state.json").read_text())["wall_s"]  # every session's, to the last step
    summary = {"steps": steps, "final": last, "wall_s": wall, "session_wall_s": session, "device": device,
               "threads": torch.get_num_threads(), "resumed_from": start,
               "command": "lavi-label " + " ".join(sys.argv[1:]), "torch": torch.__version__,
               "data": data if data == "shapes" else source.summary()}
    (outp / "train_summary.json").write_text(json.dumps(summary, indent=2))
    click.echo(f"done in {wall / 60:.1f} min of training ({session / 60:.1f} min this session): final loss "
               f"{last.get('loss', float('nan')):.4f}; checkpoint in {out}")
    return summary
