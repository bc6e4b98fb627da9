"""Training examples from a Parquet of (media, prompt, target): the user's own data for `lavi-label train`.

Columns: `uri` (string) or `bytes` (binary) for the media, `prompt`, `target`. Media decode through the
same code as the labeling pipeline (so training sees what inference sees); undecodable rows are skipped
with a warning, never silently: the count is logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from lavi.train import Example
from schemas.rows import ERROR
from workers.decode import DecodeSettings, decode_item
from workers.fetch import fetch_bytes
from workers.storage import filesystem

log = logging.getLogger(__name__)


@dataclass
class ParquetData:
    uri: str
    image_size: int
    frames: int
    batch_items: int = 32
    seed: int = 0
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        fs, path = filesystem(self.uri, self.storage_options)
        table = pq.read_table(path, filesystem=fs)
        missing = {"prompt", "target"} - set(table.column_names)
        if missing or not {"uri", "bytes"} & set(table.column_names):
            raise ValueError(f"{self.uri}: a training Parquet needs columns prompt, target and uri or bytes; "
                             f"has {table.column_names}")
        self.rows = table.to_pylist()
        self.settings = DecodeSettings(image_size=self.image_size, frames_per_clip=self.frames,
                                       storage_options=self.storage_options, isolate=False)
        self.skipped = 0

    def _example(self, row: dict) -> Example | None:
        data = row.get("bytes") or fetch_bytes(row["uri"], self.storage_options)
        item = {"item_id": "train", "uri": row.get("uri") or "bytes", "media_type": None, "prompts": []}
        decoded = decode_item(item, self.settings, data)[0]
        if decoded["status"] == ERROR:
            self.skipped += 1
            log.warning("training row skipped (%d so far): %s", self.skipped, decoded["error"])
            return None
        return Example(decoded["frames"], ((row["prompt"], row["target"]),))

    def __call__(self, step: int) -> list[Example]:
        rng = np.random.default_rng([self.seed, step])
        picked = rng.choice(len(self.rows), size=min(self.batch_items, len(self.rows)), replace=False)
        out = [e for e in (self._example(self.rows[i]) for i in picked) if e is not None]
        if not out:
            raise ValueError(f"no decodable rows in step {step} of {self.uri}")
        return out
