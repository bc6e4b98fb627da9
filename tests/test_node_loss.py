"""A worker node lost under a submitted job at each moment of its life, and a cluster left too small to go on.

A real two-node cluster of the smallest shape that can shrink under a job: a head and a worker node of 1 CPU each
(tests/cluster.py, its own for this module: the nodes are killed here), and real jobs (`lavi-label submit`,
tests/test_cluster.py's helpers). The head's CPU is held until the moment (so the job's tasks and labeler start on
the worker node), then freed, and the worker node is killed by SIGKILL to its whole process tree, the way a
machine dies, at a moment the test waits for (a file the job wrote, a task's or an actor's process on that node),
not after a guessed sleep. What is left, the head's 1 CPU with nothing else holding it, must run every stage of the
job beside its 0.5-CPU labeler.
"""

from __future__ import annotations

import glob
import json
import secrets
import time
from pathlib import Path

import pytest

from cluster import RayCluster, loopback_hostname, start_cluster
from test_cluster import SLOW, assert_exactly_once, job_id_of, lavi, parts, submit, wait_end, wait_for

pytestmark = pytest.mark.ray_cluster


@pytest.fixture(scope="module")
def cluster():
    """A head (1 CPU); the tests add the worker nodes they kill."""
    if loopback_hostname() is None:
        pytest.skip("the hostname does not resolve to 127.0.0.1: no second node on this machine")
    c = start_cluster(secrets.token_hex(16), head_cpus=1)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, int]:
    """(a directory of 20 shapes-v1 images, 20)."""
    from shapes.corpus import write_corpus

    root = str(tmp_path_factory.mktemp("corpus"))
    write_corpus(root, 20, 0, seed=0)
    return f"{root}/images", 20


def fresh_worker(cluster: RayCluster, num_cpus: int = 1, hold_head: bool = False):
    """The module's one worker node: the last test's was killed, so a new one joins (twice, on a loaded machine).
    hold_head: first hold the head's CPU (while the head is the only node, so the hold lands there); returns
    (node, the hold's job id) then."""
    for proc in list(cluster.workers):
        cluster.kill_node(proc)
    if hold_head:
        hold = cluster.hold_cpus(1)
        return fresh_worker(cluster, num_cpus), hold
    try:
        return cluster.add_worker(num_cpus=num_cpus)
    except RuntimeError:
        return cluster.add_worker(num_cpus=num_cpus)


def listing_started(out: Path) -> bool:
    return bool(glob.glob(str(out / "_listing" / "shard-*.parquet")))


def wait_for_moment(cluster: RayCluster, node, out: Path, moment: str) -> str:
    """Block until the job reaches `moment`; returns what was seen then (for the failure message).

    listing:  its listing shards are written and the listing's reader task runs on the node (the head's CPU is
              held, so the node is the only place it can run), or has just run there (a split or decode task on
              the node: the shards' items are in its object store, lost with it)
    decoding: a decode task's process on the node, before any part file is committed
    labeling: a Labeler actor on the node and a part file committed"""
    if moment == "listing":
        wait_for(lambda: listing_started(out), 300, "the listing shards", poll=0.05)
        return wait_for(lambda: ("a read_listing task on the node" if cluster.find("read_listing", node) else
                                 "the shards just read on the node (a split or decode task there, no part file)"
                                 if (cluster.find("split_batch", node) or cluster.find("decode_units", node))
                                 and not parts(out) else None),
                        300, "the listing's read on the worker node", poll=0.02)
    if moment == "decoding":
        wait_for(lambda: cluster.find("decode_units", node), 300, "a decode task on the worker node", poll=0.05)
        return f"a decode task on the node, {len(parts(out))} part files committed"
    wait_for(lambda: cluster.find("Labeler", node), 300, "a Labeler actor on the worker node")
    wait_for(lambda: parts(out), 300, "a committed part file")
    return f"a Labeler on the node, {len(parts(out))} part files committed"


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("moment", ["listing", "decoding", "labeling"])
def test_worker_node_killed_at_any_moment(cluster, corpus, tiny_model, tmp_path, moment):
    """Guards against a job that fails or hangs when a worker node dies while it lists (Ray Data's read_parquet
    footer-read its shards with actors spread over the nodes: one lost with its node failed the job), decodes or
    labels; against an operator that asks for more than a 1-CPU node beside a 0.5-CPU labeler has (a block-shaping
    repartition of Ray Data's, at a whole CPU: the shrunk cluster then waits forever); and against rows lost or
    duplicated when what the node held is redone on the head."""
    node, hold = fresh_worker(cluster, hold_head=True)  # the head's CPU held: the job starts on the worker node
    inputs, items = corpus
    out = tmp_path / "out"
    try:
        job = job_id_of(submit(cluster, inputs, out, tiny_model, *SLOW))
        seen = wait_for_moment(cluster, node, out, moment)
    finally:
        cluster.release(hold)
    cluster.kill_node(node)
    logs = lambda: lavi(cluster, "logs", job).stdout[-3000:]
    assert wait_end(cluster, job, timeout=900) == "SUCCEEDED", f"killed at {seen}: {logs()}"
    assert_exactly_once(out, items)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["items"] == items and summary["stalls"] == [], summary
    print(f"{moment}: killed at {seen}; rebuilds {summary['pipeline_rebuilds']}")


@pytest.mark.timeout(900)
def test_a_cluster_left_too_small_for_a_replica_fails_naming_the_resources(cluster, corpus, tiny_model, tmp_path):
    """Guards against a job that waits forever (or for the whole stall watchdog) once the only node that could
    hold a labeler replica is gone: the driver checks the cluster while rows stream, not only at the start, and
    ends the job within the watchdog's time with a message naming what a replica asks for and what is left."""
    node = fresh_worker(cluster, num_cpus=3)  # the only node with room for a 2.5-CPU replica
    inputs, _ = corpus
    out = tmp_path / "out"
    stall = 60
    job = job_id_of(submit(cluster, inputs, out, tiny_model, *SLOW, "--cpus-per-worker", "2.5",
                           "--stall-timeout", str(stall)))
    wait_for(lambda: cluster.find("Labeler", node), 300, "the Labeler actor on the worker node")
    cluster.kill_node(node)
    killed = time.monotonic()
    assert wait_end(cluster, job, timeout=600) == "FAILED"
    took = time.monotonic() - killed
    logs = lavi(cluster, "logs", job).stdout
    assert "asks for 2.5 CPUs (--cpus-per-worker); the largest alive node has 1" in logs, logs[-3000:]
    assert "the cluster shrank under the job" in logs and "cluster {CPU: 1" in logs, logs[-3000:]
    assert took < 2 * stall, f"the job ended {took:.0f} s after the node died (watchdog: {2 * stall} s)"
