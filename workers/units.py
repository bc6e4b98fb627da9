"""The decode stage: decode tasks (schemas.clips.TASK_SCHEMA) -> decoded clips (CLIP_SCHEMA), one row per clip.

`decode_units` is the Ray Data stage, a generator over its tasks' units. A task's WHOLE and FAILED units (a split
batch's images) are read with a few reads in flight (workers.decode.fetch_window) and decoded one by one, yielding
one table (a new one each time its frames pass BLOCK_BYTES); its clip groups (a split batch's short videos, or one
group of a long video) follow, each in tables of at most clips_per_group clips, so a task never holds more than
that many clips' frames beside the images' (a shots window may give more clips than that). By kind:
  FAILED  one error row (its stage and message from the split stage);
  WHOLE   read whole and decoded in memory (workers.decode.decode_fetched: images in this process, anything
          else in the isolated child);
  CLIPS   its clips decoded by seeking (workers.seek.decode_group), one isolated call with the timeout;
  SHOTS   the window's shot changes found (workers.shots.detect_cuts, one isolated call), its clips bounded
          (shot_clips) and numbered from the window's first index, then decoded clips_per_group per call.
A group that fails gives error rows for its clips (stage read or decode), never a failed task. Each row carries
the unit's bookkeeping (schemas.clips.BOOKKEEPING): its rows in all, its group, the bytes read for it and the
fetches retried (every read is retried on transient errors: workers.fetch, workers.stream).
`decode_batch` runs the split stage and this one on a batch of items in one process.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from schemas.clips import BYTES_READ, CLIP_SCHEMA, CLIPS, FAILED, GROUP, GROUPS, ITEM_ROWS, READ_RETRIES, SHOTS, WHOLE
from schemas.manifest import SHARD
from schemas.rows import DECODE, OK, READ, VIDEO, error_columns
from workers.decode import decode_fetched, error_row, fetch_window, read_and_decode
from workers.dynamic import video_fit
from workers.fetch import FetchError
from workers.frames import DecodeError
from workers.isolate import IsolationError, guarded
from workers.seek import decode_group
from workers.settings import BLOCK_BYTES, DecodeSettings
from workers.shots import THRESHOLD, detect_cuts, shot_clips
from workers.split import split_batch
from workers.stream import Reads, fetch_limit

Span = tuple[int, float, float]  # (clip index, start_s, end_s)


def decode_units(tasks: pa.Table, settings: DecodeSettings) -> Iterator[pa.Table]:
    """Decode tasks -> CLIP_SCHEMA tables (see the module doc); never raises for bad input."""
    for task in tasks.column("units").to_pylist():
        whole = [u for u in task if u["unit"] in (WHOLE, FAILED)]
        if whole:
            yield from _whole_units(whole, settings)
        for u in task:
            if u["unit"] in (CLIPS, SHOTS):
                yield from decode_unit(u, settings)


def decode_batch(items: pa.Table, settings: DecodeSettings) -> pa.Table:
    """Items (schemas.manifest.ITEM_SCHEMA) -> decoded clips (schemas.clips.CLIP_SCHEMA), with the bookkeeping
    columns: the pipeline's split stage (workers.split) and this decode stage run one after the other here.

    An item refused when listed (its `error` set, e.g. a vqa item without questions) is not
    fetched: it gives one error row of stage "list"."""
    tables = list(decode_units(split_batch(items, settings), settings))
    return pa.concat_tables(tables) if tables else CLIP_SCHEMA.empty_table()


def _whole_units(units: list[dict], settings: DecodeSettings) -> Iterator[pa.Table]:
    """A task of WHOLE and FAILED units: tables of their rows, a new one once a table's frames pass BLOCK_BYTES (a
    unit's rows are never split), so a task of many images at a dynamic resolution (up to ~38 MB each at 12.8 MP)
    never holds them all at once; square models' images stay one table."""
    out = [row for u in units if u["unit"] == FAILED
           for row in _with_bookkeeping(u, [error_row(u, u["error_stage"], u["error"], settings.image_size)], 1,
                                        _probed(u))]
    held = 0
    wholes = [u for u in units if u["unit"] == WHOLE]
    for u, data, read in fetch_window(wholes, settings):
        rows = data if isinstance(data, list) else decode_fetched(u, settings, data)
        rows = _with_bookkeeping(u, rows, len(rows), _probed(u) + read)
        out += rows
        held += sum(len(r["frames"]) for r in rows)
        if held >= BLOCK_BYTES:
            yield pa.Table.from_pylist(out, schema=CLIP_SCHEMA)
            out, held = [], 0
    if out:
        yield pa.Table.from_pylist(out, schema=CLIP_SCHEMA)


def decode_unit(u: dict, settings: DecodeSettings) -> Iterator[pa.Table]:
    """One unit's clips, in tables of at most clips_per_group clips."""
    kind = u["unit"]
    if kind == FAILED:
        yield _table(u, [error_row(u, u["error_stage"], u["error"], settings.image_size)], 1, _probed(u))
    elif kind == WHOLE:
        rows, read = read_and_decode(u, settings)
        yield _table(u, rows, len(rows), _probed(u) + read)
    elif kind == CLIPS:
        spans = [(c["index"], c["start_s"], c["end_s"]) for c in u["clips"]]
        rows, read = _decode_spans(u, spans, settings)
        yield _table(u, rows, len(rows), _probed(u) + read)
    elif kind == SHOTS:
        yield from _decode_window(u, settings)
    else:
        raise ValueError(f"unknown unit kind {kind!r}")


def _decode_window(u: dict, settings: DecodeSettings) -> Iterator[pa.Table]:
    """A SHOTS unit: detect, bound, then decode its clips a group at a time."""
    window = u["clips"][0]
    first, a, b = window["index"], window["start_s"], window["end_s"]
    read = _probed(u)
    if b - a < settings.min_clip_seconds:  # too short to hold two clips: nothing to detect
        cuts = []
    else:
        try:
            cuts, n = guarded(detect_cuts, u["uri"], settings.storage_options, u["t0"], a, b,
                              fetch_limit(b - a, u["bytes_per_s"]), THRESHOLD, settings.retries, settings=settings)
            read += n
        except (FetchError, DecodeError, IsolationError) as err:
            yield _table(u, [_clip_error(u, (first, a, b), err, settings)], 1, read)
            return
    # an edge inside the video (not its first window's start, not its last's end) may cut a shot: the piece there
    # stays its own clip rather than merge over a cut (shot_clips)
    bounded = shot_clips(cuts, a, b, settings.min_clip_seconds, settings.max_clip_seconds,
                         open_start=u[GROUP] > 0, open_end=u[GROUP] < u[GROUPS] - 1)
    spans = [(first + k, s, e) for k, (s, e) in enumerate(bounded)]
    step = settings.clips_per_group
    for i in range(0, len(spans), step):
        rows, n = _decode_spans(u, spans[i:i + step], settings)
        yield _table(u, rows, len(spans), read + n)
        read = Reads()


def _probed(u: dict) -> Reads:
    """What the split stage read for this unit (its probe's reads, on the item's first unit)."""
    return Reads(u[BYTES_READ] or 0, u.get(READ_RETRIES) or 0)


def _decode_spans(u: dict, spans: list[Span], settings: DecodeSettings) -> tuple[list[dict], Reads]:
    """(one row per clip, what was read): their frames by one isolated decode_group call, or error rows."""
    limit = fetch_limit(spans[-1][2] - spans[0][1], u["bytes_per_s"])
    try:
        clips, read = guarded(decode_group, u["uri"], settings.storage_options, u["t0"], spans,
                              settings.frames_per_clip, video_fit(settings), limit, settings.retries,
                              settings=settings)
    except (FetchError, DecodeError, IsolationError) as err:
        return [_clip_error(u, span, err, settings) for span in spans], Reads()
    return [_clip_row(u, clip.index, clip.start_s, clip.end_s, clip.frames, frame_timestamps_s=clip.timestamps_s,
                      status=OK) for clip in clips], read


def _clip_row(u: dict, index: int, start_s: float, end_s: float, frames: np.ndarray, **fields) -> dict:
    return {"item_id": u["item_id"], "uri": u["uri"], "media_type": VIDEO, "prompts": u["prompts"],
            "clip_index": index, "clip_start_s": start_s, "clip_end_s": end_s, "frame_timestamps_s": None,
            "width": u["width"], "height": u["height"], "frames": frames, "error_stage": None, "error": None,
            **fields}


def _clip_error(u: dict, span: Span, err: Exception, settings: DecodeSettings) -> dict:
    stage = READ if isinstance(err, FetchError) else DECODE
    empty = np.zeros((0, settings.image_size, settings.image_size, 3), np.uint8)
    return _clip_row(u, *span, empty, **error_columns(stage, str(err)))


def _table(u: dict, rows: list[dict], unit_clips: int, read: Reads) -> pa.Table:
    """Decoded rows -> CLIP_SCHEMA, with the unit's bookkeeping (`_with_bookkeeping`)."""
    return pa.Table.from_pylist(_with_bookkeeping(u, rows, unit_clips, read), schema=CLIP_SCHEMA)


def _with_bookkeeping(u: dict, rows: list[dict], unit_clips: int, read: Reads) -> list[dict]:
    """Decoded rows as CLIP_SCHEMA rows, with the unit's bookkeeping: rows in all (unit_clips x prompts), its group,
    its shard, `read`'s bytes spread over these rows and its retries on the first (the commit sums both once per
    clip)."""
    prompts = len(u["prompts"])
    out = []
    for i, row in enumerate(rows):
        frames = np.ascontiguousarray(row.pop("frames"))
        row.update(frames=frames.tobytes(), frame_shape=list(frames.shape), prompts=u["prompts"])
        row.update({ITEM_ROWS: unit_clips * prompts, GROUP: u[GROUP], GROUPS: u[GROUPS], SHARD: u.get(SHARD),
                    BYTES_READ: read.bytes // len(rows) + (read.bytes % len(rows) if i == 0 else 0),
                    READ_RETRIES: read.retries if i == 0 else 0})
        out.append(row)
    return out
