"""The driver's part of committing: the units the commit stage could not (workers.commit's leftovers).

Part files are written inside the cluster, a labeler block at a time (workers.commit). A unit whose rows the
labelers got in two blocks (a clip group decoded into several blocks) cannot be committed by either block's task:
each sends its part of the unit's rows to the driver instead. The sink buffers those rows until every one of the
unit's rows arrived, then commits the unit with the commit stage's own function (`workers.commit.commit_rows`:
the same names, atomic writes and records). It holds only such units' rows: rare, and never the run's.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from workers.commit import CommitSpec, commit_rows, from_ipc


class ParquetSink:
    """Assembles leftover rows into whole units and commits them; `add` returns the records of the files written."""

    def __init__(self, spec: CommitSpec) -> None:
        self.spec = spec
        self._rows: pa.Table | None = None  # rows of units not yet whole

    def add(self, leftover: bytes | pa.Table) -> list[dict]:
        """Rows of units cut between blocks (Arrow IPC as the commit stage sends them, or a table): buffered; the
        units now whole are committed."""
        table = from_ipc(leftover) if isinstance(leftover, bytes) else leftover
        if self._rows is not None:
            table = pa.concat_tables([self._rows, table.cast(self._rows.schema)])
        records, rest = commit_rows(table, self.spec)
        self._rows = rest if rest.num_rows else None
        return records

    def drop_partial(self) -> int:
        """Forget the rows of units not yet whole (a pipeline rebuilt after a node loss redoes those units from their
        first row); returns how many items they belong to."""
        n = len(pc.unique(self._rows.column("item_id"))) if self._rows is not None else 0
        self._rows = None
        return n

    def close(self) -> None:
        """Every unit must be whole by the end (rows never go missing silently)."""
        if self._rows is not None:
            ids = pc.unique(self._rows.column("item_id")).to_pylist()
            raise AssertionError(f"{len(ids)} items ended with rows missing, e.g. {ids[:5]}")
