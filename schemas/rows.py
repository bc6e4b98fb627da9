"""The output contract: one row per (item, clip, prompt), as an explicit Arrow schema.

Every writer passes `LABEL_SCHEMA` (with `metadata(...)` attached) to Parquet; nothing is
inferred. `table_from_rows` is strict: a missing or unknown column, a null in a required
column or a row that breaks the status rules raises `ValueError` naming the column.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

SCHEMA_VERSION = "1"

# status values
OK = "ok"
TRUNCATED = "truncated"  # generation hit max_new_tokens; text is kept
ERROR = "error"
STATUSES = (OK, TRUNCATED, ERROR)

# error stages: where an item's rows failed
LIST = "list"  # refused when listed (a vqa item with no questions); never fetched
READ = "read"  # the bytes could not be read (missing, forbidden, too large, unreachable)
DECODE = "decode"  # the bytes are not a decodable image or video (or the decoder hung or crashed)
INFER = "infer"  # the model failed on the clip's batch
STAGES = (LIST, READ, DECODE, INFER)
MAX_ERROR_CHARS = 500  # error messages are cut to this length in rows

# tasks
CAPTION = "caption"
VQA = "vqa"
TASKS = (CAPTION, VQA)

# media types that appear in rows ("unknown" only on error rows whose type could not be told)
IMAGE = "image"
VIDEO = "video"
UNKNOWN = "unknown"
MEDIA_TYPES = (IMAGE, VIDEO, UNKNOWN)

LABEL_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("media_type", pa.string(), nullable=False),
        pa.field("clip_index", pa.int32()),  # null for images
        pa.field("clip_start_s", pa.float64()),  # null for images
        pa.field("clip_end_s", pa.float64()),  # null for images
        pa.field("frame_timestamps_s", pa.list_(pa.float64())),  # null for images and errors
        pa.field("width", pa.int32()),  # decoded size (after EXIF rotation); null on read errors
        pa.field("height", pa.int32()),
        pa.field("task", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("text", pa.string()),  # null unless status is ok or truncated
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_stage", pa.string()),  # null when ok
        pa.field("error", pa.string()),  # null when ok
        pa.field("num_prompt_tokens", pa.int32()),  # null when inference never ran
        pa.field("num_generated_tokens", pa.int32()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
COLUMNS = tuple(LABEL_SCHEMA.names)

_META_PREFIX = "lavi_label."


def _hex(text: str, n: int) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def item_id(uri: str) -> str:
    """Stable id of an input: the first 20 hex chars of sha1(uri), of the exact uri string."""
    return _hex(uri, 20)


def row_id(item_id: str, clip_index: int | None, prompt: str, task: str, constraint: str | None = None) -> str:
    """Stable id of an output row: 24 hex chars of sha1 over (item_id, clip, task, prompt), and the prompt's
    constraint when it has one (the same question asked free and constrained gives two rows)."""
    key = [item_id, clip_index, task, prompt] + ([constraint] if constraint is not None else [])
    return _hex(json.dumps(key, ensure_ascii=False), 24)


def error_columns(stage: str, message: str) -> dict:
    """The status columns of a row that failed at `stage`: {status, error_stage, error}.

    The one constructor of error rows: decode's clip rows and the labeler's output rows
    both take their failure through it. Raises ValueError on an unknown stage."""
    if stage not in STAGES:
        raise ValueError(f"error stage {stage!r} is not one of {STAGES}")
    return {"status": ERROR, "error_stage": stage, "error": message[:MAX_ERROR_CHARS]}


def _check_row(i: int, row: dict) -> None:
    keys = set(row)
    for name in COLUMNS:
        if name not in keys:
            raise ValueError(f"row {i}: missing column {name!r}")
    for name in keys:
        if name not in LABEL_SCHEMA.names:
            raise ValueError(f"row {i}: unknown column {name!r}")
    for field in LABEL_SCHEMA:
        if not field.nullable and row[field.name] is None:
            raise ValueError(f"row {i}: column {field.name!r} may not be null")
    status = row["status"]
    if status not in STATUSES:
        raise ValueError(f"row {i}: column 'status' is {status!r}, expected one of {STATUSES}")
    if row["error_stage"] is not None and row["error_stage"] not in STAGES:
        raise ValueError(f"row {i}: column 'error_stage' is {row['error_stage']!r}, expected one of {STAGES}")
    if row["media_type"] not in MEDIA_TYPES:
        raise ValueError(f"row {i}: column 'media_type' is {row['media_type']!r}, expected one of {MEDIA_TYPES}")
    if status == ERROR:
        for name in ("error_stage", "error"):
            if row[name] is None:
                raise ValueError(f"row {i}: column {name!r} is required when status is error")
        if row["text"] is not None:
            raise ValueError(f"row {i}: column 'text' must be null when status is error")
    else:
        if row["text"] is None:
            raise ValueError(f"row {i}: column 'text' is required when status is {status}")
        if status == OK and (row["error_stage"] is not None or row["error"] is not None):
            raise ValueError(f"row {i}: column 'error' must be null when status is ok")


def table_from_rows(rows: list[dict]) -> pa.Table:
    """Rows (dicts with exactly the LABEL_SCHEMA columns) -> a table of LABEL_SCHEMA.

    Raises ValueError naming the column on a missing/unknown column, a null in a required
    column, an unknown status/stage/media type, or text/error not matching the status.
    `created_at` takes tz-aware datetimes (naive ones are read as UTC).
    """
    for i, row in enumerate(rows):
        _check_row(i, row)
    return pa.Table.from_pylist(rows, schema=LABEL_SCHEMA)


def metadata(model: str, generation: dict, job_id: str) -> dict[bytes, bytes]:
    """Parquet schema metadata: schema version, model, job id, generation settings (JSON)."""
    return {
        f"{_META_PREFIX}schema_version".encode(): SCHEMA_VERSION.encode(),
        f"{_META_PREFIX}model".encode(): model.encode("utf-8"),
        f"{_META_PREFIX}job_id".encode(): job_id.encode("utf-8"),
        f"{_META_PREFIX}generation".encode(): json.dumps(generation, sort_keys=True).encode("utf-8"),
    }


def read_metadata(meta: dict[bytes, bytes] | None) -> dict:
    """Inverse of `metadata` on a read schema's metadata: {schema_version, model, job_id, generation}."""
    meta = meta or {}
    out = {}
    for key, value in meta.items():
        name = key.decode("utf-8")
        if name.startswith(_META_PREFIX):
            out[name[len(_META_PREFIX):]] = value.decode("utf-8")
    if "generation" in out:
        out["generation"] = json.loads(out["generation"])
    return out
