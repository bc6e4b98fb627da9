"""The bundled tiny-shapes model: it loads, labels shapes-v1 in well-formed text, and its quality
against the project's targets (not reached yet: see MODEL_CARD.md; the xfail is strict, so a model
that reaches them turns these tests red until the marker goes)."""
from __future__ import annotations

import pytest

from jobs.evaluate import HELD_OUT_SEED, evaluate, label_manifest
from lavi.engine import DEFAULT_MODEL, Engine
from pipeline.config import RunConfig
from pipeline.graph import run
from shapes.corpus import read_manifest, write_corpus
from shapes.score import parse_caption, score_parquet

TARGETS = {"image_caption_f1": 0.95, "video_caption_f1": 0.90, "image_vqa_acc": 0.95, "video_vqa_acc": 0.95}
BELOW_TARGETS = pytest.mark.xfail(strict=True, reason="tiny-shapes is below its quality targets (MODEL_CARD.md)")


def test_bundled_model_loads():
    """Guards against a bundled checkpoint missing from the package or out of step with the loader."""
    engine = Engine.load(DEFAULT_MODEL)
    assert engine.name == "tiny-shapes" and engine.config.fusion == "viln"
    assert engine.image_size == 128 and engine.default_prompt("video") == "describe the video."


def test_bundled_model_writes_well_formed_labels(tmp_path):
    """Guards against a broken tokenizer, prompt template or decode path: through the pipeline's decoder,
    every caption must parse as shapes-v1 objects and every answer must be a shapes-v1 answer word."""
    write_corpus(str(tmp_path), 12, 6, HELD_OUT_SEED + 2)
    entries = read_manifest(f"{tmp_path}/manifest.jsonl")
    rows = label_manifest(Engine.load(DEFAULT_MODEL), entries, frames=4)
    answers = {a for e in entries for a in e["answers"]} | {"zero", "one", "two", "three", "yes", "no"}
    kinds = {e["uri"]: e["media_type"] for e in entries}
    for r in rows:
        assert r["status"] == "ok", r
        if r["task"] == "caption":
            assert parse_caption(r["text"], kinds[r["uri"]]) and r["text"].endswith("."), r
        else:
            assert r["text"] in answers | {"red", "green", "blue", "yellow", "circle", "square", "triangle",
                                           "left", "right", "up", "down", "still", "small", "large", "top",
                                           "bottom", "center", "top left", "top right", "bottom left",
                                           "bottom right"}, r


def _check(figures: dict) -> None:
    short = {k: round(figures[k], 4) for k in TARGETS}
    assert all(figures[k] >= t for k, t in TARGETS.items()), f"below target: {short} vs {TARGETS}"


@BELOW_TARGETS
def test_bundled_model_quality_on_a_small_held_out_set(tmp_path):
    """The targets on ~50 held-out items written as real files and decoded by the pipeline's decoder."""
    r = evaluate(DEFAULT_MODEL, images=30, videos=20, seed=HELD_OUT_SEED + 1, frames=None, workdir=str(tmp_path))
    _check(r["figures"])


@BELOW_TARGETS
def test_bundled_model_quality_on_an_independent_renderer(tmp_path):
    """Guards against a model tied to shapes.render's pixels rather than to the spec: the targets on ~50 items
    drawn by a second implementation of SHAPES.md (PIL's ImageDraw: hard edges, its own rasterisation)."""
    import alt_shapes

    from shapes.score import score_rows

    entries = read_manifest(alt_shapes.write(tmp_path, 30, 20, HELD_OUT_SEED + 5))
    engine = Engine.load(DEFAULT_MODEL)
    rows = label_manifest(engine, entries, frames=engine.default_frames)
    _check(score_rows(rows, {e["uri"]: e for e in entries}))


@pytest.mark.slow
@BELOW_TARGETS
def test_bundled_model_quality_on_the_full_held_out_split(tmp_path):
    """The model card's split (300 images, 150 videos)."""
    r = evaluate(DEFAULT_MODEL, images=300, videos=150, seed=HELD_OUT_SEED, frames=None, workdir=str(tmp_path))
    _check(r["figures"])


def _through_the_pipeline(tmp_path, images: int, videos: int, seed: int) -> dict:
    """`lavi-label run` (Ray Data, the labeler actors, the Parquet sink) with the default model, captions and
    the manifest's questions, scored from the Parquet it wrote."""
    write_corpus(str(tmp_path / "corpus"), images, videos, seed)
    manifest = str(tmp_path / "corpus" / "manifest.jsonl")
    figures = {}
    for task in ("caption", "vqa"):
        summary = run(RunConfig(inputs=(manifest,), out=str(tmp_path / task), task=task))
        assert summary["status"].get("error", 0) == 0, summary
        figures.update({k: v for k, v in score_parquet(str(tmp_path / task), manifest).items() if k in TARGETS})
    return figures


@BELOW_TARGETS
@pytest.mark.timeout(600)
def test_bundled_model_quality_through_the_pipeline(ray_local, tmp_path):
    """The targets on ~50 held-out items labeled by the whole pipeline (the default model, as a user gets it)."""
    _check(_through_the_pipeline(tmp_path, 30, 20, HELD_OUT_SEED + 3))


@pytest.mark.slow
@BELOW_TARGETS
@pytest.mark.timeout(1800)
def test_bundled_model_quality_through_the_pipeline_at_scale(ray_local, tmp_path):
    """The same on 300 images and 150 videos."""
    _check(_through_the_pipeline(tmp_path, 300, 150, HELD_OUT_SEED + 4))


@pytest.mark.timeout(600)
def test_demo_labels_a_sample_corpus_and_scores_it(ray_local, tmp_path):
    """Guards against `make demo` (the README's first command) breaking: corpus, both runs, scores."""
    import json

    from click.testing import CliRunner

    from jobs.demo import demo_cmd

    result = CliRunner().invoke(demo_cmd, ["--out", str(tmp_path), "--images", "4", "--videos", "2"])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["caption"]["counts"]["image_caption"] == 4 and scores["caption"]["counts"]["video_caption"] == 2
    assert scores["vqa"]["n_missing"] == 0 and scores["vqa"]["counts"]["n_errors"] == 0
    assert "image_caption_f1" in result.output and (tmp_path / "captions" / "_summary.json").exists()
