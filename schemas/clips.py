"""The worker contracts: units and decode tasks (split stage -> decode stage), decoded clips (decode stage ->
labeler actors) and commit records (commit stage -> driver).

The split stage (workers.split) turns each item (schemas.manifest.ITEM_SCHEMA) into units of UNIT_SCHEMA: an
image is one unit; a video is probed and cut into clip groups, each its own unit (the unit of commit). Units travel
to the decode stage as decode tasks (TASK_SCHEMA): the images of a split batch together in one task, a video's clip
group alone in its own (so one long video's groups decode in parallel). Decode turns a unit into one row per clip
with the `DECODED_KEYS` (frames as a uint8 array); `decode_units` ships them to the labeler as CLIP_SCHEMA tables
(frames as bytes plus their shape) with the bookkeeping columns: ITEM_ROWS, the number of output rows the clip's
unit yields in all (clips x prompts), the unit's GROUP of GROUPS (null for a whole item), BYTES_READ, READ_RETRIES
and SHARD. The labeler copies them onto its output rows; the commit stage (workers.commit) writes a unit once all
its rows are in one block, and returns COMMIT_SCHEMA rows to the driver: a record per part file written, and the
rows of units cut between blocks (rare), which the driver assembles.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.manifest import ITEM_SCHEMA, PROMPT_TYPE, SHARD

# bookkeeping columns, never written to Parquet
ITEM_ROWS = "_item_rows"  # rows the clip's unit yields in all (a whole item's, or one clip group's)
GROUP = "_group"  # the unit's clip group, 0-based; null: the unit is the whole item
GROUPS = "_groups"  # the item's number of clip groups; null with GROUP
BYTES_READ = "_bytes_read"  # bytes its decode read from storage, spread over the unit's clips (summed per clip)
READ_RETRIES = "_read_retries"  # its reads retried after a transient error, on the unit's first clip (summed too)
BOOKKEEPING = (ITEM_ROWS, GROUP, GROUPS, BYTES_READ, READ_RETRIES, SHARD)  # SHARD: the listing shard (manifest)

# unit kinds (UNIT_SCHEMA's `unit`)
WHOLE = "item"  # read whole and decoded in memory: images, and what the probe could not open as a video
CLIPS = "clips"  # planned clips of a video (--clips fixed)
SHOTS = "shots"  # a window of a video whose clips come from shot detection (--clips shots)
FAILED = "failed"  # an error row for the item: `error_stage` and `error` say why

CLIP_SPAN = pa.struct([("index", pa.int32()), ("start_s", pa.float64()), ("end_s", pa.float64())])

UNIT_SCHEMA = pa.schema([
    *ITEM_SCHEMA,
    ("unit", pa.string()),  # WHOLE / CLIPS / SHOTS / FAILED
    (GROUP, pa.int32()), (GROUPS, pa.int32()),
    ("clips", pa.list_(CLIP_SPAN)),  # CLIPS: the clips; SHOTS: one span, the window (index: its first clip's)
    ("t0", pa.float64()),  # the video's first frame time on its stream's clock (seconds), from the probe
    ("width", pa.int32()), ("height", pa.int32()),
    ("bytes_per_s", pa.float64()),  # the file's size over its duration: what its reads are sized by
    ("error_stage", pa.string()),  # FAILED: the stage (its message is in `error`)
    (BYTES_READ, pa.int64()),  # the probe's reads, on the item's first unit
    (READ_RETRIES, pa.int32()),  # the probe's retried reads, on the item's first unit
])

# a decode task: the units one decode task decodes, in order (many WHOLE/FAILED units, or one clip group)
TASK_SCHEMA = pa.schema([("units", pa.list_(pa.struct(list(UNIT_SCHEMA))))])

DECODED_KEYS = (
    "item_id", "uri", "media_type", "prompts", "clip_index", "clip_start_s", "clip_end_s",
    "frame_timestamps_s", "width", "height", "frames", "status", "error_stage", "error",
)

CLIP_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("uri", pa.string()), ("media_type", pa.string()),
    ("prompts", pa.list_(PROMPT_TYPE)),
    ("clip_index", pa.int32()), ("clip_start_s", pa.float64()), ("clip_end_s", pa.float64()),
    ("frame_timestamps_s", pa.list_(pa.float64())), ("width", pa.int32()), ("height", pa.int32()),
    ("frames", pa.large_binary()),  # uint8 (F, S, S, 3), C order; empty on error rows
    ("frame_shape", pa.list_(pa.int32())),
    ("status", pa.string()), ("error_stage", pa.string()), ("error", pa.string()),
    (ITEM_ROWS, pa.int32()), (GROUP, pa.int32()), (GROUPS, pa.int32()), (BYTES_READ, pa.int64()),
    (READ_RETRIES, pa.int32()), (SHARD, pa.string()),
])

# the commit stage's output: `record`, the JSON of one part file written (workers.commit), or `leftover`,
# the rows (Arrow IPC, LABEL_SCHEMA + BOOKKEEPING) of units whose rows were not all in the block
COMMIT_SCHEMA = pa.schema([("record", pa.string()), ("leftover", pa.large_binary())])
