"""The output and manifest contracts: strict columns, stable ids, Parquet round trips."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.manifest import ITEM_SCHEMA, make_item, media_type_from_name
from schemas.rows import (
    COLUMNS, ERROR, LABEL_SCHEMA, OK, SCHEMA_VERSION, STAGES, error_columns, item_id, metadata, read_metadata, row_id,
    table_from_rows,
)

ROOT = Path(__file__).parents[1]
DESIGN = Path(__file__).parents[2] / "shared" / "DESIGN.md"  # CI keeps a copy of shared/ beside the clone
DOC_TYPES = {"string": pa.string(), "int32": pa.int32(), "float64": pa.float64(),
             "list<float64>": pa.list_(pa.float64()), "timestamp[us, UTC]": pa.timestamp("us", tz="UTC")}

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


def output_table(markdown: str) -> list[tuple[str, pa.DataType]]:
    """(column, type) pairs of the `| column | type | notes |` table: a row names one or more columns
    (`width, height`) with one type for all or one type each (`int32, float64, float64`)."""
    lines = markdown.split("| column | type | notes |", 1)[1].splitlines()[2:]
    pairs = []
    for line in lines:
        if not line.startswith("|"):
            break
        names_cell, types_cell = (c.strip() for c in line.strip("|").split("|")[:2])
        names = [n.strip() for n in names_cell.split(",")]
        types = [t.strip() for t in re.split(r",\s*(?![^\[]*\])", types_cell)]  # not inside [...]
        assert len(types) in (1, len(names)), line
        for name, kind in zip(names, types * len(names) if len(types) == 1 else types):
            assert kind in DOC_TYPES, f"unknown type {kind!r} for {name!r} in the table"
            pairs.append((name, DOC_TYPES[kind]))
    return pairs


@pytest.mark.parametrize("doc", ["docs/run.md", "DESIGN.md"])
def test_schema_has_the_design_columns_and_types(doc):
    """Guards against drift between the output-schema tables (DESIGN.md's, docs/run.md's) and the schema writers
    use: the same column names in the same order, each with the documented Arrow type."""
    path = ROOT / doc if doc != "DESIGN.md" else DESIGN
    if not path.exists():
        pytest.skip(f"{path} is absent (shared/ is not beside this clone)")
    documented = output_table(path.read_text())
    assert [n for n, _ in documented] == list(COLUMNS)
    for name, kind in documented:
        assert LABEL_SCHEMA.field(name).type == kind, name
    assert not LABEL_SCHEMA.field("row_id").nullable and LABEL_SCHEMA.field("text").nullable


def test_error_columns_are_the_one_error_row_constructor():
    """Guards against error rows with a stage the contract does not know, or unbounded messages in rows."""
    assert STAGES == ("list", "read", "decode", "infer")
    assert error_columns("list", "no questions") == {"status": ERROR, "error_stage": "list", "error": "no questions"}
    assert len(error_columns("infer", "x" * 10_000)["error"]) == 500
    with pytest.raises(ValueError, match="upload"):
        error_columns("upload", "x")


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
    assert row_id(iid, 0, "q", "vqa") == hashlib.sha1(json.dumps([iid, 0, "vqa", "q"]).encode()).hexdigest()[:24]


@pytest.mark.parametrize("uri, kind", [
    ("s3://b/a.JPG", "image"), ("/data/x y/ü.tiff", "image"), ("gs://b/c.webp", "image"),
    ("https://h/p/v.mp4?sig=abc#t=1", "video"), ("file:///v/clip.MKV", "video"), ("b/m.m4v", "video"),
    ("s3://b/notes.txt", "unknown"), ("s3://b/dir.jpg/file", "unknown"), ("s3://b/noext", "unknown"),
])
def test_media_type_from_name(uri, kind):
    """Guards against case-sensitive extensions and query strings hiding the type."""
    assert media_type_from_name(uri) == kind


def test_manifest_items_fit_the_item_schema():
    """Guards against make_item producing items the item schema cannot hold, or bad prompts passing."""
    items = [make_item("s3://b/a.png", [{"task": "caption", "prompt": "describe the image."}]),
             make_item("s3://b/v.mov", [{"task": "vqa", "prompt": "how many objects are there?"},
                                         {"task": "caption", "prompt": "describe the video."}])]
    table = pa.Table.from_pylist(items, schema=ITEM_SCHEMA)
    assert table.column("media_type").to_pylist() == ["image", "video"]
    assert items[0]["item_id"] == item_id("s3://b/a.png")
    with pytest.raises(ValueError, match="no prompts"):
        make_item("s3://b/a.png", [])
    with pytest.raises(ValueError, match="bad prompt"):
        make_item("s3://b/a.png", [{"task": "summarise", "prompt": "x"}])
    with pytest.raises(ValueError, match="bad prompt"):  # only a caption may take the default prompt
        make_item("s3://b/a.png", [{"task": "vqa", "prompt": None}])
    assert make_item("s3://b/a.png", [{"task": "caption", "prompt": None}], "video", error="e")["media_type"] == "video"
