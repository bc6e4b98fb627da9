"""The output and manifest contracts: strict columns, stable ids, Parquet round trips."""

from __future__ import annotations

import datetime as dt
import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.manifest import MANIFEST_SCHEMA, make_item, media_type_from_name
from schemas.rows import (
    COLUMNS, ERROR, LABEL_SCHEMA, OK, SCHEMA_VERSION, item_id, metadata, read_metadata, row_id, table_from_rows,
)

NOW = dt.datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)


def ok_row(**over) -> dict:
    iid = item_id("s3://b/cat.jpg")
    row = dict(
        row_id=row_id(iid, None, "describe the image.", "caption"), item_id=iid, uri="s3://b/cat.jpg",
        media_type="image", clip_index=None, clip_start_s=None, clip_end_s=None, frame_timestamps_s=None,
        width=640, height=480, task="caption", prompt="describe the image.", text="a small red circle.",
        status=OK, error_stage=None, error=None, num_prompt_tokens=7, num_generated_tokens=5,
        model="tiny-shapes", job_id="job-1", created_at=NOW,
    )
    row.update(over)
    return row


def video_row() -> dict:
    return ok_row(uri="s3://b/v.mp4", media_type="video", clip_index=2, clip_start_s=8.0, clip_end_s=10.0,
                  frame_timestamps_s=[8.125, 9.875])


def error_row() -> dict:
    return ok_row(text=None, status=ERROR, error_stage="decode", error="truncated image", width=None,
                  height=None, num_prompt_tokens=None, num_generated_tokens=None)


def test_schema_has_the_design_columns_and_types():
    """Guards against drift between DESIGN.md's table and the schema writers use."""
    assert COLUMNS[:3] == ("row_id", "item_id", "uri") and len(COLUMNS) == 21
    assert LABEL_SCHEMA.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert LABEL_SCHEMA.field("frame_timestamps_s").type == pa.list_(pa.float64())
    for name in ("clip_index", "width", "height", "num_prompt_tokens", "num_generated_tokens"):
        assert LABEL_SCHEMA.field(name).type == pa.int32(), name
    assert not LABEL_SCHEMA.field("row_id").nullable and LABEL_SCHEMA.field("text").nullable


def test_parquet_round_trip_keeps_types_values_and_metadata(tmp_path):
    """Guards against types lost on write (int32 -> int64, tz dropped) and metadata not saved."""
    table = table_from_rows([ok_row(), video_row(), error_row()])
    meta = metadata("tiny-shapes", {"max_new_tokens": 32, "temperature": 0.0}, "job-1")
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "part.parquet")
    back = pq.read_table(tmp_path / "part.parquet")
    assert back.schema.equals(LABEL_SCHEMA)  # names, types and nullability
    assert back.to_pylist() == table.to_pylist()
    assert back.column("created_at")[0].as_py() == NOW
    info = read_metadata(back.schema.metadata)
    assert info == {"schema_version": SCHEMA_VERSION, "model": "tiny-shapes", "job_id": "job-1",
                    "generation": {"max_new_tokens": 32, "temperature": 0.0}}


def test_all_error_batch_keeps_typed_columns():
    """Guards against the inferred-schema bug: an all-null column written as type `null`."""
    table = table_from_rows([error_row(), error_row()])
    assert table.schema.field("text").type == pa.string()
    assert table.schema.field("frame_timestamps_s").type == pa.list_(pa.float64())
    assert table.column("text").null_count == 2


@pytest.mark.parametrize("change, column", [
    (lambda r: r.pop("model"), "model"),
    (lambda r: r.update(extra=1), "extra"),
    (lambda r: r.update(uri=None), "uri"),
    (lambda r: r.update(status="fine"), "status"),
    (lambda r: r.update(error_stage="upload", status=ERROR, text=None, error="x"), "error_stage"),
    (lambda r: r.update(status=ERROR, error_stage="decode", error="bad"), "text"),
    (lambda r: r.update(error="oops"), "error"),
    (lambda r: r.update(status=ERROR, text=None), "error_stage"),
    (lambda r: r.update(text=None), "text"),
])
def test_strict_rows_raise_naming_the_column(change, column):
    """Guards against silently writing rows that break the contract (missing/unknown
    columns, nulls where required, text/error not matching the status)."""
    row = ok_row()
    change(row)
    with pytest.raises(ValueError, match=repr(column)):
        table_from_rows([ok_row(), row])


def test_ids_are_stable_and_distinct():
    """Guards against ids that change between runs (breaks resume) or collide across clips/prompts."""
    uri = "s3://bucket/images/cat 1.jpg"
    assert item_id(uri) == hashlib.sha1(uri.encode()).hexdigest()[:20]
    assert item_id(uri) != item_id(uri + " ")
    iid = item_id(uri)
    ids = {row_id(iid, c, p, t) for c in (None, 0, 1) for p in ("describe the image.", "how many?")
           for t in ("caption", "vqa")}
    assert len(ids) == 12 and all(len(i) == 24 for i in ids)
    assert row_id(iid, 0, "q", "vqa") == row_id(iid, 0, "q", "vqa")


@pytest.mark.parametrize("uri, kind", [
    ("s3://b/a.JPG", "image"), ("/data/x y/ü.tiff", "image"), ("gs://b/c.webp", "image"),
    ("https://h/p/v.mp4?sig=abc#t=1", "video"), ("file:///v/clip.MKV", "video"), ("b/m.m4v", "video"),
    ("s3://b/notes.txt", "unknown"), ("s3://b/dir.jpg/file", "unknown"), ("s3://b/noext", "unknown"),
])
def test_media_type_from_name(uri, kind):
    """Guards against case-sensitive extensions and query strings hiding the type."""
    assert media_type_from_name(uri) == kind


def test_manifest_items_fit_the_manifest_schema():
    """Guards against make_item producing items the manifest schema cannot hold, or bad prompts passing."""
    items = [make_item("s3://b/a.png", [{"task": "caption", "prompt": "describe the image."}]),
             make_item("s3://b/v.mov", [{"task": "vqa", "prompt": "how many objects are there?"},
                                         {"task": "caption", "prompt": "describe the video."}])]
    table = pa.Table.from_pylist(items, schema=MANIFEST_SCHEMA)
    assert table.column("media_type").to_pylist() == ["image", "video"]
    assert items[0]["item_id"] == item_id("s3://b/a.png")
    with pytest.raises(ValueError, match="no prompts"):
        make_item("s3://b/a.png", [])
    with pytest.raises(ValueError, match="bad prompt"):
        make_item("s3://b/a.png", [{"task": "summarise", "prompt": "x"}])
