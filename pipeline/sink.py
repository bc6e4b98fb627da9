"""Parquet sink: explicit LABEL_SCHEMA, whole units per file, atomic commits, resume by unit.

Files go to an Output (pipeline.output, which owns the directory's layout). A file is
written under _tmp/ and then moved to its final name `part-<16 hex of sha1(sorted
unit keys)>.parquet` (a rename on local disks; a server-side copy on object stores, where an
object appears whole or not at all). A file only ever holds units whose rows are all present: a
whole item (an image), or one clip group of a video, recorded in the file's metadata. On resume
an image found in any committed file is finished, and so is a video whose groups all are; a
video's committed groups are not labelled again (Output.scan): a killed run loses at most its
unwritten buffer and never duplicates a row.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.output import GROUPS_KEY, TMP_DIR, Output, part_name
from schemas.clips import BYTES_READ, GROUP, GROUPS, ITEM_ROWS, READ_RETRIES
from schemas.rows import COLUMNS, LABEL_SCHEMA, READ
from workers.fetch import OWN_BUDGET_S, OWN_RETRIES, RETRIED_OUT, retrying

log = logging.getLogger(__name__)


class ParquetSink:
    """Collects labeler output, releases units once all their rows arrived, writes part files.

    A unit is a whole item (an image), or one clip group of a video (its `_group` of `_groups`). `add` takes tables
    with the LABEL_SCHEMA columns plus the bookkeeping columns (ITEM_ROWS, the rows of the row's unit; GROUP,
    GROUPS; BYTES_READ); a file is committed when `rows_per_file` rows of finished units are buffered or
    `flush_seconds` passed. A file records the clip groups it holds in its metadata (pipeline.output.GROUPS_KEY),
    so that a resume knows a video's committed groups and whether all of them are. `done_groups`: the groups of
    unfinished videos that earlier runs committed (Output.scan), so that such a video is finished by the rest.
    """

    def __init__(self, output: Output, metadata: dict[bytes, bytes], rows_per_file: int = 5000,
                 flush_seconds: float = 60.0, done_groups: dict[str, frozenset[int]] | None = None):
        self.output = output
        self.fs = output.fs
        self.schema = LABEL_SCHEMA.with_metadata(metadata)
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.fs.makedirs(output.base, exist_ok=True)
        self._partial: dict[tuple[str, int | None], list[pa.Table]] = {}  # unit -> its rows so far
        self._partial_rows: dict[tuple[str, int | None], int] = {}
        self._ready: list[pa.Table] = []
        self._ready_units: list[tuple[str, int | None, int | None]] = []  # (item, group, groups) of _ready
        self._ready_rows = 0
        self._last_flush = time.monotonic()
        self._groups = {k: set(v) for k, v in (done_groups or {}).items()}  # unfinished videos: groups in hand
        self.files: list[str] = []
        self.rows_written = 0
        self.items_written = 0
        self.units_written = 0  # units whose rows all arrived: whole items and clip groups
        self.bytes_read = 0  # what their decodes read from storage (BYTES_READ, once per clip)
        self.reads_failed = 0  # units that are a read error after the fetch's retries ran out (workers.fetch)
        self.read_retries = 0  # their fetches retried after a transient error (READ_RETRIES, once per clip)
        self.reads_recovered = 0  # units read whole although some fetch of theirs had to be retried
        self.finished: set[str] = set()  # items whose rows all arrived (committed, or buffered to be)

    def add(self, table: pa.Table) -> None:
        """Buffer a batch of output rows (any order, any split of a unit's rows across batches)."""
        if table.num_rows == 0:
            return
        ids = table.column("item_id").to_pylist()
        groups = table.column(GROUP).to_pylist() if GROUP in table.column_names else [None] * len(ids)
        by_unit: dict[tuple[str, int | None], list[int]] = {}
        for i, key in enumerate(zip(ids, groups)):
            by_unit.setdefault(key, []).append(i)
        expected = table.column(ITEM_ROWS).to_pylist()
        for key, idx in by_unit.items():
            rows = table.take(pa.array(idx))
            self._partial.setdefault(key, []).append(rows)
            have = self._partial_rows.get(key, 0) + len(idx)
            want = expected[idx[0]]
            if have > want:
                raise AssertionError(f"unit {key}: {have} rows arrived, {want} expected (a duplicated row)")
            if have == want:
                self._complete(key, rows)
            else:
                self._partial_rows[key] = have
        if self._ready_rows >= self.rows_per_file or (
                self._ready and time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def _complete(self, key: tuple[str, int | None], last: pa.Table) -> None:
        """A unit's rows are all in: ready it for the next file; its item is finished with its last group."""
        item, group = key
        parts = self._partial.pop(key)
        self._partial_rows.pop(key, None)
        whole = pa.concat_tables(parts)
        self.bytes_read += self._per_clip(whole, BYTES_READ)
        retried = self._per_clip(whole, READ_RETRIES)
        groups = last.column(GROUPS)[0].as_py() if group is not None else None
        stages = whole.column("error_stage").to_pylist()
        failed = any(stage == READ and RETRIED_OUT in (error or "") for stage, error in
                     zip(stages, whole.column("error").to_pylist()))
        self.reads_failed += failed
        self.read_retries += retried
        self.reads_recovered += bool(retried) and READ not in stages
        self._ready.append(whole.select(COLUMNS))
        self._ready_units.append((item, group, groups))
        self._ready_rows += whole.num_rows
        self.units_written += 1
        if group is not None:
            done = self._groups.setdefault(item, set())
            done.add(group)
            if len(done) < groups:
                return
            del self._groups[item]
        self.items_written += 1
        self.finished.add(item)

    @staticmethod
    def _per_clip(rows: pa.Table, column: str) -> int:
        """A unit's count spread over its clips (the same on each prompt's row of a clip), summed once per clip."""
        if column not in rows.column_names:
            return 0
        per_clip = dict(zip(rows.column("clip_index").to_pylist(), rows.column(column).to_pylist()))
        return sum(v or 0 for v in per_clip.values())

    def done_groups(self) -> dict[str, list[int]]:
        """item_id -> the clip groups in hand (committed or buffered to be) of videos not finished."""
        return {item: sorted(groups) for item, groups in self._groups.items()}

    def flush(self) -> str | None:
        """Commit the finished units buffered so far as one part file; returns its URI."""
        self._last_flush = time.monotonic()
        if not self._ready:
            return None
        units = self._ready_units
        held: dict[str, dict] = {}
        for item, group, groups in units:
            if group is not None:
                held.setdefault(item, {"of": groups, "groups": []})["groups"].append(group)
        schema = self.schema.with_metadata({**self.schema.metadata, GROUPS_KEY: json.dumps(held).encode()}) \
            if held else self.schema
        table = pa.concat_tables(self._ready).cast(schema)
        name = part_name([item if group is None else f"{item}/{group}" for item, group, _ in units])
        final = self.output.path(name)
        # an output store unreachable for a while: the commit (write under _tmp/, then move) is retried
        retrying(lambda: self._commit(table, final), "commit", OWN_RETRIES, budget_s=OWN_BUDGET_S, target=final)
        self.files.append(self.output.uri_of(final))
        self.rows_written += table.num_rows
        self._ready, self._ready_units, self._ready_rows = [], [], 0
        log.debug("committed %s (%d rows)", final, table.num_rows)
        return self.files[-1]

    def _commit(self, table: pa.Table, final: str) -> None:
        """Write under _tmp/ and move to the final name: the part file appears whole or not at all (a rename; on an
        object store a server-side copy). A try that failed half way leaves at most a file under _tmp/, which
        readers skip and the run clears; the next try writes a fresh one."""
        tmp = self.output.path(f"{TMP_DIR}/{uuid.uuid4().hex}-{final.rsplit('/', 1)[-1]}")
        self.fs.makedirs(self.output.path(TMP_DIR), exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        self.fs.mv(tmp, final)

    def drop_partial(self) -> int:
        """Forget the rows of units not yet whole (a pipeline rebuilt after a node loss redoes those units from
        their first row); returns how many items they belong to."""
        n = len({item for item, _ in self._partial})
        self._partial.clear()
        self._partial_rows.clear()
        return n

    def close(self) -> None:
        """Flush; every unit must be complete by now (rows never go missing silently)."""
        if self._partial:
            missing = {k: v for k, v in list(self._partial_rows.items())[:5]}
            raise AssertionError(f"{len(self._partial)} units ended with rows missing, e.g. {missing}")
        self.flush()
