"""The worker contract: decoded clips, from the CPU decode stage to the labeler actors.

Decode turns each item (schemas.manifest.ITEM_SCHEMA) into one row per clip with the
`DECODED_KEYS` (frames as a uint8 array); `decode_batch` ships them to the labeler as
CLIP_SCHEMA tables (frames as bytes plus their shape) with ITEM_ROWS, the number of output
rows the clip's item yields in all (clips x prompts). The labeler copies ITEM_ROWS onto its
output rows, and the sink commits an item once that many rows arrived.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.manifest import PROMPT_TYPE

ITEM_ROWS = "_item_rows"  # bookkeeping column: rows the item yields in all; never written to Parquet

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
    (ITEM_ROWS, pa.int32()),
])
