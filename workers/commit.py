"""The commit stage: labelled rows -> part files, written inside the cluster; the driver gets small records.

`commit_block` is the Ray Data stage after the labelers: a labeler's output block (LABEL_SCHEMA + the bookkeeping
columns, schemas.clips.BOOKKEEPING) -> COMMIT_SCHEMA rows. `commit_rows` does the work, with Arrow group-bys:
  - a unit (an image item, or one clip group of a video) is complete when the block holds all its rows
    (ITEM_ROWS of them); more than that is a duplicated row, and raises;
  - complete units are written to part files (workers.parts.write_part: atomic), one listing shard per file and
    at most `rows_per_file` rows each, cut between units, never inside one;
  - each file gives a record (`FileRecord`, JSON): its name, shard, totals (workers.parts.part_totals), the units it
    finished (whole items counted, a video's groups listed) and what their reads cost;
  - the rows of units the block holds only part of (a unit whose clips were decoded into several blocks, which
    the labelers then got apart: rare) leave as `leftover`, for the driver to assemble (pipeline.sink) and commit
    with this same function.
A retried task writes the same files (their names are a function of their units) and returns the same records.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.clips import BYTES_READ, COMMIT_SCHEMA, GROUP, GROUPS, ITEM_ROWS, READ_RETRIES
from schemas.manifest import SHARD
from schemas.rows import READ
from workers.fetch import RETRIED_OUT
from workers.parts import part_name, part_totals, write_part
from workers.storage import filesystem


@dataclass(frozen=True)
class CommitSpec:
    """Where and how the commit stage writes: the output URI, its storage options, the files' metadata
    (schemas.rows.metadata) and the most rows a file holds."""

    out: str
    storage_options: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)  # bytes -> bytes
    rows_per_file: int = 5000


def unit_keys(rows: pa.Table) -> pa.Array:
    """Each row's unit: its item_id, or "item_id/group" for a video's clip group."""
    group = pc.cast(rows.column(GROUP), pa.string())
    joined = pc.binary_join_element_wise(rows.column("item_id"), group, "/")
    return pc.coalesce(joined, rows.column("item_id")).combine_chunks()


def commit_block(block: pa.Table, spec: CommitSpec) -> pa.Table:
    """Ray Data fn: a labeler's output block -> COMMIT_SCHEMA rows (a record per file written, and the leftover)."""
    records, rest = commit_rows(block, spec)
    out = [{"record": json.dumps(r), "leftover": None} for r in records]
    if rest.num_rows:
        out.append({"record": None, "leftover": to_ipc(rest)})
    return pa.Table.from_pylist(out, schema=COMMIT_SCHEMA)


def commit_rows(rows: pa.Table, spec: CommitSpec) -> tuple[list[dict[str, Any]], pa.Table]:
    """Write the complete units of `rows` (see the module doc); returns (their file records, the other rows)."""
    if rows.num_rows == 0:
        return [], rows
    keys = unit_keys(rows)
    counts = pa.table({"unit": keys, "want": rows.column(ITEM_ROWS)}).group_by("unit").aggregate(
        [("want", "max"), ("want", "count")])
    over = counts.filter(pc.greater(counts["want_count"], counts["want_max"]))
    if over.num_rows:
        raise AssertionError(f"{over.num_rows} units have more rows than they yield (a duplicated row), e.g. "
                             f"{over.slice(0, 3).to_pylist()}")
    whole = pc.is_in(keys, value_set=counts.filter(pc.equal(counts["want_count"], counts["want_max"]))["unit"])
    done, rest = rows.filter(whole), rows.filter(pc.invert(whole))
    if done.num_rows == 0:
        return [], rest
    done_keys = pc.filter(keys, whole)
    order = pc.sort_indices(pa.table({"shard": done.column(SHARD), "unit": done_keys}),
                            sort_keys=[("shard", "ascending"), ("unit", "ascending")])  # stable: clip order kept
    done, done_keys = done.take(order), done_keys.take(order)
    fs, base = filesystem(spec.out, spec.storage_options)
    base = base.rstrip("/")
    return [_write(done.slice(a, b - a), done_keys.slice(a, b - a), fs, base, spec)
            for a, b in _cuts(done.column(SHARD), done_keys, spec.rows_per_file)], rest


def _cuts(shards: pa.ChunkedArray, keys: pa.Array, limit: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of the files (rows sorted by shard and unit): one shard each, cut only between
    units, a unit added while the file stays within `limit` rows (a unit with more rows is a file of its own)."""
    unit = keys.to_numpy(zero_copy_only=False)
    shard = shards.to_numpy(zero_copy_only=False)
    n = len(unit)
    starts = np.flatnonzero(np.r_[True, (unit[1:] != unit[:-1]) | (shard[1:] != shard[:-1])])
    cuts, first = [], 0
    for start, end in zip(starts, np.r_[starts[1:], n]):
        if start > first and (shard[start] != shard[first] or end - first > limit):
            cuts.append((first, int(start)))
            first = int(start)
    cuts.append((first, n))
    return cuts


def _write(rows: pa.Table, keys: pa.Array, fs, base: str, spec: CommitSpec) -> dict[str, Any]:
    """One part file of complete units of one shard, and its record."""
    shard = rows.column(SHARD)[0].as_py()
    videos = rows.filter(pc.is_valid(rows.column(GROUP))).select(["item_id", GROUP, GROUPS])
    held: dict[str, dict] = {}
    groups = [[u["item_id"], u[GROUP], u[GROUPS]] for u in videos.group_by(["item_id", GROUP, GROUPS]).aggregate(
        []).to_pylist()]
    for item, group, of in groups:
        held.setdefault(item, {"of": of, "groups": []})["groups"].append(group)
    for entry in held.values():
        entry["groups"].sort()
    units = pc.unique(keys)
    name = part_name(units.to_pylist(), shard)
    retried = write_part(fs, base, rows, name, spec.metadata, held)
    return {"file": name, "shard": shard, "totals": part_totals(rows, held), "units": len(units),
            "whole": len(units) - len(groups), "groups": sorted(groups), "commit_retries": retried,
            **_reads(rows, keys)}


def _reads(rows: pa.Table, keys: pa.Array) -> dict[str, int]:
    """What the file's units' reads cost: bytes read and fetches retried (each the same on every prompt's row of a
    clip, so counted once per clip), units whose read failed after its retries, and units read whole although some
    fetch of theirs had to be retried."""
    clip = pc.coalesce(pc.cast(rows.column("clip_index"), pa.string()), pa.scalar(""))
    per_clip = pa.table({"unit": keys, "clip": clip, "bytes": rows.column(BYTES_READ),
                         "retries": rows.column(READ_RETRIES)}).group_by(["unit", "clip"]).aggregate(
        [("bytes", "max"), ("retries", "max")])
    retried = per_clip.group_by("unit").aggregate([("retries_max", "sum")])
    stage = pc.fill_null(pc.equal(rows.column("error_stage"), READ), False)
    read_error = pc.filter(keys, stage)
    out_of_retries = pc.filter(keys, pc.and_(stage, pc.fill_null(pc.match_substring(rows.column("error"),
                                                                                     RETRIED_OUT), False)))
    recovered = retried.filter(pc.and_(pc.greater(retried["retries_max_sum"], 0),
                                       pc.invert(pc.is_in(retried["unit"], value_set=pc.unique(read_error)))))
    return {"bytes_read": pc.sum(per_clip["bytes_max"]).as_py() or 0,
            "read_retries": pc.sum(per_clip["retries_max"]).as_py() or 0,
            "reads_failed": len(pc.unique(out_of_retries)), "reads_recovered": recovered.num_rows}


def to_ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()
