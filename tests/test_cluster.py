"""`lavi-label submit/status/logs/stop/list` against a real two-node Ray cluster (tests/cluster.py).

Every command runs as a user runs it: a subprocess with the cluster token in its environment.
The pipeline inside each job is the real one (`jobs.cli run`) with a tiny random model on a
small shapes corpus. Faults are real: processes killed by PID mid-job.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster import RayCluster, free_port, loopback_hostname, start_cluster
from jobs.run import run as run_command
from jobs.submit import derived_submission_id, redact_command, run_arguments

ROOT = Path(__file__).parents[1]
QUESTIONS = ("what shape is it?", "what color is it?")
# fault tests: one item per batch and per decode task, and long generations (a random model never stops early), so
# labeling outlasts the actor start-up and a kill or a stop lands mid-job; a file per item
SLOW = ("--rows-per-file", "2", "--batch-size", "1", "--decode-batch-size", "1", "--max-new-tokens", "200")


@pytest.fixture(scope="module")
def cluster():
    """A head (2 CPUs) and, where the hostname resolves to loopback, a worker node (1 CPU)."""
    c = start_cluster(secrets.token_hex(16), head_cpus=2)
    try:
        if loopback_hostname() is not None:
            try:
                c.add_worker(num_cpus=1)
            except RuntimeError:  # a loaded machine: once more
                c.add_worker(num_cpus=1)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[str, int]]:
    """{"small": (a glob of 20 images, 20), "large": (the directory of 40 images, 40)}: shapes-v1
    images as plain files (no inputs, so the prompts are exactly QUESTIONS)."""
    from shapes.corpus import write_corpus

    root = str(tmp_path_factory.mktemp("corpus"))
    write_corpus(root, 40, 0, seed=0)
    return {"small": (f"{root}/images/0000[01]*", 20), "large": (f"{root}/images", 40)}


def lavi(cluster: RayCluster, *args: str, timeout: float = 600, env: dict | None = None,
         address: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jobs.cli", *args]
    if args[0] in ("submit", "status", "logs", "stop", "list"):
        cmd += ["--address", address or cluster.address]
    return subprocess.run(cmd, env={**(env or cluster.env), "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def submit(cluster: RayCluster, corpus: str, out: Path, model: str, *extra: str, wait: bool = False,
           **kw) -> subprocess.CompletedProcess:
    args = ["submit", "--python", sys.executable, corpus, "--out", str(out), "--model", model,
            "--task", "vqa", *[a for q in QUESTIONS for a in ("--question", q)], "--max-new-tokens", "3", *extra]
    return lavi(cluster, *args, *(["--wait"] if wait else []), **kw)


def job_id_of(result: subprocess.CompletedProcess) -> str:
    match = re.search(r"^submitted (\S+) to ", result.stdout, re.M)
    assert match, result.stdout + result.stderr[-3000:]
    return match.group(1)


def status_of(cluster: RayCluster, job: str) -> str:
    result = lavi(cluster, "status", job)
    assert result.returncode == 0, result.stderr[-2000:]
    return re.search(r"^status:\s+(\S+)", result.stdout, re.M).group(1)


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_end(cluster: RayCluster, job: str, timeout: float = 480) -> str:
    return wait_for(lambda: (s := status_of(cluster, job)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                    timeout, f"job {job} to end", poll=3)


def parts(out: Path) -> list[str]:
    return glob.glob(str(out / "part-*.parquet"))


def assert_exactly_once(out: Path, items: int) -> None:
    rows = pq.read_table(str(out)).to_pylist()
    row_ids = [r["row_id"] for r in rows]
    assert len(row_ids) == len(set(row_ids)), "duplicate row_id"
    assert len({r["item_id"] for r in rows}) == items
    assert len(rows) == items * len(QUESTIONS)
    assert {r["prompt"] for r in rows} == set(QUESTIONS)
    assert not [r for r in rows if r["status"] == "error"], [r["error"] for r in rows if r["status"] == "error"][:3]


def test_entrypoint_forwards_every_run_option():
    """Guards against a run option that submit drops or mangles on its way into the job's
    entrypoint (a new option in `run`, a repeatable one, a flag, a float)."""
    values = {"out": "s3://b/out", "task": "vqa", "prompt": None, "questions": ("a b?", "c"),
              "model": "s3://m/lavi", "batch_size": 7, "workers": 3, "gpus_per_worker": 0.5,
              "max_new_tokens": 9, "temperature": 0.7, "top_p": 0.9, "seed": 5, "frames": 4,
              "clip_seconds": 2.5, "max_clips": 6, "storage_options": ("key=k", "client_kwargs.endpoint_url=http://x"),
              "overwrite": True, "max_error_rate": 0.25, "job_id": "j1", "rows_per_file": 11, "compile": False,
              "inflight": False, "max_rebuilds": 2, "stall_timeout": 42.5, "quantize": "int8", "dtype": "bfloat16",
              "visual_compress": "fastv:0.5@2", "report": False, "verbose": True, "choices": "yes,no",
              "json_schema": '{"type": "object"}',
              "clips": "shots", "min_clip_seconds": 1.5, "max_clip_seconds": 8.0, "clips_per_group": 5,
              "decode_workers": 2, "max_bytes": 1000, "cpus_per_worker": 0.25, "fetch_retries": 5,
              "decode_batch_size": 3}
    names = {p.name for p in run_command.params if p.name not in ("inputs", "address")}
    assert names <= set(values), f"run options this test does not know yet: {names - set(values)}"
    on = {"compile": True, "batch_size": None, "inflight": True, "report": True}
    for changes in ({}, on, {"compile": None}):  # on/off pairs, auto
        given = {**values, **changes}
        args = run_arguments(("in/*.png", "s3://b/in/"), given)
        parsed = run_command.make_context("run", args).params
        assert parsed["inputs"] == ("in/*.png", "s3://b/in/")
        assert {k: parsed[k] for k in names} == {k: given[k] for k in names}


def test_submission_id_and_entrypoint_redaction():
    """Guards against a resubmission of the same output getting another id (a second copy of the
    job) and against credentials in --storage-option being shown by the views."""
    assert derived_submission_id("s3://b/out") == derived_submission_id("s3://b/out/")
    assert derived_submission_id("s3://b/out") != derived_submission_id("s3://b/out2")
    assert re.fullmatch(r"lavi-[0-9a-f]{12}", derived_submission_id("/data/out"))
    shown = redact_command("python -m jobs.cli run x --storage-option secret=s3cr3t --storage-option "
                           "key=AKIA1 --storage-option client_kwargs.endpoint_url=http://h:1 --address auto")
    assert "s3cr3t" not in shown and "AKIA1" not in shown and "endpoint_url=http://h:1" in shown


@pytest.mark.ray_cluster
@pytest.mark.timeout(900)
def test_submit_wait_status_logs_list(cluster, corpus, tiny_model, tmp_path):
    """Guards against a submitted job that cannot find the project code or a local model on the
    cluster, rows lost or duplicated between the job and the Parquet output, --wait exiting 0 on a
    job that did not succeed, and views that do not show the job."""
    inputs, items = corpus["small"]
    out = tmp_path / "out"
    done = submit(cluster, inputs, out, tiny_model, wait=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job = job_id_of(done)
    assert f"job {job} SUCCEEDED" in done.stdout
    assert "--address auto" in done.stdout and "_model/" in done.stdout  # the model travelled with the job
    assert_exactly_once(out, items)

    status = lavi(cluster, "status", job)
    assert status.returncode == 0 and re.search(r"^status:\s+SUCCEEDED$", status.stdout, re.M), status.stdout
    assert re.search(rf"^output:\s+{re.escape(str(out))}$", status.stdout, re.M)
    logs = lavi(cluster, "logs", job)
    assert logs.returncode == 0 and f"labels: {out}" in logs.stdout
    listing = lavi(cluster, "list")
    assert listing.returncode == 0 and re.search(rf"^{job}\s+SUCCEEDED\s.*{re.escape(str(out))}$", listing.stdout, re.M)
    missing = lavi(cluster, "status", "lavi-nosuchjob")
    assert missing.returncode == 1 and "lavi-nosuchjob" in missing.stderr


@pytest.mark.ray_cluster
@pytest.mark.timeout(900)
def test_stop_then_resubmit_resumes(cluster, corpus, tiny_model, tmp_path):
    """Guards against a second submit of a running output starting a second copy, a stopped job
    that cannot be resubmitted (its id taken), and a resubmission that redoes or duplicates the
    items the stopped job committed."""
    inputs, items = corpus["large"]
    out = tmp_path / "out"
    first = submit(cluster, inputs, out, tiny_model, *SLOW)
    assert first.returncode == 0, first.stderr[-3000:]
    job = job_id_of(first)
    again = submit(cluster, inputs, out, tiny_model, *SLOW)
    assert again.returncode == 0 and f"job {job} is already" in again.stdout and "submitted" not in again.stdout
    wait_for(lambda: parts(out), 600, "a committed part file")
    stopped = lavi(cluster, "stop", job)
    assert stopped.returncode == 0 and f"job {job} STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    committed = len(pq.read_table(str(out)))
    assert 0 < committed < items * len(QUESTIONS), "the job was not stopped mid-way"

    resumed = submit(cluster, inputs, out, tiny_model, *SLOW, wait=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert job_id_of(resumed) == f"{job}-2"
    skipped = re.search(r"(\d+) already done", resumed.stdout)
    assert skipped and int(skipped.group(1)) * len(QUESTIONS) == committed, resumed.stdout[-2000:]
    assert_exactly_once(out, items)


@pytest.mark.ray_cluster
@pytest.mark.timeout(900)
def test_actor_killed_mid_job(cluster, corpus, tiny_model, tmp_path):
    """Guards against a labeler actor's death losing its batch (no restart/retry) or delivering
    its rows twice (a retried batch written again)."""
    inputs, items = corpus["small"]
    out = tmp_path / "out"
    started = submit(cluster, inputs, out, tiny_model, *SLOW)
    job = job_id_of(started)
    wait_for(lambda: parts(out), 300, "a committed part file")
    actors = wait_for(lambda: cluster.find("Labeler"), 60, "a Labeler actor process")
    os.kill(actors[0], signal.SIGKILL)
    assert wait_end(cluster, job) == "SUCCEEDED", lavi(cluster, "logs", job).stdout[-3000:]
    assert_exactly_once(out, items)


@pytest.mark.ray_cluster
@pytest.mark.timeout(300)
def test_an_interpreter_without_the_dependencies_is_refused_in_seconds(cluster, corpus, tiny_model, tmp_path):
    """Guards against a job whose cluster `python` lacks the dependencies failing deep inside the run (a
    ModuleNotFoundError in its logs after a submit that said "submitted"), or against a missing interpreter."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    inputs, _ = corpus["small"]
    for python, expect in ((str(bare / "bin" / "python"), "cannot import"), ("/nonexistent/python3", "did not start")):
        args = ["submit", "--python", python, inputs, "--out", str(tmp_path / "out"), "--model", tiny_model]
        start = time.monotonic()
        refused = lavi(cluster, *args, timeout=240)
        took = time.monotonic() - start
        assert refused.returncode == 2 and expect in refused.stderr and "--python" in refused.stderr, refused.stderr
        assert "submitted" not in refused.stdout and took < 120, (took, refused.stdout)
        if expect == "cannot import":
            assert str(bare) in refused.stderr and "cannot import 'click'" in refused.stderr, refused.stderr
    assert not (tmp_path / "out").exists()
    listed = lavi(cluster, "list")
    assert "probe" not in listed.stdout, listed.stdout  # the probe jobs are not the user's


@pytest.mark.ray_cluster
@pytest.mark.timeout(900)
def test_errors_are_clear_and_never_show_the_token(cluster, corpus, tiny_model, tmp_path):
    """Guards against a wrong address, a wrong token or an unwritable output ending in a traceback
    or exit 0, and against the token appearing in any output."""
    inputs, _ = corpus["small"]
    nowhere = submit(cluster, inputs, tmp_path / "a", tiny_model, address=f"http://127.0.0.1:{free_port()}")
    assert nowhere.returncode == 1 and "cannot reach the Ray Jobs API" in nowhere.stderr, nowhere.stderr[-2000:]
    assert "Traceback" not in nowhere.stderr

    wrong = "f" * 32
    no_token = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    for env in ({**cluster.env, "RAY_AUTH_TOKEN": wrong}, no_token):
        refused = submit(cluster, inputs, tmp_path / "b", tiny_model, env=env)
        listed = lavi(cluster, "list", env=env)
        for r in (refused, listed):
            assert r.returncode == 1 and "token" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
            assert wrong not in r.stdout + r.stderr and cluster.token not in r.stdout + r.stderr

    token_file = tmp_path / "token"
    token_file.write_text(cluster.token + "\n")
    no_env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    unwritable = submit(cluster, inputs, Path("/proc/lavi-out"), tiny_model, "--token-file", str(token_file),
                        wait=True, env=no_env)
    assert unwritable.returncode == 1, unwritable.stdout[-2000:] + unwritable.stderr[-2000:]
    assert re.search(r"job \S+ FAILED: .*(/proc/lavi-out|Error)", unwritable.stderr), unwritable.stderr[-2000:]
    assert cluster.token not in unwritable.stdout + unwritable.stderr


@pytest.mark.slow
@pytest.mark.ray_cluster
@pytest.mark.timeout(900)
def test_submit_with_a_qwen_vl_labels_as_transformers(cluster, corpus, tmp_path):
    """A Qwen-VL directory submitted to the cluster (uploaded with the job, its processor files read by the driver
    there, the decode workers of both nodes resizing for it): every row once, each answer transformers' greedy
    answer to that question about that image."""
    import torch
    from qwenvl_fixture import make_qwenvl, reference_text, transformers

    d = make_qwenvl(tmp_path / "qwen", "qwen2_5_vl", seed=3)
    inputs, items = corpus["small"]
    out = tmp_path / "out"
    done = submit(cluster, inputs, out, str(d), wait=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "_model/" in done.stdout  # the model travelled with the job
    assert_exactly_once(out, items)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
    rows = pq.read_table(str(out)).to_pylist()
    for r in rows[:: max(1, len(rows) // 6)]:  # six of them: transformers' side takes a second each
        path = Path(r["uri"].removeprefix("file://"))
        assert r["text"] == reference_text(d, hf, path, r["prompt"], 3), r["uri"]
