"""The driver's defences without a cluster: the watchdog's periodic cluster check and its stall record
(pipeline.recovery.stream), the bounded backoff of reads (workers.fetch), commits that retry (workers.parts)."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from pipeline.output import Output
from pipeline.recovery import ClusterTooSmall, PipelineStalled, stream
from workers.fetch import FetchError, backoff_delays, retrying


class Slow:
    """A dataset whose batches come `every_s` apart."""

    def __init__(self, n: int, every_s: float):
        # made here, not while timed: Arrow's first table in a process can take a second on a slow machine
        self.tables, self.every_s = [pa.table({"i": [i]}) for i in range(n)], every_s

    def iter_batches(self, **kwargs):
        for table in self.tables:
            time.sleep(self.every_s)
            yield table


def test_the_cluster_check_runs_while_rows_flow():
    """Guards against a cluster that shrank under a job being noticed only at a stall (or a rebuild): the check
    runs every check_s seconds while batches keep coming, and its error ends the stream."""
    calls = []

    def check():
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise ClusterTooSmall("gone")

    got = []
    with pytest.raises(ClusterTooSmall, match="gone"):
        for batch in stream(Slow(100, 0.05), stall_s=0, check=check, check_s=0.2):
            got.append(batch)
    assert 1 <= len(got) < 100 and len(calls) == 2  # rows kept coming, and the check ended them


def test_a_stall_got_over_is_recorded_and_a_second_period_fails():
    """Guards against a stall that the job got over leaving no trace in the summary, and against the watchdog
    failing after one quiet period instead of two."""
    stalls: list[dict] = []
    assert len(list(stream(Slow(2, 1.0), stall_s=0.7, describe=lambda: "cluster {CPU: 2}", stalls=stalls))) == 2
    assert len(stalls) == 2 and stalls[0]["cluster"] == "cluster {CPU: 2}" and stalls[0]["after_s"] >= 0.7
    with pytest.raises(PipelineStalled, match=r"no rows for 0 s"):
        list(stream(Slow(1, 5), stall_s=0.2, describe=lambda: "x"))


def test_read_backoff_is_exponential_and_bounded_in_time():
    """Guards against retries that wait without bound on a store that is down (a job stuck for minutes on one
    item) or that give up before their budget on one that comes back."""
    assert backoff_delays(3, 0.5, 30) == [0.5, 1.0, 2.0]
    assert backoff_delays(10, 0.5, 5) == [0.5, 1.0, 2.0, 1.5] and sum(backoff_delays(50, 0.5, 30)) == 30
    assert backoff_delays(0) == []
    tries = []

    def down():
        tries.append(1)
        raise ConnectionError("refused")

    start = time.monotonic()
    with pytest.raises(FetchError, match=r"read failed after 4 attempts \(retried for 0.07 s\): ConnectionError"):
        retrying(down, "read", retries=5, backoff_s=0.01, budget_s=0.07)
    assert len(tries) == 4 and time.monotonic() - start < 1


def test_a_commit_that_fails_is_retried_and_never_shows_a_half_file(tmp_path, monkeypatch):
    """Guards against a job failing on an output store that is unreachable for a moment as it commits, and against
    a half-written part file where readers look: the commit is redone from _tmp/ until it goes through."""
    from test_pipeline_sink import _rows, _spec

    from workers.commit import commit_rows
    from workers.storage import filesystem

    monkeypatch.setattr("workers.parts.OWN_BUDGET_S", 2.0)
    output = Output(str(tmp_path / "out"))
    fs = filesystem(str(tmp_path / "out"))[0]  # the commit stage's (cached) filesystem
    real_mv, fails = fs.mv, []

    def flaky_mv(src, dst, **kw):
        assert not output.part_paths(), "a part file is visible before its commit went through"
        if len(fails) < 2:
            fails.append(dst)
            raise ConnectionError("the store went away")
        return real_mv(src, dst, **kw)

    monkeypatch.setattr(fs, "mv", flaky_mv)
    records, _ = commit_rows(_rows("s3://b/a.mp4", 1, ["q"]), _spec(tmp_path / "out", rows_per_file=1))
    assert len(fails) == 2 and len(records) == 1 and len(output.part_paths()) == 1 and output.scan().rows == 1


def test_a_busy_labeler_is_not_a_stall():
    """Guards against the watchdog ending a job whose labeler is computing a long batch (a large model's prefill,
    a first compile: no row for minutes): while `busy` says a labeler works, no stall is counted, and once it
    stops the watchdog fires as before."""
    busy_until = time.monotonic() + 2.5  # margins of a second: a loaded CI machine delays the loop's ticks
    got = list(stream(Slow(1, 3.0), stall_s=1.0, describe=lambda: "x", busy=lambda: time.monotonic() < busy_until))
    assert len(got) == 1  # 3 s without a row, of which 2.5 s busy: under two 1 s periods idle
    with pytest.raises(PipelineStalled):
        list(stream(Slow(1, 3.0), stall_s=0.4, describe=lambda: "x", busy=lambda: False))
