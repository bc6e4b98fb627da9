"""The CPU stage: item -> bytes -> frames at the model's input size, one row per clip.

`decode_batch` is the Ray Data stage (ITEM_SCHEMA items -> CLIP_SCHEMA clips); it calls
`fetch_and_decode` per item. Neither raises for bad input: an item refused when listed, a
failed read or a failed decode gives ONE error row for the item (status="error", error_stage
"list", "read" or "decode", a readable message). Every row has the same keys
(schemas.clips.DECODED_KEYS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from schemas.clips import CLIP_SCHEMA, DECODED_KEYS, ITEM_ROWS
from schemas.manifest import media_type_from_name
from schemas.rows import DECODE, IMAGE, LIST, OK, READ, UNKNOWN, VIDEO, error_columns
from workers.fetch import FetchError, fetch_bytes
from workers.frames import Clip, DecodedImage, DecodedVideo, DecodeError  # noqa: F401 (re-exported)
from workers.image import decode_image
from workers.isolate import IsolationError, run_isolated
from workers.video import decode_video

@dataclass(frozen=True)
class DecodeSettings:
    image_size: int  # the model's square input side S
    frames_per_clip: int = 8
    clip_seconds: float = 0.0  # 0: the whole video is one clip
    max_clips: int | None = None  # keep the first N clips of a video
    # Pixel limit checked on the header before decoding: 2**26 (~67 MP) admits 64 MP phone
    # photos (9248x6936) and 8K frames; one such image is ~200 MB as RGB.
    max_pixels: int = 2**26
    max_bytes: int | None = 1 << 30  # bigger files are refused at read time
    timeout_s: float = 60.0  # per item decode, in the isolated child
    retries: int = 3  # read retries on transient errors
    storage_options: dict = field(default_factory=dict)  # fsspec options (credentials stay out of rows)
    isolate: bool = True  # False: decode in this process (debugging; no timeout or crash guard)
    # The model's input contract for images: None, one image_size square; LLaVA-OneVision's anyres grid
    # resolutions (height, width): the base view and the grid's image_size tiles (lavi.anyres.anyres_tiles). A tile
    # count is bounded by the largest pinpoint, so an item's memory stays bounded too.
    pinpoints: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.frames_per_clip < 1:
            raise ValueError(f"frames_per_clip must be >= 1, got {self.frames_per_clip}")
        if self.clip_seconds < 0:
            raise ValueError(f"clip_seconds must be >= 0 (0 = one clip per video), got {self.clip_seconds}")
        if self.max_clips is not None and self.max_clips < 1:
            raise ValueError(f"max_clips must be None or >= 1, got {self.max_clips}")
        if self.max_pixels < 1 or self.timeout_s <= 0 or self.retries < 0:
            raise ValueError("max_pixels must be >= 1, timeout_s > 0 and retries >= 0")


def sniff_media_type(data: bytes) -> str | None:
    """'image' or 'video' from the magic bytes, or None when the content is not recognised."""
    head = data[:16]
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")):
        return IMAGE
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return IMAGE
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return VIDEO
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis"):
        return IMAGE  # HEIF/AVIF stills: PIL refuses them as "not an image" without a plugin
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return VIDEO  # ISO BMFF / QuickTime (mp4, mov, m4v)
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return VIDEO  # Matroska / WebM
    return None


def _row(item: dict, media_type: str, frames: np.ndarray, **fields) -> dict:
    row = dict.fromkeys(DECODED_KEYS)
    row.update(item_id=item["item_id"], uri=item["uri"], media_type=media_type,
               prompts=item.get("prompts"), frames=frames, status=OK)
    row.update(fields)
    return row


def error_row(item: dict, stage: str, message: str, image_size: int, media_type: str | None = None) -> dict:
    """The one row of an item that failed at `stage` ("list" / "read" / "decode")."""
    media = media_type or item.get("media_type") or media_type_from_name(item["uri"])
    empty = np.zeros((0, image_size, image_size, 3), np.uint8)  # same dtype/rank as real frames
    return _row(item, media, empty, **error_columns(stage, message))


def _decode_as(kind: str, data: bytes, s: DecodeSettings) -> DecodedImage | DecodedVideo:
    if kind == IMAGE:
        return decode_image(data, s.image_size, s.max_pixels, s.pinpoints)
    return decode_video(data, s.image_size, s.frames_per_clip, s.clip_seconds, s.max_clips, s.max_pixels)


def decode_item(item: dict, settings: DecodeSettings, data: bytes) -> list[dict]:
    """Bytes of one item -> rows: one per clip (an image: one, clip_index None), or one error row.

    The media type comes from the content when its magic bytes are known (a .jpg that is
    an MP4 decodes as video), else from the name; unknown both ways: image, then video.
    """
    declared = item.get("media_type") or media_type_from_name(item["uri"])
    if not data:
        return [error_row(item, DECODE, "empty file", settings.image_size, declared)]
    sniffed = sniff_media_type(data)
    kind = sniffed or declared
    try:
        if kind in (IMAGE, VIDEO):
            out = _decode_as(kind, data, settings)
        else:
            try:
                kind, out = IMAGE, _decode_as(IMAGE, data, settings)
            except DecodeError:
                kind, out = VIDEO, _decode_as(VIDEO, data, settings)
    except DecodeError as err:
        if sniffed is None and declared == UNKNOWN:
            return [error_row(item, DECODE, f"unrecognised media: neither image nor video ({err})",
                              settings.image_size, UNKNOWN)]
        return [error_row(item, DECODE, str(err), settings.image_size, kind)]
    if isinstance(out, DecodedImage):
        return [_row(item, IMAGE, out.frames, width=out.width, height=out.height)]
    return [
        _row(item, VIDEO, clip.frames, clip_index=clip.index, clip_start_s=clip.start_s, clip_end_s=clip.end_s,
             frame_timestamps_s=clip.timestamps_s, width=out.width, height=out.height)
        for clip in out.clips
    ]


def fetch_and_decode(
    item: dict,
    settings: DecodeSettings,
    decoder: Callable[[dict, DecodeSettings, bytes], list[dict]] = decode_item,
) -> list[dict]:
    """Manifest item -> decoded rows (see `decode_item`); never raises for bad input.

    Reads with retries (failures: one error row, stage "read"), then decodes in the
    process's isolated child with settings.timeout_s (a hang or crash: one error row,
    stage "decode"; the next item gets a fresh child). `decoder` must be a module-level
    function with decode_item's signature.
    """
    try:
        data = fetch_bytes(item["uri"], settings.storage_options, settings.retries, settings.max_bytes)
    except FetchError as err:
        return [error_row(item, READ, str(err), settings.image_size)]
    if not settings.isolate:
        return decoder(item, settings, data)
    try:
        return run_isolated(decoder, item, settings, data, timeout_s=settings.timeout_s)
    except IsolationError as err:
        return [error_row(item, DECODE, str(err), settings.image_size)]


def decode_batch(items: pa.Table, settings: DecodeSettings) -> pa.Table:
    """Items (schemas.manifest.ITEM_SCHEMA) -> decoded clips (schemas.clips.CLIP_SCHEMA), with ITEM_ROWS.

    An item refused when listed (its `error` set, e.g. a vqa item without questions) is not
    fetched: it gives one error row of stage "list"."""
    out: list[dict] = []
    for item in items.to_pylist():
        if item.get("error"):
            rows = [error_row(item, LIST, item["error"], settings.image_size)]
        else:
            rows = fetch_and_decode(item, settings)
        n = len(rows) * len(item["prompts"])
        for row in rows:
            frames = np.ascontiguousarray(row.pop("frames"))
            row.update(frames=frames.tobytes(), frame_shape=list(frames.shape), prompts=item["prompts"])
            row[ITEM_ROWS] = n
            out.append(row)
    return pa.Table.from_pylist(out, schema=CLIP_SCHEMA)
