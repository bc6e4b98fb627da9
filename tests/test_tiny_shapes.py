"""The bundled tiny-shapes model: it loads, labels shapes-v1 in well-formed text, and its quality
against the project's targets, one test per (check, target): those it does not reach are listed in
BELOW and xfail strictly (MODEL_CARD.md has the figures)."""
from __future__ import annotations

import pytest

from jobs.evaluate import HELD_OUT_SEED, evaluate, label_manifest
from lavi.bundled import DEFAULT_MODEL
from lavi.serving.engine import Engine
from pipeline.config import RunConfig
from pipeline.driver import run
from shapes.corpus import read_manifest, write_corpus
from shapes.score import parse_caption, score_parquet

TARGETS = {"image_caption_f1": 0.95, "video_caption_f1": 0.90, "image_vqa_acc": 0.95, "video_vqa_acc": 0.95}


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


def small_object_shape_accuracy(model: str, items: int = 400, seed: int = HELD_OUT_SEED + 6) -> float:
    """Accuracy of `what shape is the {colour} object?` about each small object of a video's first frame, asked
    of that frame as an image: small objects at any offset to the patch grid (an image's sit at cell centres)."""
    import numpy as np

    from lavi.serving.steps import GenerationConfig
    from shapes import render, spec

    visuals, requests, truth = [], [], []
    for i in range(items):
        item = render.sample_video(np.random.default_rng([seed, i]), draw=[0])
        for p in item.placed:
            if p.size == "small" and sum(q.colour == p.colour for q in item.placed) == 1:
                visuals.append(item.frames[:1])
                requests.append((len(visuals) - 1, spec.q_shape_of_colour(p.colour)))
                truth.append(p.shape)
    gens = Engine.load(model, max_batch=256).generate(visuals, requests, GenerationConfig(max_new_tokens=4))
    return sum(g.text.strip() == t for g, t in zip(gens, truth)) / len(truth)


def test_bundled_model_reads_small_shapes_anywhere_in_the_frame():
    """Guards against a ViT that knows a small shape only at a cell's centre, where image objects sit: video
    objects lie anywhere (the 42 px-patch tiny-shapes, commit 432fdda, got 0.70 here, and its video captions
    suffered)."""
    assert small_object_shape_accuracy(DEFAULT_MODEL) >= 0.97


# Targets the bundled model does not reach, per check (strict xfails: a model that reaches one turns its test red
# until it leaves this list). Empty: the 21 px tiny-shapes meets every target on each of these sets (its 42 px
# predecessor missed video caption F1 on two of them; docs/tiny-shapes-42px.md).
BELOW: dict[str, set[str]] = {"held_out": set(), "independent_renderer": set(), "pipeline": set()}


def _targets(check: str) -> list:
    reason = "tiny-shapes is below this quality target (MODEL_CARD.md)"
    return [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=reason)) if k in BELOW[check] else k
            for k in TARGETS]


def _check(figures: dict, metric: str) -> None:
    assert figures[metric] >= TARGETS[metric], f"{metric} {figures[metric]:.4f} < {TARGETS[metric]} ({figures})"


def _check_misses(figures: dict) -> None:
    """On a full-size split the targets missed must be exactly those the model card's split misses."""
    missed = {k: round(figures[k], 4) for k, t in TARGETS.items() if figures[k] < t}
    assert set(missed) == BELOW["held_out"], f"missed {missed}; BELOW says {sorted(BELOW['held_out'])}"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> dict:
    """~50 held-out items written as real files and decoded by the pipeline's decoder."""
    r = evaluate(DEFAULT_MODEL, images=30, videos=20, seed=HELD_OUT_SEED + 1, frames=None,
                 workdir=str(tmp_path_factory.mktemp("held_out")))
    return r["figures"]


@pytest.mark.parametrize("metric", _targets("held_out"))
def test_bundled_model_quality_on_a_small_held_out_set(held_out, metric):
    """Guards against a bundled model (or an engine change under it) that no longer meets the model card's
    targets: the targets on ~50 held-out items of shapes.render."""
    _check(held_out, metric)


@pytest.fixture(scope="module")
def independent_renderer(tmp_path_factory) -> dict:
    r = evaluate(DEFAULT_MODEL, images=30, videos=20, seed=HELD_OUT_SEED + 5, frames=None,
                 workdir=str(tmp_path_factory.mktemp("pil")), renderer="pil")
    return r["figures"]


@pytest.mark.parametrize("metric", _targets("independent_renderer"))
def test_bundled_model_quality_on_an_independent_renderer(independent_renderer, metric):
    """Guards against a model tied to shapes.render's pixels rather than to the spec: the targets on ~50 items
    drawn by a second implementation of SHAPES.md (PIL's ImageDraw: hard edges, its own rasterisation)."""
    _check(independent_renderer, metric)


@pytest.mark.slow
def test_bundled_model_quality_on_the_full_held_out_split(tmp_path):
    """Guards against a model card whose figures the bundled model does not reproduce: the card's split
    (300 images, 150 videos), every target, as the card reports them."""
    _check_misses(evaluate(DEFAULT_MODEL, images=300, videos=150, seed=HELD_OUT_SEED, frames=None,
                           workdir=str(tmp_path))["figures"])


def _through_the_pipeline(tmp_path, images: int, videos: int, seed: int) -> dict:
    """`lavi-label run` (Ray Data, the labeler actors, the Parquet sink) with the default model, captions and
    the manifest's questions, scored from the Parquet it wrote."""
    write_corpus(str(tmp_path / "corpus"), images, videos, seed)
    manifest = str(tmp_path / "corpus" / "manifest.jsonl")
    figures = {}
    for task in ("caption", "vqa"):
        summary = run(RunConfig(inputs=(manifest,), out=str(tmp_path / task), task=task))
        assert summary["status"].get("error", 0) == 0, summary
        scored = score_parquet(str(tmp_path / task), manifest)  # the other task's figures are None here
        figures.update({k: v for k, v in scored.items() if k in TARGETS and v is not None})
    return figures


@pytest.fixture(scope="module")
def through_the_pipeline(ray_local, tmp_path_factory) -> dict:
    return _through_the_pipeline(tmp_path_factory.mktemp("pipeline"), 30, 20, HELD_OUT_SEED + 3)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("metric", _targets("pipeline"))
def test_bundled_model_quality_through_the_pipeline(through_the_pipeline, metric):
    """Guards against the pipeline losing quality the engine alone has (wrong frames, resizing, prompts or
    parsing on the way): the targets on ~50 held-out items labeled by the whole pipeline (the default model,
    as a user gets it)."""
    _check(through_the_pipeline, metric)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bundled_model_quality_through_the_pipeline_at_scale(ray_local, tmp_path):
    """Guards against a pipeline-only loss too small to show on 50 items: on 300 images and 150 videos the
    targets missed are those of the model card's split."""
    _check_misses(_through_the_pipeline(tmp_path, 300, 150, HELD_OUT_SEED + 4))


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
    assert (tmp_path / "captions" / "_report.html").exists() and (tmp_path / "answers" / "_report.html").exists()
