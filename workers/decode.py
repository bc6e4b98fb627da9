"""Whole-item decoding: item -> bytes -> frames at the model's input size (DecodeSettings: a square side, anyres
tiles or dynamic resolution), one row per clip.

`fetch_and_decode` reads an item whole and decodes it (images; a video whose header the probe cannot read, for
the whole-file decoders to recover what they can; and the callers that want one item's frames: the report, the
benchmarks, training data). The pipeline's own video path streams instead: workers.split probes and cuts a video
into clip groups, workers.units decodes each by seeking (its `decode_batch` runs both stages on a batch of items).
Nothing here raises for bad input: an item refused when listed, a failed read or a failed decode gives ONE error
row for the item (status="error", error_stage "list", "read" or "decode", a readable message). Every row has the
same keys (schemas.clips.DECODED_KEYS).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from schemas.clips import DECODED_KEYS
from schemas.manifest import media_type_from_name
from schemas.rows import DECODE, IMAGE, OK, READ, UNKNOWN, VIDEO, error_columns
from workers.fetch import FetchError, fetch_bytes
from workers.stream import Reads
from workers.frames import Clip, DecodedImage, DecodedVideo, DecodeError, sniff_media_type  # noqa: F401 (re-exported)
from workers.dynamic import video_fit
from workers.image import decode_image
from workers.isolate import IsolationError, run_isolated
from workers.settings import DecodeSettings  # noqa: F401 (re-exported)
from workers.video import decode_video


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
        return decode_image(data, s.image_size, s.max_pixels, s.pinpoints, s.dynamic.image if s.dynamic else None)
    return decode_video(data, video_fit(s), s.frames_per_clip, s.clip_seconds, s.max_clips, s.max_pixels)


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
    """Manifest item -> decoded rows (see `decode_item`), the whole file read into memory; never raises for bad
    input.

    Reads with retries (failures: one error row, stage "read"; a file over settings.whole_file_bytes is one too),
    then decodes in the process's isolated child with settings.timeout_s (a hang or crash: one error row,
    stage "decode"; the next item gets a fresh child). `decoder` must be a module-level function with
    decode_item's signature. The pipeline streams long videos instead (workers.split, workers.units)."""
    return read_and_decode(item, settings, decoder)[0]


Decoder = Callable[[dict, DecodeSettings, bytes], list[dict]]


def read_and_decode(item: dict, settings: DecodeSettings, decoder: Decoder = decode_item) -> tuple[list[dict], Reads]:
    """`fetch_and_decode`, and what it read (bytes, fetches retried)."""
    data, read = fetch_item(item, settings)
    if isinstance(data, list):
        return data, read
    return decode_fetched(item, settings, data, decoder), read


def fetch_item(item: dict, settings: DecodeSettings) -> tuple[bytes | list[dict], Reads]:
    """An item's bytes, read whole with retries, and what that cost; a failed read gives its one error row
    instead (a list)."""
    retried = [0]
    try:
        data = fetch_bytes(item["uri"], settings.storage_options, settings.retries, settings.whole_file_bytes,
                           on_retry=lambda: retried.__setitem__(0, retried[0] + 1))
    except FetchError as err:
        return [error_row(item, READ, str(err), settings.image_size)], Reads(0, retried[0])
    return data, Reads(len(data), retried[0])


def decode_fetched(item: dict, settings: DecodeSettings, data: bytes, decoder: Decoder = decode_item) -> list[dict]:
    """Decode an item's bytes: an image (by its magic bytes, or by name when they say nothing) in this process,
    where PIL's guards suffice (the pixel count checked on the header, decompression bombs refused before any
    pixel is decoded); anything else (video decoders are reported to hang and crash on files in the wild) in the
    process's isolated child with settings.timeout_s (a hang or crash: one error row, stage "decode")."""
    if not settings.isolate or (decoder is decode_item and _is_image(item, data)):
        return decoder(item, settings, data)
    try:
        return run_isolated(decoder, item, settings, data, timeout_s=settings.timeout_s)
    except IsolationError as err:
        return [error_row(item, DECODE, str(err), settings.image_size)]


def _is_image(item: dict, data: bytes) -> bool:
    """Whether decode_item would decode these bytes as an image only (never as a video)."""
    if not data:
        return True  # an error row, no decoder
    sniffed = sniff_media_type(data)
    return sniffed == IMAGE or (sniffed is None and
                                (item.get("media_type") or media_type_from_name(item["uri"])) == IMAGE)


def fetch_window(items: list[dict], settings: DecodeSettings, window: int = 8):
    """(item, bytes or its error row, Reads) for each item in order, with up to `window` reads in flight on a
    thread pool (object stores answer each read after a round trip: reading one after another would leave a
    decode task waiting), and no more than `window` items' bytes held at once."""
    from concurrent.futures import ThreadPoolExecutor

    if len(items) <= 1:
        yield from ((item, *fetch_item(item, settings)) for item in items)
        return
    with ThreadPoolExecutor(max_workers=min(window, len(items)), thread_name_prefix="lavi-fetch") as pool:
        pending = [pool.submit(fetch_item, item, settings) for item in items[:window]]
        for i, item in enumerate(items):
            data, read = pending[i].result()
            pending[i] = None  # its bytes go with the decode
            if i + window < len(items):
                pending.append(pool.submit(fetch_item, items[i + window], settings))
            yield item, data, read

