"""`lavi-label eval`: score checkpoints on a held-out shapes-v1 split, and write the figures.

The split is written as real files (PNG/JPEG/MP4, shapes.corpus) with a seed the training never
uses, decoded by the labeling pipeline's own decoder, labelled by the engine (the caption and every
question of each item) and scored as SHAPES.md says. Several models are scored on the same split.
"""
from __future__ import annotations

import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

from typing import TYPE_CHECKING

import click

from jobs.outdir import read_json, write_text

if TYPE_CHECKING:  # torch, the engine and the decoders load when a command runs, not when the CLI starts
    from lavi.serving.engine import Engine
    from lavi.serving.steps import GenerationConfig

HELD_OUT_SEED = 1_000_003  # training draws from seeds 0..; this split is disjoint by construction
CARD_BEGIN, CARD_END = "<!-- eval:begin -->", "<!-- eval:end -->"
RENDERERS = ("shapes", "pil")  # this repository's renderer (shapes.render), and an independent one (shapes.pil)
RENDERER_TEXT = {"shapes": "drawn by this repository's renderer (shapes.render, which training also uses)",
                 "pil": "drawn by an independent implementation of SHAPES.md (shapes.pil: PIL ImageDraw, hard "
                        "edges, its own sampling code)"}


def label_manifest(engine: "Engine", entries: list[dict], frames: int, batch: int = 64,
                   gen: "GenerationConfig | None" = None) -> list[dict]:
    """LABEL_SCHEMA rows (as dicts) for every manifest entry: its caption (the model's default prompt for its media
    type) and all its questions, through the pipeline's own stages: items built as the listing builds them, decoded
    by `decode_batch` (in this process: the split is our own files) and labelled by the labeler actor's code.
    A read or decode failure is an error row, scored as wrong."""
    import dataclasses

    import pyarrow as pa

    from schemas.manifest import ITEM_SCHEMA, make_item
    from schemas.rows import CAPTION, VQA
    from workers.decode import DecodeSettings
    from workers.labeler import Labeler
    from workers.units import decode_batch

    generation = dataclasses.asdict(gen) if gen is not None else {"max_new_tokens": 48}
    labeler = Labeler.from_engine(engine, job_id="eval", generation=generation)
    settings = DecodeSettings(image_size=engine.image_size, frames_per_clip=frames, isolate=False,
                              pinpoints=engine.pinpoints, dynamic=engine.dynamic)
    rows: list[dict] = []
    for start in range(0, len(entries), batch):
        items = [make_item(e["uri"], [{"task": CAPTION, "prompt": None}] +
                           [{"task": VQA, "prompt": q} for q in e["questions"]], e["media_type"])
                 for e in entries[start:start + batch]]
        rows += labeler(decode_batch(pa.Table.from_pylist(items, schema=ITEM_SCHEMA), settings)).to_pylist()
    return rows


def write_split(workdir: str, images: int, videos: int, seed: int, renderer: str = "shapes") -> str:
    """The held-out split's files and manifest.jsonl in `workdir` (once), drawn by `renderer`."""
    from shapes import pil
    from shapes.corpus import write_corpus

    if renderer not in RENDERERS:
        raise ValueError(f"renderer must be one of {RENDERERS}, got {renderer!r}")
    manifest = f"{workdir}/manifest.jsonl"
    if not Path(manifest).exists():
        (pil.write if renderer == "pil" else write_corpus)(workdir, images, videos, seed)
    return manifest


def evaluate(model: str, images: int, videos: int, seed: int, frames: int | None, workdir: str,
             device: str = "cpu", renderer: str = "shapes", quantize: str | None = None,
             visual_compress: str | None = None) -> dict:
    from lavi.serving.engine import Engine
    from shapes.corpus import read_manifest
    from shapes.score import score_rows

    manifest = write_split(workdir, images, videos, seed, renderer)
    entries = read_manifest(manifest)
    engine = Engine.load(model, device=device, max_batch=256, quantize=quantize, visual_compress=visual_compress)
    t0 = time.time()
    rows = label_manifest(engine, entries, frames or engine.default_frames)
    figures = score_rows(rows, {e["uri"]: e for e in entries})
    summary = Path(model) / "train_summary.json"
    return {"model": engine.name, "path": model, "fusion": engine.config.fusion, "renderer": renderer,
            "quantize": quantize, "visual_compress": visual_compress,
            "figures": figures,
            "label_wall_s": time.time() - t0, "rows": len(rows),
            "training": json.loads(summary.read_text()) if summary.exists() else None}


def card_section(results: list[dict], split: dict, command: str) -> str:
    """The model card's figures: one table per renderer, the models side by side, then each training record."""
    import torch

    keys = [("image_caption_f1", "image caption object F1", 0.95), ("video_caption_f1", "video caption object F1", 0.90),
            ("image_vqa_acc", "image VQA accuracy", 0.95), ("video_vqa_acc", "video VQA accuracy", 0.95),
            ("image_caption_exact", "image caption exact match", None),
            ("video_caption_exact", "video caption exact match", None)]
    lines = [CARD_BEGIN, f"Held-out shapes-v1: {split['images']} images, {split['videos']} videos, seed {split['seed']} "
             f"(written as PNG/JPEG/MP4 files and decoded by the pipeline's decoder), {split['frames']} frames per video.",
             f"Written by: `{command}` on {split['device']}, torch {torch.__version__}, {split['when']}."]
    renderers = list(dict.fromkeys(r.get("renderer", "shapes") for r in results))
    for renderer in renderers:
        rs = [r for r in results if r.get("renderer", "shapes") == renderer]
        lines += ["", f"Split {RENDERER_TEXT.get(renderer, renderer)}:", "",
                  "| figure | target | " + " | ".join(f"{r['model']} ({variant(r)})" for r in rs) + " |",
                  "|" + " --- |" * (2 + len(rs))]
        for key, label, target in keys:
            cells = " | ".join("n/a" if r["figures"].get(key) is None else f"{r['figures'][key]:.4f}" for r in rs)
            lines.append(f"| {label} | {'>= ' + str(target) if target else ''} | {cells} |")
        lines.append(f"| rows labelled per second ({split['device']}, eval loop) | | " +
                     " | ".join(f"{r['rows'] / r['label_wall_s']:.1f}" for r in rs) + " |")
    seen = set()
    for r in results:
        t = r.get("training")
        if t and r["path"] not in seen:
            seen.add(r["path"])
            resumed = f", resumed at step {t['resumed_from']}" if t.get("resumed_from") else ""
            lines.append(f"\n{r['model']}: trained {t['steps']} steps in {t['wall_s'] / 60:.1f} min on {t['device']} "
                         f"({t.get('threads', '?')} threads{resumed}), final training loss {t['final']['loss']:.4f} "
                         f"(from its train_summary.json).")
    lines.append(CARD_END)
    return "\n".join(lines)


def variant(r: dict) -> str:
    """A result's column name: its fusion, and any int8 or visual compression it was scored with."""
    return ", ".join(x for x in (r["fusion"], r.get("quantize"), r.get("visual_compress")) if x)


def write_card(card: Path, section: str, begin: str = CARD_BEGIN, end: str = CARD_END) -> None:
    """Replace the card's section between the `begin` and `end` markers (appended where the card has none)."""
    text = card.read_text() if card.exists() else f"{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    card.write_text(pattern.sub(lambda _: section, text))


def merge_included(earlier: list[dict], results: list[dict], command: str) -> tuple[list[dict], str]:
    """Earlier results (--include) before these: an include that itself included another brings that one's results
    and command along, so a result met twice (the same record) is kept once, and each command once, in order. A
    model scored again (the same checkpoint, renderer, quantization and compression) keeps this run's result only."""
    def scored(r: dict) -> tuple:
        return r.get("path", r["model"]), r["renderer"], r.get("quantize"), r.get("visual_compress")

    again = {scored(r) for r in results}
    kept = {json.dumps(r, sort_keys=True): r for doc in earlier for r in doc["results"] if scored(r) not in again}
    commands = [part for doc in earlier for part in doc["command"].split("; ")] + [command]
    return list(kept.values()) + results, "; ".join(dict.fromkeys(commands))


@click.command("eval")
@click.option("--model", "models", multiple=True, help="Checkpoint directory (repeatable). Default: the bundled model.")
@click.option("--images", type=int, default=300, show_default=True)
@click.option("--videos", type=int, default=150, show_default=True)
@click.option("--seed", type=int, default=HELD_OUT_SEED, show_default=True, help="Split seed (not a training seed).")
@click.option("--frames", type=int, default=None, help="Frames per video (default: the model's).")
@click.option("--out", help="Write the figures as JSON here: a file path or an object-storage URI (s3://, gs://).")
@click.option("--card", type=click.Path(dir_okay=False), help="Replace the figures section of this model card.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N; auto: cuda when available.")
@click.option("--include", "includes", multiple=True,
              help="Results written by an earlier `lavi-label eval --out` on the same split (a path or URI), shown "
                   "beside these (repeatable): a model need not be scored twice.")
@click.option("--renderer", "renderers", multiple=True, type=click.Choice(RENDERERS),
              help="Who draws the split (repeatable; default: both): shapes (this repository's renderer) or pil "
                   "(an independent implementation of SHAPES.md).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also score each model with its decoder's linear layers as weight-only int8, beside it.")
@click.option("--visual-compress", "compressions", multiple=True, metavar="dct:KEEP|fastv:KEEP[@LAYER]",
              help="Also score each concat model (LLaVA-OneVision, concat LaVi) with this visual token compression, "
                   "beside it (repeatable; see `run --visual-compress`).")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for a remote --out or --include, as for `run` (repeatable).")
def eval_cmd(models: tuple[str, ...], images: int, videos: int, seed: int, frames: int | None, out: str | None,
             card: str | None, device: str, includes: tuple[str, ...], renderers: tuple[str, ...],
             quantize: str | None, compressions: tuple[str, ...], storage_options: tuple[str, ...]) -> None:
    """Score checkpoints on held-out shapes-v1 (object F1, exact match, VQA accuracy)."""
    import torch

    from lavi.bundled import DEFAULT_MODEL

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    models = models or (DEFAULT_MODEL,)
    split = {"images": images, "videos": videos, "seed": seed, "device": device,
             "frames": frames or "model default", "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    storage = _storage(storage_options)
    earlier = [_included(f, storage) for f in includes]
    for doc, f in zip(earlier, includes):
        same = {k: doc["split"].get(k) for k in ("images", "videos", "seed", "frames")}
        if same != {k: split[k] for k in same}:
            raise click.UsageError(f"--include {f} was scored on another split ({same}); this one is "
                                   f"{ {k: split[k] for k in same} }")
    from lavi.visual_tokens.methods import VisualCompress
    from pipeline.models import model_info

    try:
        compressions = tuple(VisualCompress.parse(c).spelled() for c in compressions)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    runs = []
    for m in models:
        concat = model_info(m)["vision_in_context"]
        runs += [(m, None, None)] + ([(m, quantize, None)] if quantize else [])
        runs += [(m, None, c) for c in compressions if concat]
    results = []
    for renderer in renderers or RENDERERS:
        with tempfile.TemporaryDirectory(prefix="lavi-eval-") as tmp:
            click.echo(f"writing the held-out split ({images} images, {videos} videos, seed {seed}, "
                       f"renderer {renderer}) ...")
            for m, q, c in runs:
                r = evaluate(m, images, videos, seed, frames, tmp, device, renderer, q, c)
                results.append(r)
                f = r["figures"]
                click.echo(f"[{renderer}] {r['model']} ({variant(r)}): " + ", ".join(
                    f"{k} {f[k]:.4f}" for k in ("image_caption_f1", "video_caption_f1", "image_vqa_acc",
                                                "video_vqa_acc", "image_caption_exact", "video_caption_exact")
                    if f.get(k) is not None) + f"  [{r['rows']} rows in {r['label_wall_s']:.1f} s]")
    command = "lavi-label " + " ".join(sys.argv[1:])
    if earlier:
        results, command = merge_included(earlier, results, command)
    if out:
        write_text(out, json.dumps({"split": split, "results": results, "command": command,
                                    "torch": torch.__version__, "python": platform.python_version()}, indent=2),
                   storage)
    if card:
        write_card(Path(card), card_section(results, split, command))
        click.echo(f"figures written to {card}")


def _storage(pairs: tuple[str, ...]) -> dict:
    """--storage-option pairs as fsspec options (a malformed one is a usage error)."""
    from pipeline.storage_options import parse_storage_options

    try:
        return parse_storage_options(pairs)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--storage-option") from None


def _included(uri: str, storage: dict) -> dict:
    """An earlier `eval --out` document (--include), local or remote."""
    doc = read_json(uri, storage)
    if doc is None:
        raise click.BadParameter(f"{uri!r} does not exist", param_hint="--include")
    return doc
