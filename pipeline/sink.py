"""Parquet sink: explicit LABEL_SCHEMA, whole items per file, atomic commits, resume by item_id.

Layout of an output directory (any fsspec URI):
    part-<16 hex of sha1(sorted item_ids)>.parquet   committed files: LABEL_SCHEMA + metadata
    _tmp/                                            files being written; never counted
    _listing/                                        this run's item shards (pipeline.sources)
    _summary.json                                    written last (pipeline.summary)
A file is written under _tmp/ and then moved to its final name (a rename on local disks; a
server-side copy on object stores, where an object appears whole or not at all). A file
only ever holds items whose rows are all present, so on resume an item_id found in any
committed file is finished and is skipped: a killed run loses at most its unwritten buffer
and never duplicates a row. Readers (pyarrow, pandas, HF datasets) ignore `_`-prefixed paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import filesystem, full_uri
from schemas.rows import COLUMNS, LABEL_SCHEMA, read_metadata

log = logging.getLogger(__name__)

PART_GLOB = "part-*.parquet"
ITEM_ROWS = "_item_rows"  # bookkeeping column from the labeler: rows its item yields in all


@dataclasses.dataclass(frozen=True)
class OutputState:
    """What a previous run left in an output directory."""

    files: tuple[str, ...]
    done_items: frozenset[str]
    rows: int
    metadata: dict  # schemas.rows.read_metadata of the first file; {} when there is none


def scan_output(out: str, storage_options: dict[str, Any] | None = None) -> OutputState:
    """Committed part files, their finished item_ids and row count (reads the item_id column only)."""
    fs, base = filesystem(out, storage_options)
    if not fs.exists(base):
        return OutputState((), frozenset(), 0, {})
    files = sorted(fs.glob(f"{base.rstrip('/')}/{PART_GLOB}"))
    done: set[str] = set()
    rows = 0
    meta: dict = {}
    for i, path in enumerate(files):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if i == 0:
                meta = read_metadata(pf.schema_arrow.metadata)
            ids = pf.read(columns=["item_id"]).column("item_id")
        done.update(ids.unique().to_pylist())
        rows += len(ids)
    return OutputState(tuple(full_uri(fs, p) for p in files), frozenset(done), rows, meta)


def clear_output(out: str, storage_options: dict[str, Any] | None = None) -> int:
    """--overwrite: delete committed parts, _summary.json, _tmp/ and _listing/; returns files deleted."""
    fs, base = filesystem(out, storage_options)
    if not fs.exists(base):
        return 0
    base = base.rstrip("/")
    paths = fs.glob(f"{base}/{PART_GLOB}") + [p for p in (f"{base}/_summary.json",) if fs.exists(p)]
    for path in paths:
        fs.rm(path)
    clear_scratch(out, storage_options)
    return len(paths)


def clear_scratch(out: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete _tmp/ and _listing/ (leftovers of a killed run: never part of the output)."""
    fs, base = filesystem(out, storage_options)
    for sub in ("_tmp", "_listing"):
        path = f"{base.rstrip('/')}/{sub}"
        if fs.exists(path):
            fs.rm(path, recursive=True)


def part_name(item_ids: list[str]) -> str:
    """Deterministic file name from the items it holds."""
    digest = hashlib.sha1("\n".join(sorted(set(item_ids))).encode()).hexdigest()[:16]
    return f"part-{digest}.parquet"


class ParquetSink:
    """Collects labeler output, releases items once all their rows arrived, writes part files.

    `add` takes tables with the LABEL_SCHEMA columns plus ITEM_ROWS; a file is committed
    when `rows_per_file` rows of finished items are buffered or `flush_seconds` passed.
    """

    def __init__(self, out: str, metadata: dict[bytes, bytes], storage_options: dict[str, Any] | None = None,
                 rows_per_file: int = 5000, flush_seconds: float = 60.0):
        self.fs, base = filesystem(out, storage_options)
        self.base = base.rstrip("/")
        self.schema = LABEL_SCHEMA.with_metadata(metadata)
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.fs.makedirs(self.base, exist_ok=True)
        self._partial: dict[str, list[pa.Table]] = {}  # item_id -> its rows so far
        self._partial_rows: dict[str, int] = {}
        self._ready: list[pa.Table] = []
        self._ready_rows = 0
        self._last_flush = time.monotonic()
        self.files: list[str] = []
        self.rows_written = 0
        self.items_written = 0

    def add(self, table: pa.Table) -> None:
        """Buffer a batch of output rows (any order, any split of an item's rows across batches)."""
        if table.num_rows == 0:
            return
        ids = table.column("item_id").to_pylist()
        expected = table.column(ITEM_ROWS).to_pylist()
        by_item: dict[str, list[int]] = {}
        for i, item in enumerate(ids):
            by_item.setdefault(item, []).append(i)
        for item, idx in by_item.items():
            rows = table.take(pa.array(idx)).select(COLUMNS)
            self._partial.setdefault(item, []).append(rows)
            have = self._partial_rows.get(item, 0) + len(idx)
            want = expected[idx[0]]
            if have > want:
                raise AssertionError(f"item {item}: {have} rows arrived, {want} expected (a duplicated row)")
            if have == want:
                self._ready.extend(self._partial.pop(item))
                self._partial_rows.pop(item, None)
                self._ready_rows += have
                self.items_written += 1
            else:
                self._partial_rows[item] = have
        if self._ready_rows >= self.rows_per_file or (
                self._ready and time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> str | None:
        """Commit the finished items buffered so far as one part file; returns its URI."""
        self._last_flush = time.monotonic()
        if not self._ready:
            return None
        table = pa.concat_tables(self._ready).cast(self.schema)
        name = part_name(table.column("item_id").to_pylist())
        tmp = f"{self.base}/_tmp/{uuid.uuid4().hex}-{name}"
        final = f"{self.base}/{name}"
        self.fs.makedirs(f"{self.base}/_tmp", exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        self.fs.mv(tmp, final)
        self.files.append(full_uri(self.fs, final))
        self.rows_written += table.num_rows
        self._ready, self._ready_rows = [], 0
        log.debug("committed %s (%d rows)", final, table.num_rows)
        return self.files[-1]

    def close(self) -> None:
        """Flush; every item must be complete by now (rows never go missing silently)."""
        if self._partial:
            missing = {k: v for k, v in list(self._partial_rows.items())[:5]}
            raise AssertionError(f"{len(self._partial)} items ended with rows missing, e.g. {missing}")
        self.flush()
