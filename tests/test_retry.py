"""`lavi-label retry`: a run with failures, the causes fixed, then only the error rows relabelled, each once.

Real parts throughout: the shapes corpus writer, a tiny random LaVi, the session's local Ray; the failures are
a missing file (read) and a corrupt one (decode), both mended on disk before the retry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lavi.bundled import DEFAULT_MODEL
from pipeline.config import RunConfig
from pipeline.driver import run
from pipeline.output import Output
from pipeline.retry import retry
from shapes.corpus import write_corpus

pytestmark = pytest.mark.timeout(420)
Q = "how many objects are there?"


def _rows(out: Path) -> dict[str, dict]:
    return {r["row_id"]: r for r in pq.read_table(out).to_pylist()}


def test_retry_relabels_only_the_error_rows_once_in_the_files_that_held_them(ray_local, tiny_model, tmp_path):
    """Guards against a retry that relabels rows that were fine, duplicates or drops rows, leaves the rows it
    replaced, rewrites files that held no error, forgets the run's generation settings, or leaves its scratch
    behind; and against retrying an unfinished output or with another model."""
    corpus = tmp_path / "corpus"
    manifest = Path(write_corpus(str(corpus), 5, 1, seed=4).removeprefix("file://"))
    images = sorted((corpus / "images").iterdir())
    (corpus / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    entries = [json.loads(x) for x in manifest.read_text().splitlines()]
    entries += [{"uri": str(corpus / "images" / "missing.png")},
                {"uri": str(corpus / "images" / "broken.png"), "questions": ["is it broken?"]}]
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    out = tmp_path / "out"
    first = run(RunConfig(inputs=(str(manifest),), out=str(out), task="vqa", questions=(Q,), model=tiny_model,
                          max_new_tokens=5, batch_size=4, clip_seconds=1.0, rows_per_file=4, address=ray_local))
    assert first["error_stage"] == {"decode": 2, "read": 1}, first["error_stage"]
    before = _rows(out)
    files = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    shutil.copy(images[0], corpus / "images" / "missing.png")
    shutil.copy(images[1], corpus / "images" / "broken.png")

    summary = retry(str(out), ("read",), tiny_model, address=ray_local, batch_size=4)
    after = _rows(out)
    r = summary["retry"]
    assert (r["rows"], r["rows_replaced"], r["not_retried"]) == (1, 1, {"decode": 2}), r
    assert sum(r["new_rows"].values()) == 1 and "error" not in r["new_rows"], r  # ok, or truncated at 5 tokens
    assert set(after) == set(before) and len(pq.read_table(out)) == len(before)  # same rows, none twice
    fixed = [k for k, v in before.items() if v["error_stage"] == "read"]
    assert after[fixed[0]]["status"] != "error" and after[fixed[0]]["num_generated_tokens"] > 0
    assert after[fixed[0]]["job_id"] == before[fixed[0]]["job_id"]
    unchanged = {k: v for k, v in before.items() if k not in fixed}
    assert all(after[k] == v for k, v in unchanged.items())  # the decode errors too: not their stage
    rewritten = {p.name for p in out.glob("part-*.parquet") if p.read_bytes() != files.get(p.name)}
    assert set(p.name for p in out.glob("part-*.parquet")) == set(files) and len(rewritten) == 1
    assert summary["error_stage"] == {"decode": 2} and Output(str(out)).read_summary()["retries"][0]["rows"] == 1
    assert not (out / "_retry").exists() and not (out / "_tmp").exists()

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cli = [sys.executable, "-m", "jobs.cli", "retry", str(out), "--model", tiny_model, "--address", ray_local]
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "retried 2 error rows of 1 items" in done.stdout and "0 error rows left" in done.stdout, done.stdout
    final = _rows(out)
    assert set(final) == set(before) and not any(v["status"] == "error" for v in final.values())
    assert {final[k]["prompt"] for k, v in before.items() if v["error_stage"] == "decode"} == {Q, "is it broken?"}
    assert all(final[k] == after[k] for k, v in before.items() if v["status"] != "error")
    summary = Output(str(out)).read_summary()
    assert summary["rows"] == len(before) and summary["status"].get("error", 0) == 0
    assert summary["generation"]["max_new_tokens"] == 5 and len(summary["retries"]) == 2
    assert all(v["num_generated_tokens"] <= 5 for v in final.values())

    nothing = retry(str(out), model=tiny_model)  # no error rows: no pipeline, nothing rewritten
    assert nothing["retry"]["rows"] == 0 and nothing["retry"]["files_rewritten"] == 0
    with pytest.raises(ValueError, match="labelled by model"):
        retry(str(out), model=DEFAULT_MODEL)
    (out / "_summary.json").unlink()
    with pytest.raises(ValueError, match="did not finish"):
        retry(str(out), model=tiny_model)
