"""pipeline.sink, pipeline.output and pipeline.summary without Ray: whole items per file, resume state, totals."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output import Output, part_name
from pipeline.sink import ParquetSink
from pipeline.summary import Progress, build_summary, format_summary
from schemas.clips import ITEM_ROWS
from schemas.rows import LABEL_SCHEMA, item_id, metadata, read_metadata, row_id, table_from_rows

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
META = metadata("tiny", {"task": "caption", "max_new_tokens": 8}, "job-1")


def _rows(uri: str, clips: int, prompts: list[str], error: bool = False) -> pa.Table:
    iid = item_id(uri)
    rows = []
    for c in range(clips):
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
    table = table_from_rows(rows)
    return table.append_column(ITEM_ROWS, pa.array([clips * len(prompts)] * len(rows), pa.int32()))


def test_items_split_across_batches_commit_whole(tmp_path):
    """Guards against a part file holding only some of an item's rows: resume would then skip the
    item and its missing rows would never be written."""
    out = str(tmp_path / "out")
    a, b = _rows("s3://x/a.mp4", 3, ["q1?", "q2?"]), _rows("s3://x/b.mp4", 1, ["q1?", "q2?"])
    sink = ParquetSink(Output(out), META, rows_per_file=2)
    sink.add(a.slice(0, 4))  # a is incomplete: nothing may be written
    assert sink.files == [] and Output(out).scan().done_items == frozenset()
    sink.add(pa.concat_tables([b, a.slice(4)]))
    sink.close()
    state = Output(out).scan()
    assert state.rows == 8 and state.done_items == {item_id("s3://x/a.mp4"), item_id("s3://x/b.mp4")}
    table = pq.read_table(out)
    assert table.schema.remove_metadata().equals(LABEL_SCHEMA) and table.num_rows == 8
    assert sorted(table.column("row_id").to_pylist()) == sorted(a["row_id"].to_pylist() + b["row_id"].to_pylist())
    assert read_metadata(pq.read_schema(state.files[0].removeprefix("file://")).metadata)["model"] == "tiny"
    assert state.metadata["job_id"] == "job-1"


def test_part_names_are_deterministic():
    """Guards against random file names: a rerun of the same items must not create a second copy."""
    assert part_name(["b", "a"]) == part_name(["a", "b", "a"]) != part_name(["a"])


def test_leftover_temp_files_are_not_counted(tmp_path):
    """Guards against a killed run's half-written file being read as finished work on resume."""
    out = tmp_path / "out"
    (out / "_tmp").mkdir(parents=True)
    (out / "_tmp" / "x-part-0000.parquet").write_bytes(b"PAR1 half written")
    output = Output(str(out))
    assert output.scan().rows == 0
    sink = ParquetSink(output, META)
    sink.add(_rows("/a.png", 1, ["q?"]))
    sink.close()
    assert output.scan().rows == 1
    assert pq.read_table(str(out)).num_rows == 1  # readers skip _tmp/
    assert output.clear() == 1 and output.scan().rows == 0 and not (out / "_tmp").exists()


def test_duplicate_and_missing_rows_raise(tmp_path):
    """Guards against a duplicated row or a lost row passing silently into the output."""
    sink = ParquetSink(Output(str(tmp_path / "o1")), META)
    rows = _rows("/a.png", 1, ["q?", "r?"])
    sink.add(rows.slice(0, 1))
    with pytest.raises(AssertionError, match="duplicated"):
        sink.add(rows.slice(0, 2))
    sink = ParquetSink(Output(str(tmp_path / "o2")), META)
    sink.add(rows.slice(0, 1))
    with pytest.raises(AssertionError, match="rows missing"):
        sink.close()


def test_summary_counts_and_text(tmp_path):
    """Guards against a summary that counts only this attempt's rows or drops error stages."""
    out = str(tmp_path / "out")
    output = Output(out)
    sink = ParquetSink(output, META, rows_per_file=1)
    sink.add(_rows("/a.mp4", 2, ["q?"]))
    sink.add(_rows("/b.mp4", 1, ["q?", "r?"], error=True))
    sink.close()
    assert len(sink.files) == 2
    summary = build_summary(output, job_id="job-1", model="tiny", generation={}, wall_s=2.0, items_listed=2,
                            items_skipped=0, rows_written=4, items_written=2, generated_tokens=4, files_written=2)
    assert (summary["rows"], summary["items"], summary["clips"]) == (4, 2, 3)
    assert summary["status"] == {"error": 2, "ok": 2} and summary["error_stage"] == {"decode": 2}
    assert summary["generated_tokens"] == 4 and summary["this_run"]["tokens_per_s"] == 2.0
    output.write_summary(summary)
    assert Output(out).read_summary() == summary
    assert "errors by stage: decode 2" in format_summary(summary)
    assert pq.read_table(out).num_rows == 4  # _summary.json is ignored by readers


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
    """Guards against the row counter losing the labelers' counts on the way to the driver's progress display
    (a remote labeler's reporter, the named actor, the ticker's reads), or the ticker outliving its run."""
    import numpy as np
    import pyarrow as pa
    import ray

    from pipeline.summary import Ticker
    from workers.labeler import Labeler

    progress = Progress(total_items=4, every_s=0, bar=False)
    ticker = Ticker(progress, "lavi-rows-test", every_s=0.2)

    @ray.remote(num_cpus=0)
    def label() -> int:
        clip = {"item_id": "a", "uri": "x.png", "media_type": "image", "clip_index": None, "clip_start_s": None,
                "clip_end_s": None, "frame_timestamps_s": None, "width": 8, "height": 8, "status": "ok",
                "error_stage": None, "error": None, "_item_rows": 3,
                "prompts": [{"task": "vqa", "prompt": q, "constraint": None} for q in ("a?", "b?", "c?")]}
        labeler = Labeler(tiny_model, "job", {"max_new_tokens": 2}, max_batch=2, progress="lavi-rows-test")
        size = labeler.engine.image_size
        clip.update(frames=np.zeros((1, size, size, 3), np.uint8).tobytes(), frame_shape=[1, size, size, 3])
        return labeler(pa.Table.from_pylist([clip])).num_rows

    assert ray.get(label.remote()) == 3
    ticker.stop()
    assert progress.rows_labelled == 3
    assert not ticker._thread.is_alive()


def test_retried_reads_are_counted_once_per_unit(tmp_path):
    """Guards against the summary's retry counts being wrong: a unit's retries (on its first clip's rows, every
    prompt's row the same) counted once per clip not once per row; a unit whose reads recovered after a retry told
    apart from one whose read failed after its retries ran out."""
    from schemas.clips import READ_RETRIES

    def retried(table: pa.Table, first: int) -> pa.Table:
        per_row = [first if c == 0 else 0 for c in table.column("clip_index").to_pylist()]
        return table.append_column(READ_RETRIES, pa.array(per_row, pa.int32()))

    failed = _rows("s3://x/c.jpg", 1, ["q1?"], error=True)
    failed = failed.set_column(failed.schema.get_field_index("error_stage"), "error_stage", pa.array(["read"]))
    failed = failed.set_column(failed.schema.get_field_index("error"), "error",
                               pa.array(["read failed after 3 attempts (retried for 1.5 s): ConnectionError"]))
    sink = ParquetSink(Output(str(tmp_path / "out")), META, rows_per_file=100)
    sink.add(pa.concat_tables([retried(_rows("s3://x/a.mp4", 3, ["q1?", "q2?"]), 2),
                               retried(_rows("s3://x/b.mp4", 2, ["q1?"]), 0), retried(failed, 2)]))
    sink.close()
    assert (sink.read_retries, sink.reads_recovered, sink.reads_failed) == (4, 1, 1)
