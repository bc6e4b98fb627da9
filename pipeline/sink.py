"""Parquet sink: explicit LABEL_SCHEMA, whole items per file, atomic commits, resume by item_id.

Files go to an Output (pipeline.output, which owns the directory's layout). A file is
written under _tmp/ and then moved to its final name `part-<16 hex of sha1(sorted
item_ids)>.parquet` (a rename on local disks; a server-side copy on object stores, where an
object appears whole or not at all). A file only ever holds items whose rows are all
present, so on resume an item_id found in any committed file is finished and is skipped
(Output.scan): a killed run loses at most its unwritten buffer and never duplicates a row.
"""

from __future__ import annotations

import logging
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.output import TMP_DIR, Output, part_name
from schemas.clips import ITEM_ROWS
from schemas.rows import COLUMNS, LABEL_SCHEMA

log = logging.getLogger(__name__)


class ParquetSink:
    """Collects labeler output, releases items once all their rows arrived, writes part files.

    `add` takes tables with the LABEL_SCHEMA columns plus ITEM_ROWS; a file is committed
    when `rows_per_file` rows of finished items are buffered or `flush_seconds` passed.
    """

    def __init__(self, output: Output, metadata: dict[bytes, bytes], rows_per_file: int = 5000,
                 flush_seconds: float = 60.0):
        self.output = output
        self.fs = output.fs
        self.schema = LABEL_SCHEMA.with_metadata(metadata)
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.fs.makedirs(output.base, exist_ok=True)
        self._partial: dict[str, list[pa.Table]] = {}  # item_id -> its rows so far
        self._partial_rows: dict[str, int] = {}
        self._ready: list[pa.Table] = []
        self._ready_rows = 0
        self._last_flush = time.monotonic()
        self.files: list[str] = []
        self.rows_written = 0
        self.items_written = 0
        self.finished: set[str] = set()  # items whose rows all arrived (committed, or buffered to be)

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
                self.finished.add(item)
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
        tmp = self.output.path(f"{TMP_DIR}/{uuid.uuid4().hex}-{name}")
        final = self.output.path(name)
        self.fs.makedirs(self.output.path(TMP_DIR), exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        self.fs.mv(tmp, final)
        self.files.append(self.output.uri_of(final))
        self.rows_written += table.num_rows
        self._ready, self._ready_rows = [], 0
        log.debug("committed %s (%d rows)", final, table.num_rows)
        return self.files[-1]

    def drop_partial(self) -> int:
        """Forget the rows of items not yet whole (a pipeline rebuilt after a node loss redoes those items from
        their first row); returns how many items that was."""
        n = len(self._partial)
        self._partial.clear()
        self._partial_rows.clear()
        return n

    def close(self) -> None:
        """Flush; every item must be complete by now (rows never go missing silently)."""
        if self._partial:
            missing = {k: v for k, v in list(self._partial_rows.items())[:5]}
            raise AssertionError(f"{len(self._partial)} items ended with rows missing, e.g. {missing}")
        self.flush()
