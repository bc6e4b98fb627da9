"""The input contract: one manifest item per source file.

An item is `{item_id, uri, media_type, prompts: [{task, prompt}, ...]}`. `media_type` comes
from the file name here; the decoder also sniffs the content and may correct it (a `.jpg`
that is really an MP4 decodes as video).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pyarrow as pa

from schemas.rows import IMAGE, TASKS, UNKNOWN, VIDEO, item_id

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "gif", "webp", "bmp", "tif", "tiff"})
VIDEO_EXTENSIONS = frozenset({"mp4", "mov", "mkv", "webm", "avi", "m4v"})

PROMPT_TYPE = pa.struct([
    pa.field("task", pa.string(), nullable=False),  # caption / vqa
    pa.field("prompt", pa.string(), nullable=False),
])

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("media_type", pa.string(), nullable=False),  # image / video / unknown
        pa.field("prompts", pa.list_(PROMPT_TYPE), nullable=False),
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


def make_item(uri: str, prompts: list[dict]) -> dict:
    """A manifest item for `uri`; prompts are [{"task": "caption"|"vqa", "prompt": str}, ...]."""
    if not prompts:
        raise ValueError(f"item {uri!r} has no prompts: give at least one {{task, prompt}}")
    for p in prompts:
        if set(p) != {"task", "prompt"} or p["task"] not in TASKS or not isinstance(p["prompt"], str):
            raise ValueError(f"bad prompt {p!r} for {uri!r}: expected {{'task': one of {TASKS}, 'prompt': str}}")
    return {
        "item_id": item_id(uri),
        "uri": uri,
        "media_type": media_type_from_name(uri),
        "prompts": [{"task": p["task"], "prompt": p["prompt"]} for p in prompts],
    }
