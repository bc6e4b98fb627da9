"""`lavi-label demo`: the main job end to end on a generated sample corpus with the bundled model.

Writes a small shapes-v1 corpus (images and videos, as files with a manifest), captions it and asks
every item its manifest questions through `lavi-label run`'s pipeline, then prints the run summary,
writes each output's `_report.html` and prints the scores against the corpus's truth.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from jobs.console import cli_logging

from pipeline.config import RunConfig
from pipeline.driver import run as run_pipeline
from pipeline.summary import format_summary
from schemas.rows import CAPTION, VQA


@click.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Where the corpus and the labels go.")
@click.option("--images", default=40, show_default=True)
@click.option("--videos", default=10, show_default=True)
@click.option("--seed", default=7, show_default=True)
@click.option("--model", default=None, help="Checkpoint directory (default: the bundled tiny-shapes).")
def demo_cmd(out: str, images: int, videos: int, seed: int, model: str | None) -> None:
    """Generate a sample corpus, label it (captions + VQA) with the bundled model, print summary and scores."""
    from pipeline.report import write_report
    from shapes.corpus import write_corpus
    from shapes.score import score_parquet

    cli_logging()
    root = Path(out).resolve()
    corpus = root / "corpus"
    manifest = corpus / "manifest.jsonl"
    if not manifest.exists():
        click.echo(f"writing a sample shapes-v1 corpus: {images} images, {videos} videos -> {corpus}")
        write_corpus(str(corpus), images, videos, seed)
    scores = {}
    for task, labels in ((CAPTION, root / "captions"), (VQA, root / "answers")):
        click.echo(f"\n== lavi-label run {manifest} --task {task} --out {labels}")
        summary = run_pipeline(RunConfig(inputs=(str(manifest),), out=str(labels), task=task, model=model))
        click.echo(format_summary(summary))
        click.echo(f"report: {write_report(str(labels))}")
        scores[task] = score_parquet(str(labels), str(manifest))
    click.echo("\n== scores against the corpus truth (shared/SHAPES.md scoring)")
    for task, s in scores.items():
        keys = ("image_caption_f1", "video_caption_f1", "image_caption_exact", "video_caption_exact") \
            if task == CAPTION else ("image_vqa_acc", "video_vqa_acc")
        click.echo(f"{task}: " + ", ".join(f"{k} {s[k]:.3f}" for k in keys if s.get(k) is not None))
    (root / "scores.json").write_text(json.dumps(scores, indent=2))
    click.echo(f"\nlabels in {root}/captions and {root}/answers (Parquet); scores in {root}/scores.json")
