"""`lavi-label train`: train a LaVi (or the concat baseline) on shapes-v1 or a Parquet of targets.

`--out` is a local directory or an object-storage URI (jobs.outdir). A remote out is trained in a local temporary
directory: its files are uploaded at every checkpoint (train_state.json last) and at the end, and a run that resumes
(no --no-resume) first downloads the remote out, so it continues from the last checkpoint uploaded, wherever the
killed run was. With --workers > 1 that path resumes from Ray Train's checkpoints, kept by default in OUT/ray_train
(for a remote OUT too: Ray Train and jobs.train_ray reach it with the environment's credentials and endpoint, as they
take no --storage-option); the final checkpoint is uploaded at the end.
"""
from __future__ import annotations

import json
import time

import click

from jobs.console import cli_logging
from jobs.outdir import Staged, join, staged
from jobs.train_ray import train_on_ray
from jobs.train_run import prepare, progress, summarise
from lavi.families import TRAIN_FUSIONS

STATE = "train_state.json"  # written last at a checkpoint (lavi.training.train.save_state): uploaded last too
LOG = "train_log.jsonl"


@click.command()
@click.option("--out", required=True, help="Checkpoint directory, local or object storage (s3://, gs://; resumed if "
              "it holds one).")
@click.option("--fusion", type=click.Choice(TRAIN_FUSIONS), default="viln",
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
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for a remote --out and --data, as for `run` (repeatable; with --workers > 1 "
                   "the workers read --data with the environment's credentials).")
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
                checkpoint_storage: str | None = None, storage_options: tuple[str, ...] = ()) -> dict:
    """`lavi-label train` (and distill's student training): the option defaults are the command's; `data` may be
    several URIs read as one (workers.train_data.read_records). `workers` > 1: data-parallel on Ray Train
    (`jobs.train_ray`). `out` may be remote (the module's docstring). Returns train_summary.json's document."""
    options = {k: v for k, v in locals().items() if k not in ("workers", "gpus_per_worker", "address",
                                                               "checkpoint_storage", "storage_options")}
    from pipeline.storage_options import parse_storage_options

    cli_logging(fmt="%(asctime)s %(levelname)s %(message)s")
    if workers < 1:
        raise click.BadParameter("must be >= 1", param_hint="--workers")
    if workers == 1 and (gpus_per_worker or address or checkpoint_storage):
        raise click.UsageError("--gpus-per-worker, --address and --checkpoint-storage are for --workers > 1 (Ray "
                               "Train); one worker trains in this process (--device)")
    try:
        storage = parse_storage_options(storage_options)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--storage-option") from None
    with staged(out, storage, last=(STATE,), prefix="lavi-train-") as stage:
        if workers > 1:
            if not no_resume:
                stage.pull(names=(LOG,))  # Ray Train resumes from its own storage; the log is trimmed here
            ray_storage = checkpoint_storage or (join(out, "ray_train") if stage.remote else None)
            summary = train_on_ray(options, stage.dir, workers, gpus_per_worker, address, ray_storage)
        else:
            summary = _train_here(options, stage, no_resume, storage)
    if stage.remote:
        click.echo(f"uploaded to {out}")
    return summary


def _train_here(o: dict, stage: Staged, no_resume: bool, storage: dict | None = None) -> dict:
    """One process: resumed from `stage` (a remote out's files downloaded first), each checkpoint uploaded as it is
    written."""
    if not no_resume:
        stage.pull(skip=("ray_train",))
    outp = stage.dir
    setup = prepare(o, outp, storage_options=storage)
    start = json.loads((outp / STATE).read_text())["step"] if (outp / STATE).exists() and not no_resume else 0
    t0 = time.time()
    on_log = progress(outp / LOG, start, o["steps"], t0)
    upload = (lambda _step: stage.push(last=(STATE,))) if stage.remote else None
    last = setup.run(outp, resume=not no_resume, on_log=on_log, on_saved=upload)
    return summarise(outp, o, last, start, time.time() - t0, setup.device, setup.source.summary())
