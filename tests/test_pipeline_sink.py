"""Committing without Ray: workers.commit (whole units per file, records), pipeline.sink (units cut between
blocks), workers.parts (names, totals), pipeline.summary (totals, progress)."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output import Output
from pipeline.sink import ParquetSink
from pipeline.summary import Progress, build_summary, format_summary, totals
from schemas.clips import BYTES_READ, GROUP, GROUPS, ITEM_ROWS, READ_RETRIES
from schemas.manifest import SHARD
from schemas.rows import LABEL_SCHEMA, item_id, metadata, read_metadata, row_id, table_from_rows
from workers.commit import CommitSpec, commit_block, commit_rows, from_ipc
from workers.parts import parse_part_name, part_name, shard_id

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
META = metadata("tiny", {"task": "caption", "max_new_tokens": 8}, "job-1")
SHARD0 = shard_id(0, "0badc0de")


def _rows(uri: str, clips: int, prompts: list[str], error: bool = False, group: tuple[int, int] | None = None,
          shard: str = SHARD0, first_clip: int = 0) -> pa.Table:
    """A unit's labelled rows with their bookkeeping: an item whole, or clip group `group` = (g, of) of a video."""
    iid = item_id(uri)
    rows = []
    for c in range(first_clip, first_clip + clips):
        for p in prompts:
            rows.append({
                "row_id": row_id(iid, c, p, "vqa"), "item_id": iid, "uri": uri, "media_type": "video",
                "clip_index": c, "clip_start_s": float(c), "clip_end_s": c + 1.0, "frame_timestamps_s": [float(c)],
                "width": 8, "height": 8, "task": "vqa", "prompt": p,
                "text": None if error else "yes", "status": "error" if error else "ok",
                "error_stage": "decode" if error else None, "error": "bad" if error else None,
                "num_prompt_tokens": None if error else 3, "num_generated_tokens": None if error else 2,
                "model": "tiny", "job_id": "job-1", "created_at": NOW,
            })
    n = len(rows)
    return table_from_rows(rows).append_column(ITEM_ROWS, pa.array([n] * n, pa.int32())).append_column(
        GROUP, pa.array([group[0] if group else None] * n, pa.int32())).append_column(
        GROUPS, pa.array([group[1] if group else None] * n, pa.int32())).append_column(
        BYTES_READ, pa.array([100] * n, pa.int64())).append_column(
        READ_RETRIES, pa.array([0] * n, pa.int32())).append_column(SHARD, pa.array([shard] * n, pa.string()))


def _spec(out, rows_per_file: int = 5000) -> CommitSpec:
    return CommitSpec(out=str(out), metadata=META, rows_per_file=rows_per_file)


def test_a_block_commits_its_whole_units_and_hands_on_the_rest(tmp_path):
    """Guards against a part file holding only some of a unit's rows (a resume would skip the unit and its missing
    rows would never be written), and against a unit cut between blocks being lost: its rows leave the commit
    stage for the driver, which commits it whole once its last rows come."""
    out = tmp_path / "out"
    a, b = _rows("s3://x/a.mp4", 3, ["q1?", "q2?"]), _rows("s3://x/b.mp4", 1, ["q1?", "q2?"])
    first, second = commit_block(pa.concat_tables([b, a.slice(0, 4)]), _spec(out)).to_pylist()
    leftover = second["leftover"]
    assert first["record"] is not None and first["leftover"] is None and second["record"] is None
    assert from_ipc(leftover).num_rows == 4
    assert [p.name for p in out.glob("part-*")] == [part_name([item_id("s3://x/b.mp4")], SHARD0)]
    sink = ParquetSink(_spec(out))
    assert sink.add(leftover) == []  # a's rows are not all in yet
    [record] = sink.add(a.slice(4))
    sink.close()
    assert record["whole"] == 1 and record["totals"]["rows"] == 6 and record["shard"] == SHARD0
    table = pq.read_table(out)
    assert table.schema.remove_metadata().equals(LABEL_SCHEMA) and table.num_rows == 8
    assert sorted(table.column("row_id").to_pylist()) == sorted(a["row_id"].to_pylist() + b["row_id"].to_pylist())
    assert read_metadata(pq.read_schema(next(out.glob("part-*"))).metadata)["model"] == "tiny"
    assert Output(str(out)).scan().done_items == {item_id("s3://x/a.mp4"), item_id("s3://x/b.mp4")}


def test_part_names_are_deterministic_and_say_their_shard():
    """Guards against random file names (a rerun of the same units would write a second copy) and against a name
    that does not say its listing shard (a resume finds a shard's files by that prefix)."""
    assert part_name(["b", "a"], SHARD0) == part_name(["a", "b", "a"], SHARD0) != part_name(["a"], SHARD0)
    assert parse_part_name(part_name(["a"], SHARD0)) == (0, "0badc0de")
    assert parse_part_name(part_name(["a"])) is None  # an earlier version's name: no shard


def test_files_are_cut_between_units_and_by_shard(tmp_path):
    """Guards against rows_per_file cutting a unit in two files, and a file mixing listing shards (its name says
    one shard, which a resume reads as holding it)."""
    out = tmp_path / "out"
    other = shard_id(1, "feedf00d")
    units = [_rows(f"/v{i}.mp4", 2, ["q?"], group=(0, 1)) for i in range(4)] + [_rows("/w.png", 1, ["q?"], shard=other)]
    records, rest = commit_rows(pa.concat_tables(units), _spec(out, rows_per_file=3))
    assert rest.num_rows == 0 and sorted(r["totals"]["rows"] for r in records) == [1, 2, 2, 2, 2]
    assert {r["shard"] for r in records} == {SHARD0, other} and sum(r["units"] for r in records) == 5
    for path in out.glob("part-*.parquet"):
        ids = set(pq.read_table(path).column("item_id").to_pylist())
        assert len(ids) == 1 or path.name.startswith(f"part-{other}")
    assert sum(len(r["groups"]) for r in records) == 4 and sum(r["whole"] for r in records) == 1


def test_leftover_temp_files_are_not_counted(tmp_path):
    """Guards against a killed run's half-written file being read as finished work on resume."""
    out = tmp_path / "out"
    (out / "_tmp").mkdir(parents=True)
    (out / "_tmp" / "x-part-0000.parquet").write_bytes(b"PAR1 half written")
    output = Output(str(out))
    assert output.scan().rows == 0
    commit_rows(_rows("/a.png", 1, ["q?"]), _spec(out))
    assert output.scan().rows == 1
    assert pq.read_table(str(out)).num_rows == 1  # readers skip _tmp/
    assert output.clear() == 1 and output.scan().rows == 0 and not (out / "_tmp").exists()


def test_duplicate_and_missing_rows_raise(tmp_path):
    """Guards against a duplicated row or a lost row passing silently into the output."""
    rows = _rows("/a.png", 1, ["q?", "r?"])
    with pytest.raises(AssertionError, match="duplicated"):
        commit_rows(pa.concat_tables([rows, rows.slice(0, 1)]), _spec(tmp_path / "o1"))
    sink = ParquetSink(_spec(tmp_path / "o2"))
    sink.add(rows.slice(0, 1))
    with pytest.raises(AssertionError, match="rows missing"):
        sink.close()


def test_summary_counts_and_text(tmp_path):
    """Guards against a summary that counts only this attempt's rows or drops error stages, and against a video
    whose clip groups lie in two files counted as two items."""
    out = tmp_path / "out"
    commit_rows(_rows("/a.mp4", 2, ["q?"], group=(0, 2)), _spec(out))
    records, _ = commit_rows(pa.concat_tables([_rows("/a.mp4", 1, ["q?"], group=(1, 2), first_clip=2),
                                               _rows("/b.mp4", 1, ["q?", "r?"], error=True)]), _spec(out))
    assert len(list(out.glob("part-*"))) == 2 and records[0]["totals"]["items"] == 1  # /b only: /a is in its group 0's
    summary = build_summary(totals(Output(str(out))), job_id="job-1", model="tiny", generation={}, wall_s=2.0,
                            items_listed=2, items_skipped=0, rows_written=5, items_written=2, generated_tokens=4,
                            files_written=2)
    assert (summary["rows"], summary["items"], summary["clips"]) == (5, 2, 4)
    assert summary["status"] == {"error": 2, "ok": 3} and summary["error_stage"] == {"decode": 2}
    assert summary["generated_tokens"] == 6 and summary["this_run"]["tokens_per_s"] == 2.0
    Output(str(out)).write_summary(summary)
    assert Output(str(out)).read_summary() == summary
    assert "errors by stage: decode 2" in format_summary(summary)
    assert pq.read_table(out).num_rows == 5  # _summary.json is ignored by readers


def test_progress_line_has_rate_and_eta():
    """Guards against a progress display with no ETA on long runs."""
    progress = Progress(total_items=10, every_s=0, bar=False)
    line = progress.update(5, 7, 2, force=True)
    assert "5/10 items" in line and "ETA" in line and "(2 errors)" in line
    assert progress.update(5, 7, 2, force=True) is None  # the same figures are not shown twice (the run's end)


def test_progress_bar_on_a_terminal_counts_items_rows_and_errors():
    """Guards against a terminal getting log lines instead of a live bar, or a bar without rows and errors."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    progress = Progress(total_items=10, stream=screen)
    for items, rows, errors in ((2, 3, 0), (6, 9, 1)):
        assert progress.update(items, rows, errors) is None
    progress.close()
    shown = screen.getvalue()
    assert "6/10" in shown and "9 rows labelled, 9 written (1 errors)" in shown and "item/s" in shown


def test_progress_counts_rows_labelled_before_they_are_written():
    """Guards against progress that stands still while a block is generating (rows reach the driver a block at a
    time; the labelers' counts come in between) or that shows fewer labelled rows than written ones."""
    progress = Progress(total_items=10, every_s=0, bar=False)
    assert "0 rows labelled, 0 written" in progress.update(0, 0, 0, force=True)
    assert "12 rows labelled, 0 written" in progress.labelled(12)
    assert "16 rows labelled, 16 written" in progress.update(4, 16, 0)
    assert progress.update(4, 16, 0, force=True) is None  # the same figures are not shown twice
    assert "20 rows labelled, 16 written" in progress.labelled(20)


def test_labelers_row_counts_reach_the_drivers_progress(ray_local, tiny_model):
    """Guards against the row counter losing the labelers' counts and work on the way to the driver's progress
    display (a remote labeler's reporter, the named actor, the ticker's reads), or the ticker outliving its run."""
    import time

    import numpy as np
    import ray

    from pipeline.summary import Ticker
    from workers.labeler import Labeler, LabelerSpec

    progress = Progress(total_items=4, every_s=0, bar=False)
    ticker = Ticker(progress, "lavi-rows-test", every_s=0.2)

    @ray.remote(num_cpus=0)
    def label() -> int:
        clip = {"item_id": "a", "uri": "x.png", "media_type": "image", "clip_index": None, "clip_start_s": None,
                "clip_end_s": None, "frame_timestamps_s": None, "width": 8, "height": 8, "status": "ok",
                "error_stage": None, "error": None, "_item_rows": 3,
                "prompts": [{"task": "vqa", "prompt": q, "constraint": None} for q in ("a?", "b?", "c?")]}
        labeler = Labeler(LabelerSpec(tiny_model, "job", {"max_new_tokens": 2}, max_batch=2,
                                      progress="lavi-rows-test"))
        size = labeler.engine.image_size
        clip.update(frames=np.zeros((1, size, size, 3), np.uint8).tobytes(), frame_shape=[1, size, size, 3])
        return labeler(pa.Table.from_pylist([clip])).num_rows

    assert ray.get(label.remote()) == 3
    ticker.stop()
    assert progress.rows_labelled == 3 and progress.work["prefills"] >= 1 and progress.work["decode_steps"] >= 1
    assert not ticker._thread.is_alive()
    assert ticker.ready_at is not None and ticker.ready_at <= time.monotonic()  # when the labeler had its model


def test_a_labeler_at_work_beats_while_its_call_runs():
    """Guards against a slow batch (a large model's prefill) looking like a stalled pipeline: while a labeler's
    call runs, its reporter tells the counter it is busy every second, whether rows finish or not, and stops
    when the call ends."""
    import time

    from workers.progress import RowCounter, RowReporter

    counter = RowCounter()

    class Local:
        def __init__(self):
            self.add = type("M", (), {"remote": staticmethod(lambda *a: counter.add(*a))})()

    reporter = RowReporter("c", every_s=0.05, work=lambda: {"decode_steps": 7}, labeler="l")
    reporter._actor = Local()
    assert counter.state()["beat_age_s"] is None
    with reporter.busy():
        time.sleep(0.3)
        assert counter.state()["beat_age_s"] < 0.2 and counter.state()["work"] == {"decode_steps": 7}
    time.sleep(0.3)
    assert counter.state()["beat_age_s"] > 0.2 and counter.state()["rows"] == 0


def test_a_labeler_loading_its_model_beats_and_says_so(monkeypatch, tiny_model):
    """Guards against a labeler's model download and load (minutes for a 7B from object storage) passing for a
    stalled pipeline (no heartbeat until its first block: the watchdog ended such runs after twice --stall-timeout)
    or for idle labelers on the progress line: while it loads, it beats and says "loading the model"; once loaded,
    its engine's counts replace that before any block comes."""
    import time

    import ray

    from lavi.serving.engine import Engine
    from lavi.serving.steps import GenerationConfig
    from workers.labeler import Labeler, LabelerSpec
    from workers.progress import RowCounter

    counter, seen = RowCounter(), []
    local = type("A", (), {"add": type("M", (), {"remote": staticmethod(lambda *a: counter.add(*a))})()})()
    monkeypatch.setattr(ray, "get_actor", lambda name: local)

    def slow_load(spec):
        time.sleep(0.5)
        seen.append(counter.state())
        return Engine.load(tiny_model, max_batch=2), GenerationConfig(max_new_tokens=2)

    monkeypatch.setattr(Labeler, "_load", staticmethod(slow_load))
    Labeler(LabelerSpec(tiny_model, "job", progress="lavi-rows-test"))
    [loading] = seen
    assert loading["work"] == {"loading": 1} and loading["beat_age_s"] is not None and loading["beat_age_s"] < 1
    assert loading["ready_age_s"] is None  # not loaded yet: the summary's labeler_ready_s counts from its end
    progress = Progress(every_s=0, bar=False)
    progress.labelled(0, loading["work"])
    assert "labelers: 1 loading the model" in progress._work()
    assert "loading" not in counter.state()["work"] and counter.state()["work"]["prefills"] == 0
    assert 0 <= counter.state()["ready_age_s"] < 5


def test_retried_reads_are_counted_once_per_unit(tmp_path):
    """Guards against the summary's retry counts being wrong: a unit's retries (on its first clip's rows, every
    prompt's row the same) counted once per clip not once per row; a unit whose reads recovered after a retry told
    apart from one whose read failed after its retries ran out."""

    def retried(table: pa.Table, first: int) -> pa.Table:
        per_row = [first if c == 0 else 0 for c in table.column("clip_index").to_pylist()]
        return table.set_column(table.schema.get_field_index(READ_RETRIES), READ_RETRIES, pa.array(per_row, pa.int32()))

    failed = _rows("s3://x/c.jpg", 1, ["q1?"], error=True)
    failed = failed.set_column(failed.schema.get_field_index("error_stage"), "error_stage", pa.array(["read"]))
    failed = failed.set_column(failed.schema.get_field_index("error"), "error",
                               pa.array(["read failed after 3 attempts (retried for 1.5 s): ConnectionError"]))
    [record], _ = commit_rows(pa.concat_tables([retried(_rows("s3://x/a.mp4", 3, ["q1?", "q2?"]), 2),
                                                retried(_rows("s3://x/b.mp4", 2, ["q1?"]), 0), retried(failed, 2)]),
                              _spec(tmp_path / "out", rows_per_file=100))
    assert (record["read_retries"], record["reads_recovered"], record["reads_failed"]) == (4, 1, 1)
    assert record["bytes_read"] == 600  # 100 a clip: 3 + 2 + 1 clips


def test_a_cpu_labeler_computes_on_the_cores_its_node_has():
    """Guards against a CPU labeler computing on one thread of an idle node (Ray sets OMP_NUM_THREADS to a worker's
    whole CPUs, 1 under one: a 0.5B model labelled on one core of two for minutes), and against a small model's
    threads fighting the decode tasks beside it for every core (tiny-shapes labelled 38 rows/s on two threads and
    62 on one)."""
    from workers.cpu_share import cpu_threads

    assert cpu_threads(2, 1, 0.5, 900_000_000) == 2  # a large model: the node's cores
    assert cpu_threads(2, 1, 0.5, 5_000_000) == 1  # a small one leaves a core to the pipeline
    assert cpu_threads(16, 2, 0.5, 900_000_000) == 8  # two labelers share the node
    assert cpu_threads(1, 1, 0.5, 900_000_000) == 1 and cpu_threads(1, 1, 0.5, 5_000_000) == 1


def test_a_cpu_labeler_loads_on_its_share_of_the_cores_then_computes_on_its_threads(monkeypatch, tiny_model):
    """Guards against a CPU labeler loading its model on the one thread Ray gives a 0.5-CPU worker (a real-size
    checkpoint's copies, casts and oneDNN packing: ~10 s of a 0.5B model's start, on one core of two): it loads on
    all of its share, then computes on what cpu_threads gives its model (a small one: one core fewer)."""
    import torch

    from lavi.serving.engine import Engine
    from workers import labeler as labeler_module
    from workers.labeler import Labeler, LabelerSpec

    loading, load = [], Engine.load

    def load_noting(*args, **kwargs):
        loading.append(torch.get_num_threads())
        return load(*args, **kwargs)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(Engine, "load", staticmethod(load_noting))
        monkeypatch.setattr(labeler_module, "node_cpus", lambda: 4.0)
        Labeler(LabelerSpec(tiny_model, "job", workers=1, cpus_per_worker=0.5))
        assert loading == [4] and torch.get_num_threads() == 3  # tiny: a core left to the pipeline
    finally:
        torch.set_num_threads(before)

def test_a_labeler_outside_ray_counts_the_machine_s_cores_and_starts_no_ray():
    """Guards against node_cpus asking Ray's runtime context in a plain process (a labeler made outside a Ray
    worker), which started a local Ray of its own (seconds, and a token written to ~/.ray). In a process of its own:
    this one may hold an earlier test's Ray."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, ray; from workers.cpu_share import node_cpus; "
            "print(json.dumps([node_cpus(), ray.is_initialized()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [float(len(os.sched_getaffinity(0))), False]


def test_the_driver_gives_freed_heap_back_to_the_system(tmp_path):
    """glibc keeps freed pages in its arenas: a driver that frees each block's bookkeeping still grew in resident
    memory with the corpus. release_free_memory (the progress ticker calls it every 30 s) hands them back: here 150 MB
    of freed 60 kB buffers, the heap's top pinned by one still alive, in a process of its own."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "trim.py"
    script.write_text(
        "from bench.child import rss_bytes\n"
        "from pipeline.summary import release_free_memory\n"
        "blocks = [bytearray(60_000) for _ in range(2500)]\n"
        "pin = blocks[-1]\n"
        "del blocks\n"
        "before = rss_bytes(); release_free_memory(); print((before - rss_bytes()) >> 20)\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert int(out.stdout.strip()) > 100, out.stdout
