"""Soak: 5,000 items (1% hostile) on a two-node cluster while labeler actors and a worker node are killed.

Kills come at random moments of the job's progress (seeded): after the k-th committed part file, for k drawn
from the run's ~10 files, three labeler actors (SIGKILL to the process) and the worker node (its whole process
tree). The driver's resident memory is sampled all along. The figures go to docs/soak-node-loss.json.
Marked slow (tens of minutes on two cores): `pytest -m slow tests/test_soak.py`.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster import loopback_hostname, start_cluster
from test_cluster import QUESTIONS, job_id_of, lavi, parts, submit, status_of

pytestmark = [pytest.mark.slow, pytest.mark.ray_cluster]

ITEMS, HOSTILE_EVERY, ROWS_PER_FILE = 5000, 100, 1000
DOCS = Path(__file__).parents[1] / "docs" / "soak-node-loss.json"


def corpus(root: Path) -> tuple[str, set[str]]:
    """ITEMS files: shapes-v1 images and, one in HOSTILE_EVERY, a hostile file (tests/media.py's bad images, by
    turns); returns (the directory, the hostile files' names)."""
    import media
    from shapes.corpus import write_corpus

    hostile = [(n, data) for n, (data, _) in media.bad_images().items() if n.rsplit(".", 1)[1] in ("jpg", "png")]
    bad = ITEMS // HOSTILE_EVERY
    write_corpus(str(root), ITEMS - bad, 0, seed=3)
    names = set()
    for i in range(bad):
        name, data = hostile[i % len(hostile)]
        names.add(f"bad-{i:03d}-{name}")
        media.write(root / "images" / "bad" / f"bad-{i:03d}-{name}", data)
    return str(root / "images"), names


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@pytest.mark.timeout(2700)
def test_soak_kills_at_random_moments_every_row_once(tiny_model, tmp_path):
    """Guards against rows lost or duplicated, a job that fails or hangs, and a driver whose memory grows with the
    corpus, over a long job with hostile inputs while three labeler actors and a worker node die under it."""
    if loopback_hostname() is None:
        pytest.skip("the hostname does not resolve to 127.0.0.1: no second node on this machine")
    inputs, hostile = corpus(tmp_path / "corpus")
    rng = random.Random(17)
    # after the k-th part file, k from 1 to 7: a file holds at least ROWS_PER_FILE rows, so ~9 come before the end
    moments = rng.sample(range(1, ITEMS * len(QUESTIONS) // ROWS_PER_FILE - 2), 4)
    kills = {m: ("actor" if i < 3 else "node") for i, m in enumerate(moments)}
    cluster = start_cluster(secrets.token_hex(16), head_cpus=2)
    try:
        node = cluster.add_worker(num_cpus=1)
        out = tmp_path / "out"
        start = time.monotonic()
        job = job_id_of(submit(cluster, inputs, out, tiny_model, "--workers", "2", "--rows-per-file",
                               str(ROWS_PER_FILE), "--max-rebuilds", "10", "--batch-size", "16"))
        samples, done, status = [], [], None
        while status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert time.monotonic() - start < 2400, f"the soak did not end in 40 min ({len(parts(out))} files)"
            committed = len(parts(out))
            for moment in sorted(m for m in kills if m <= committed and m not in {d[0] for d in done}):
                if kills[moment] == "node" and node in cluster.workers:
                    cluster.kill_node(node)
                elif kills[moment] == "actor":
                    actors = cluster.find("Labeler")
                    if not actors:
                        continue  # none up right now (a restart): at the next poll
                    os.kill(rng.choice(actors), signal.SIGKILL)
                done.append((moment, kills[moment], round(time.monotonic() - start, 1)))
            drivers = cluster.find("jobs.cli run", cluster.head)
            rss = [r for r in map(rss_mb, drivers) if r is not None]
            if rss:
                samples.append((committed * ROWS_PER_FILE // len(QUESTIONS), max(rss)))
            time.sleep(2)
            status = status_of(cluster, job)
        wall = time.monotonic() - start
        assert status == "SUCCEEDED", lavi(cluster, "logs", job).stdout[-3000:]
    finally:
        cluster.stop()
    rows = pq.read_table(str(out)).to_pylist()
    assert len(rows) == len({r["row_id"] for r in rows}) == ITEMS * len(QUESTIONS), "a row lost or duplicated"
    for r in rows:
        bad = r["uri"].rsplit("/", 1)[1] in hostile
        assert (r["status"] == "error") == bad, r
    summary = json.loads((out / "_summary.json").read_text())
    labelling = [s for s in samples if s[0] > 0] or samples  # from the first commit on: the model is loaded
    (first_items, first_rss), (last_items, last_rss) = labelling[0], labelling[-1]
    peak = max(r for _, r in samples)
    growth = (last_rss - first_rss) / max(last_items - first_items, 1) * 1000
    record = {"items": ITEMS, "hostile": len(hostile), "rows": len(rows), "wall_s": round(wall, 1),
              "rows_per_s": round(len(rows) / wall, 2), "kills": [{"after_files": m, "what": w, "at_s": t}
                                                                  for m, w, t in done],
              "pipeline_rebuilds": len(summary["pipeline_rebuilds"]), "driver_peak_rss_mb": round(peak, 1),
              "driver_rss_growth_mb_per_1000_items": round(growth, 2), "driver_rss_samples": len(samples),
              "machine": f"{os.cpu_count()} cores; loopback two-node Ray: head 2 CPUs, worker 1 CPU"}
    DOCS.write_text(json.dumps(record, indent=2) + "\n")
    assert [w for _, w, _ in done].count("actor") == 3 and [w for _, w, _ in done].count("node") == 1, done
