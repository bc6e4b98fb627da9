"""`lavi-label run` as a user runs it: a subprocess, its own local Ray, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).parents[1]


def test_cli_local_ray_on_loopback_and_max_error_rate(tiny_model, tmp_path):
    """Guards against the default local Ray listening beyond 127.0.0.1, a run full of error rows
    exiting 0 when --max-error-rate says it must fail, bad flags reaching Ray (usage error, exit 2), and Ray's
    native E-level line about the labeler actor's constructor arguments on the user's terminal (it belongs in the
    session's logs, where it must still be)."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    for name in ("a.png", "b.jpg", "c.mp4"):
        (corpus / name).write_bytes(b"\x00garbage")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PYTHONPATH"] = str(ROOT)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay short
    env["RAY_TMPDIR"] = str(ray_tmp)
    cmd = [sys.executable, "-m", "jobs.run", str(corpus), "--out", str(out), "--model", tiny_model,
           "--max-new-tokens", "2"]
    bad = subprocess.run(cmd + ["--top-p", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--top-p" in bad.stderr
    done = subprocess.run(cmd + ["--max-error-rate", "0.5"], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Ray: started a local cluster at 127.0.0.1:" in done.stderr
    assert "above --max-error-rate" in done.stderr and "status: error 3" in done.stdout
    assert "core_worker.cc" not in done.stderr, done.stderr[-3000:]
    driver_logs = list(ray_tmp.glob("ray/session_*/logs/python-core-driver-*.log"))
    assert any("has constructor arguments in the object store" in f.read_text() for f in driver_logs)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 3 and {r["error_stage"] for r in rows} == {"decode"}
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["error_rate_exceeded"] and summary["error_rate"] == 1.0


def test_the_bundled_model_says_what_it_knows(tmp_path):
    """Guards against a new user labelling real photos with tiny-shapes and no word that it knows only shapes-v1."""
    from click.testing import CliRunner

    from jobs.cli import main

    result = CliRunner().invoke(main, ["run", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "knows only shapes-v1" in result.output and "--model DIR" in result.output
