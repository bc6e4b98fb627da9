"""The input contract: one item per source file, as the listing writes it (ITEM_SCHEMA).

An item is `{item_id, uri, media_type, prompts: [{task, prompt}, ...], error}`, built by
`make_item` only. `media_type` comes from the file name (or a manifest column); the decoder
also sniffs the content and may correct it (a `.jpg` that is really an MP4 decodes as video).
The listing adds two bookkeeping columns (never written to the output): SHARD, the listing shard
the item belongs to (its rows are committed to that shard's part files), and DONE_GROUPS, the clip
groups of a video that an earlier run committed (the split stage leaves them out).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pyarrow as pa

from schemas.rows import CAPTION, IMAGE, TASKS, UNKNOWN, VIDEO, item_id

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "gif", "webp", "bmp", "tif", "tiff"})
VIDEO_EXTENSIONS = frozenset({"mp4", "mov", "mkv", "webm", "avi", "m4v"})
MANIFEST_EXTS = (".jsonl", ".csv", ".parquet")  # an INPUT ending so is a manifest (a `uri` column), not media

PROMPT_TYPE = pa.struct([
    pa.field("task", pa.string(), nullable=False),  # caption / vqa
    pa.field("prompt", pa.string()),  # null (caption only): the model's default prompt for the media type
    # null: free text; else the JSON of a lavi.serving.constrain.Constraint ({"choices": [...]} or {"json_schema": {...}})
    pa.field("constraint", pa.string()),
])

SHARD = "_shard"  # the item's listing shard, "<position, 6 digits>-<key, 8 hex>" (pipeline.listing)
DONE_GROUPS = "_done_groups"  # a video's clip groups committed by an earlier run; null: none

ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("media_type", pa.string(), nullable=False),  # image / video / unknown
        pa.field("prompts", pa.list_(PROMPT_TYPE), nullable=False),
        pa.field("error", pa.string()),  # set: refused when listed; the item becomes error rows of stage "list"
        pa.field(SHARD, pa.string()),
        pa.field(DONE_GROUPS, pa.list_(pa.int32())),
    ]
)


def media_type_from_name(uri: str) -> str:
    """'image', 'video' or 'unknown' from the extension (case-insensitive) of the uri's path."""
    path = uri
    if uri.startswith(("http://", "https://")):
        path = urlsplit(uri).path  # drop ?query and #fragment
    name = path.rstrip("/").rsplit("/", 1)[-1]
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext in IMAGE_EXTENSIONS:
        return IMAGE
    if ext in VIDEO_EXTENSIONS:
        return VIDEO
    return UNKNOWN


def make_item(uri: str, prompts: list[dict], media_type: str | None = None, error: str | None = None) -> dict:
    """An item of ITEM_SCHEMA for `uri`: prompts are [{"task": "caption"|"vqa", "prompt": str}, ...], each with an
    optional "constraint" (the JSON text of a lavi.serving.constrain.Constraint; None or absent: free text).

    A caption prompt may be None (the model's default prompt for the decoded media type).
    `media_type` None: from the file name. `error`: the item was refused when listed."""
    if not prompts:
        raise ValueError(f"item {uri!r} has no prompts: give at least one {{task, prompt}}")
    for p in prompts:
        if (not {"task", "prompt"} <= set(p) <= {"task", "prompt", "constraint"} or p["task"] not in TASKS
                or not (isinstance(p["prompt"], str) or (p["prompt"] is None and p["task"] == CAPTION))):
            raise ValueError(f"bad prompt {p!r} for {uri!r}: expected {{'task': one of {TASKS}, 'prompt': str}} "
                             "(prompt None: the default caption prompt)")
    return {
        "item_id": item_id(uri),
        "uri": uri,
        "media_type": media_type or media_type_from_name(uri),
        "prompts": [{"task": p["task"], "prompt": p["prompt"], "constraint": p.get("constraint")} for p in prompts],
        "error": error,
    }
