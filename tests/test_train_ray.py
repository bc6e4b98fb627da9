"""`lavi-label train --workers N`: data-parallel on Ray Train, on a local loopback Ray."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.train import train_model
from shapes.corpus import encode_image
from shapes.render import sample_image

# the 2-worker losses are those of 1 worker on the same global batch up to float reassociation (the gradient
# all-reduce sums in another order, the half batches pad to other lengths): 1e-4 relative after 20 AdamW steps
RTOL, ATOL = 1e-4, 1e-6


def _parquet(tmp_path, n: int = 8) -> str:
    rng = np.random.default_rng(0)
    uris, targets = [], []
    for i in range(n):
        item = sample_image(rng)
        data, ext = encode_image(item.pixels, rng)
        path = tmp_path / f"img{i}.{ext}"
        path.write_bytes(data)
        uris.append(str(path))
        targets.append(item.caption)
    pq.write_table(pa.table({"uri": uris, "prompt": ["describe the image."] * n, "target": targets}),
                   tmp_path / "train.parquet")
    return str(tmp_path / "train.parquet")


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
def test_two_workers_step_as_one_on_the_same_global_batch(ray_local, tmp_path):
    """Guards against data-parallel training that is not the same training: gradients not averaged (or summed),
    ranks reading the same rows instead of their shards, ranks starting from different weights."""
    data = _parquet(tmp_path)
    common = dict(data=data, steps=20, batch_items=4, loss_per="row", log_every=1, checkpoint_every=10, lr=2e-3,
                  warmup=2, seed=0, threads=1, device="cpu")
    one = train_model(out=str(tmp_path / "one"), **common)
    two = train_model(out=str(tmp_path / "two"), workers=2, **common)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 20 and a[-1] < a[0]
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    assert two["workers"] == 2 and two["restarts"] == [] and two["data"]["records"] == 8
    assert (tmp_path / "two" / "model.safetensors").exists()
    assert one["final"]["loss"] == pytest.approx(two["final"]["loss"], rel=RTOL)


def _registered(out) -> bool:
    """Whether Ray Train's checkpoint manager has recorded a checkpoint of the run (the one a restart resumes)."""
    for snapshot in (out / "ray_train").glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("checkpoint_results"):
                return True
        except ValueError:  # being written
            pass
    return False


def _train_workers() -> list[int]:
    """The Ray Train workers of the local Ray this test session started (Ray sets their process titles)."""
    from tests.cluster import children, cmdline

    return [pid for pid in children(os.getpid()) if "RayTrainWorker" in cmdline(pid)]


@pytest.mark.timeout(900)
def test_a_worker_killed_mid_run_restarts_from_the_last_checkpoint(ray_local, tmp_path):
    """Guards against a lost worker failing or hanging the run, losing the steps before its last checkpoint, or
    leaving the steps after it twice in the log."""
    data = _parquet(tmp_path)
    out = tmp_path / "ck"
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--out", str(out), "--data", data, "--steps", "300",
           "--batch-items", "4", "--log-every", "1", "--checkpoint-every", "20", "--threads", "1", "--device", "cpu",
           "--warmup", "2", "--workers", "2", "--address", ray_local]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        deadline = time.time() + 600  # Ray Train registers a reported checkpoint a little later: wait for that
        while time.time() < deadline and not _registered(out):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        killed = _train_workers()[-1]
        os.kill(killed, signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert len(summary["restarts"]) == 1 and summary["restarts"][0] % 20 == 0 and summary["restarts"][0] >= 20
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 301))
    assert json.loads((out / "train_state.json").read_text())["step"] == 300
    assert "restarts from its checkpoint at step" in output
