"""The split stage: items -> units (schemas.clips.UNIT_SCHEMA), before anything is decoded.

An image (by name) is one WHOLE unit, read and decoded whole by the decode stage. Any other item is probed
(workers.probe: a few range reads, in the isolated child): a video is cut into clip groups, one unit each, so one
long video is decoded by many tasks at once and no task holds more than `clips_per_group` clips' frames:
  --clips fixed  its clips (workers.video.plan_clips), clips_per_group at a time (CLIPS units; fewer where that many
                 clips' frames would pass Ray Data's block size: DecodeSettings.group_clips);
  --clips shots  windows of clips_per_group * max_clip_seconds seconds (SHOTS units), each cut at its own shots.
A group already committed by an earlier run (the item's DONE_GROUPS, from the listing) is left out: a video half
done when a run was killed is finished by labelling only its other groups. Content the probe finds to be an image, and a
video the probe cannot open (a truncated or odd file the whole-file decoders may still recover), are WHOLE units
while they fit the whole-file limit; a failed read, a file over the user's byte limit, a video too large in
pixels or (dynamic resolution) of an aspect ratio the model's processor refuses is a FAILED unit (one error row).
Nothing here raises for bad input.

`split_batch` packs the units into decode tasks (schemas.clips.TASK_SCHEMA): the batch's WHOLE and FAILED units,
and the videos that are one clip group, together in one task (an image or a short video decodes in milliseconds:
a task for each would cost more than its decode), and each group of a video of several groups in a task of its own
(a long video decodes in parallel).
"""

from __future__ import annotations

import pyarrow as pa

from schemas.clips import (BYTES_READ, CLIPS, FAILED, GROUP, GROUPS, READ_RETRIES, SHOTS, TASK_SCHEMA, UNIT_SCHEMA,
                           WHOLE)
from schemas.manifest import DONE_GROUPS, media_type_from_name
from schemas.rows import DECODE, IMAGE, LIST, READ, VIDEO
from lavi.resolution import aspect_error
from workers.fetch import FetchError
from workers.isolate import IsolationError, guarded
from workers.probe import VideoProbe, probe_uri
from workers.settings import FIXED, SHOT_STRIDE, DecodeSettings
from workers.video import plan_clips


def unit(item: dict, kind: str, **fields) -> dict:
    """A row of UNIT_SCHEMA for `item`."""
    row = {name: item.get(name) for name in UNIT_SCHEMA.names}
    row.update({"unit": kind, BYTES_READ: 0, READ_RETRIES: 0}, **fields)
    return row


def split_item(item: dict, settings: DecodeSettings, done: frozenset[int] = frozenset()) -> list[dict]:
    """One item's units (see the module doc); `done`: its clip groups already committed."""
    if item.get("error"):  # refused when listed: never fetched
        return [unit(item, FAILED, error_stage=LIST)]
    if (item.get("media_type") or media_type_from_name(item["uri"])) == IMAGE:
        return [unit(item, WHOLE)]
    try:
        probe = guarded(probe_uri, item["uri"], settings.storage_options, settings.max_pixels, settings.retries,
                        settings=settings)
    except FetchError as err:
        return [unit(item, FAILED, error_stage=READ, error=str(err))]
    except IsolationError as err:
        return [unit(item, FAILED, error_stage=DECODE, error=str(err))]
    probed = {BYTES_READ: probe.bytes_read, READ_RETRIES: probe.read_retries}
    if settings.max_bytes is not None and probe.size > settings.max_bytes:
        return [unit(item, FAILED, error_stage=READ, error=f"file too large: over the limit of {settings.max_bytes} "
                                                             "bytes", **probed)]
    if probe.kind != VIDEO:
        if probe.kind == "broken" and probe.size > settings.whole_file_bytes:
            return [unit(item, FAILED, error_stage=DECODE, error=probe.error, **probed)]
        return [unit(item, WHOLE, **probed)]  # the whole-file decoders take it from here
    if settings.dynamic is not None and min(probe.width, probe.height) > 0 and (
            why := aspect_error(probe.height, probe.width)) is not None:  # one error row, not one per clip
        return [unit(item, FAILED, error_stage=DECODE, error=f"video frames {why}", **probed)]
    units = plan_units(item, probe, settings, done)
    if units:
        units[0].update(probed)
    return units


def plan_units(item: dict, probe: VideoProbe, settings: DecodeSettings, done: frozenset[int]) -> list[dict]:
    """A probed video's clip groups not in `done`, as CLIPS or SHOTS units."""
    video = {"t0": probe.t0, "width": probe.width, "height": probe.height, "media_type": VIDEO,
             "bytes_per_s": probe.size / max(probe.duration_s, 1e-3)}
    if settings.clips == FIXED:
        spans = plan_clips(probe.duration_s, settings.clip_seconds, settings.max_clips)
        g = settings.group_clips
        groups = [[{"index": k, "start_s": a, "end_s": b} for k, (a, b) in enumerate(spans)][i:i + g]
                  for i in range(0, len(spans), g)]
        kind = CLIPS
    else:
        windows = plan_clips(probe.duration_s, settings.shot_window_s, None)
        groups = [[{"index": w * SHOT_STRIDE, "start_s": a, "end_s": b}] for w, (a, b) in enumerate(windows)]
        kind = SHOTS
    return [unit(item, kind, clips=clips, **{GROUP: g, GROUPS: len(groups)}, **video)
            for g, clips in enumerate(groups) if g not in done]


def split_units(items: pa.Table, settings: DecodeSettings) -> list[dict]:
    """Items (schemas.manifest.ITEM_SCHEMA) -> their units (rows of schemas.clips.UNIT_SCHEMA), in order; a video's
    DONE_GROUPS are left out."""
    return [u for item in items.to_pylist()
            for u in split_item(item, settings, frozenset(item.get(DONE_GROUPS) or ()))]


def split_batch(items: pa.Table, settings: DecodeSettings) -> pa.Table:
    """Ray Data fn: items -> decode tasks (TASK_SCHEMA): the units that decode in milliseconds (WHOLE, FAILED, a
    video of one clip group) in one, each group of a longer video alone."""
    units = split_units(items, settings)
    alone = [u["unit"] in (CLIPS, SHOTS) and (u[GROUPS] or 1) > 1 for u in units]
    batch = [u for u, a in zip(units, alone) if not a]
    tasks = ([{"units": batch}] if batch else []) + [{"units": [u]} for u, a in zip(units, alone) if a]
    return pa.Table.from_pylist(tasks, schema=TASK_SCHEMA)
