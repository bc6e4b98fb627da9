"""A Qwen2.5-VL and a Qwen3-VL through the whole pipeline, as `lavi-label run DIR --model QWEN_DIR` labels a folder:
the driver reads the checkpoint's dynamic-resolution contract, the decode workers resize each image to its own size,
the labeler's engine computes the processors' pixels, and the Parquet's captions are transformers' own greedy texts
(Qwen2VLImageProcessorPil on the same files, the chat template, generate()). Tiny random checkpoints written by
`save_pretrained` (tests/qwenvl_fixture.py), the session's local Ray, CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import media
from qwenvl_fixture import make_qwenvl, reference_text, transformers

from pipeline.config import RunConfig
from pipeline.driver import run

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
PROMPT = "describe the image."
NEW = 8
# (width, height): square, wide, tall, a photo's 4:3, a banner; PNG and JPEG
IMAGES = {"square.png": (64, 64), "wide.jpg": (200, 50), "tall.png": (33, 200), "photo.jpg": (500, 375),
          "banner.png": (1024, 200)}
KINDS = ("qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {k: make_qwenvl(tmp_path_factory.mktemp(k) / "tiny", k, seed=3) for k in KINDS}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Images of many sizes and aspect ratios and a 12 s video (cut into 4 s clips)."""
    root = tmp_path_factory.mktemp("corpus")
    for i, (name, (w, h)) in enumerate(IMAGES.items()):
        data = media.jpeg(w, h, seed=i) if name.endswith(".jpg") else media.png(w, h, seed=i)
        (root / name).write_bytes(data)
    media.mp4(root / "clip.mp4", seconds=12, fps=2, size=48, height=32)
    return root


def _reference_text(d: Path, hf, path: Path) -> str:
    return reference_text(d, hf, path, PROMPT, NEW)


@pytest.mark.parametrize("kind", KINDS)
def test_captions_equal_transformers_and_a_video_gives_its_rows(ray_local, checkpoints, corpus, kind, tmp_path):
    """Guards against the joins between the driver, the decode workers and the engine: a square resize where the
    processor keeps each image's own size and aspect ratio, a size off by one factor or another filter, the engine's
    pixels by another processor's arithmetic, the chat template or the expanded prompt other than the processor's:
    any of them changes the greedy text of a random model. A video's clips each give a row with its frames' times."""
    d = checkpoints[kind]
    out = tmp_path / "out"
    summary = run(RunConfig(inputs=(str(corpus),), out=str(out), model=str(d), prompt=PROMPT, max_new_tokens=NEW,
                            batch_size=4, clip_seconds=4.0, frames=4, address=ray_local))
    rows = pq.read_table(out).to_pylist()
    images = {Path(r["uri"]).name: r for r in rows if r["media_type"] == "image"}
    videos = sorted((r for r in rows if r["media_type"] == "video"), key=lambda r: r["clip_index"])
    assert summary["status"].get("error", 0) == 0, [r["error"] for r in rows if r["error"]]
    assert set(images) == set(IMAGES) and [r["clip_index"] for r in videos] == [0, 1, 2]
    assert all(r["status"] in ("ok", "truncated") and r["text"] for r in rows)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
    for name, row in images.items():
        assert (row["width"], row["height"]) == IMAGES[name]
        assert row["text"] == _reference_text(d, hf, corpus / name), name
    assert len({r["text"] for r in images.values()}) > 1  # the images matter
    for r in videos:
        times = r["frame_timestamps_s"]
        assert len(times) == 4 and r["clip_start_s"] <= times[0] < times[-1] <= r["clip_end_s"]


def test_vqa_with_choices_and_with_a_json_schema(ray_local, checkpoints, corpus, tmp_path):
    """Guards against constrained decoding that does not meet a Qwen-VL's vocabulary and prompts (a choice masked
    over the wrong vocabulary size, a JSON grammar on the wrong tokens): every answer is one of the choices, or JSON
    valid under the schema; then `lavi-label report` on the run's output."""
    from pipeline.output import REPORT_NAME
    from pipeline.report import write_report

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    options = dict(inputs=(str(corpus),), task="vqa", questions=("is there a square?",), max_new_tokens=24,
                   batch_size=4, clip_seconds=6.0, frames=2, address=ray_local)
    chosen = tmp_path / "choices"
    run(RunConfig(out=str(chosen), model=str(checkpoints["qwen3_vl"]), choices=("yes", "no"), **options))
    rows = pq.read_table(chosen).to_pylist()
    assert len(rows) == len(IMAGES) + 2 and {r["text"] for r in rows} <= {"yes", "no"}
    assert {r["status"] for r in rows} == {"ok"}
    shaped = tmp_path / "json"
    run(RunConfig(out=str(shaped), model=str(checkpoints["qwen2_5_vl"]), json_schema=json.dumps(schema), **options))
    rows = pq.read_table(shaped).to_pylist()
    assert len(rows) == len(IMAGES) + 2 and {r["status"] for r in rows} <= {"ok", "truncated"}
    answers = [json.loads(r["text"]) for r in rows if r["status"] == "ok"]
    assert answers and all(set(a) == {"answer"} and a["answer"] in ("yes", "no") for a in answers)
    uri = write_report(str(shaped), sample=8)
    page = (shaped / REPORT_NAME).read_text()
    assert uri.endswith(REPORT_NAME) and "photo.jpg" in page and "clip.mp4" in page


def test_plan_labels_a_sample_with_a_qwen_vl(ray_local, checkpoints, corpus, tmp_path):
    """Guards against `lavi-label plan` (the corpus counted, a sample labelled through the pipeline, a forecast)
    failing on a dynamic-resolution model, e.g. sizing its sample's frames without the checkpoint's contract."""
    from click.testing import CliRunner

    from jobs.cli import main

    args = ["plan", str(corpus), "--sample", "3", "--json", str(tmp_path / "plan.json"), "--model",
            str(checkpoints["qwen3_vl"]), "--max-new-tokens", "4", "--clip-seconds", "6", "--address", ray_local]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "plan.json").read_text())
    assert "corpus: 6 items" in result.output and figures["sample"]["items"] == 3
    assert figures["forecast"]["rows"] >= len(IMAGES)  # one row per image, and the video's clips as sampled


def test_retry_relabels_an_error_row_at_its_own_size(ray_local, checkpoints, tmp_path):
    """Guards against `lavi-label retry` on a Qwen-VL's output sizing the retried image without the checkpoint's
    dynamic-resolution contract (a square frame, another factor) or with other generation settings: the mended
    file's row is relabelled once, at its own size, with transformers' own greedy caption."""
    from pipeline.retry import retry

    d = checkpoints["qwen2_5_vl"]
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "fine.png").write_bytes(media.png(64, 64, seed=0))
    (root / "mended.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "out"
    first = run(RunConfig(inputs=(str(root),), out=str(out), model=str(d), prompt=PROMPT, max_new_tokens=NEW,
                          batch_size=4, address=ray_local))
    assert first["error_stage"] == {"decode": 1}, first["error_stage"]
    before = {Path(r["uri"]).name: r for r in pq.read_table(out).to_pylist()}
    (root / "mended.jpg").write_bytes(media.jpeg(200, 50, seed=1))
    summary = retry(str(out), ("decode",), str(d), address=ray_local, batch_size=4)
    rows = {Path(r["uri"]).name: r for r in pq.read_table(out).to_pylist()}
    assert summary["retry"]["rows"] == 1 and len(rows) == 2 and rows["fine.png"] == before["fine.png"]
    mended = rows["mended.jpg"]
    assert mended["status"] in ("ok", "truncated") and (mended["width"], mended["height"]) == (200, 50)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
    assert mended["text"] == _reference_text(d, hf, root / "mended.jpg")


def test_run_with_fastv_and_dct_refused_before_listing(ray_local, checkpoints, corpus, tmp_path):
    """Guards against `--visual-compress` on a Qwen-VL reaching the labeler unchecked: fastv labels every item and
    is kept in the output's settings; dct is refused by the driver, naming what the model takes, before a row is
    written."""
    from schemas.rows import read_metadata

    d = str(checkpoints["qwen3_vl"])
    options = dict(inputs=(str(corpus),), model=d, prompt=PROMPT, max_new_tokens=4, batch_size=4, clip_seconds=6.0,
                   frames=2, address=ray_local)
    with pytest.raises(ValueError, match=r"takes fastv:KEEP\[@LAYER\] only"):
        run(RunConfig(out=str(tmp_path / "dct"), visual_compress="dct:0.25", **options))
    assert not list((tmp_path / "dct").glob("part-*.parquet"))
    out = tmp_path / "fastv"
    summary = run(RunConfig(out=str(out), visual_compress="fastv:0.5@0", **options))
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len(IMAGES) + 2 and summary["status"].get("error", 0) == 0
    meta = read_metadata(pq.read_schema(next(out.glob("part-*.parquet"))).metadata)
    assert meta["generation"]["visual_compress"] == "fastv:0.5@0"
