"""`lavi-label plan`: the corpus counted, a sample labelled, and a forecast that a real run then checks."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import main
from pipeline.config import RunConfig
from pipeline.driver import run
from pipeline.plan import count
from shapes.corpus import write_corpus

pytestmark = pytest.mark.timeout(420)
Q = "how many objects are there?"


def test_plan_forecasts_what_the_run_then_does(ray_local, tiny_model, tmp_path):
    """Guards against a forecast that miscounts the corpus, forgets that videos become clips, ignores per-item
    questions, or leaves labels behind; the run that follows must write the rows it forecast."""
    manifest = Path(write_corpus(str(tmp_path / "corpus"), 18, 4, seed=2).removeprefix("file://"))
    with manifest.open("a") as f:
        f.write(json.dumps({"uri": str(tmp_path / "corpus" / "images" / "gone.png")}) + "\n")
    options = dict(task="vqa", questions=(Q,), model=tiny_model, max_new_tokens=4, clip_seconds=1.0,
                   address=ray_local)
    config = RunConfig(inputs=(str(manifest),), out="(plan)", **options)
    corpus, picked = count(config, 6, seed=0)
    assert sum(corpus.items.values()) == 23 and corpus.items["video"] == 4
    assert {e["uri"] for e in picked} == {e["uri"] for e in count(config, 6, seed=0)[1]}  # seeded: the same
    assert any(e["uri"].endswith(".mp4") for e in picked) and len(picked) == 6  # videos sampled too

    args = ["plan", str(manifest), "--sample", "6", "--json", str(tmp_path / "plan.json"), "--task", "vqa",
            "--question", Q, "--model", tiny_model, "--max-new-tokens", "4", "--clip-seconds", "1",
            "--address", ray_local]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "corpus: 23 items (19 images, 4 videos)" in result.output and "forecast on this cluster" in result.output
    figures = json.loads((tmp_path / "plan.json").read_text())
    assert figures["sample"]["items"] == 6 and figures["sample"]["clips_per_video"] > 1

    summary = run(RunConfig(inputs=(str(manifest),), out=str(tmp_path / "out"), **options))
    assert figures["forecast"]["rows"] == summary["rows"] == pq.read_table(tmp_path / "out").num_rows
    assert figures["forecast"]["clips"] == summary["clips"]
    assert figures["forecast"]["generated_tokens"] <= 4 * summary["rows"] and figures["forecast"]["wall_s"] > 0
    assert figures["forecast"]["gpu_hours"] == 0  # CPU labelers
