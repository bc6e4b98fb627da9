"""What an output already holds, read per listing shard, so that a rerun labels only what is missing.

The listing is deterministic (walks in sorted order, manifests in their order, each uri once), so rerunning the
same INPUTs lists the same shards: shard `pos` holds the same items, and its key (8 hex of sha1 over its item ids)
says so. What a run leaves, per shard:
  _shards/<pos>.json      the shard is complete (every item committed): its key and totals (pipeline.ledger)
  part-<pos>-<key>-*      its part files, for a shard labelled in part (workers.parts)
  _listing/shard-*        the shards a killed run had listed: their positions and keys, in the files' metadata
A rerun's listing decides each shard from these alone (`Resume.decide`): a complete shard is skipped without
reading anything of it; a shard labelled in part reads its own part files (item ids and held groups) and labels
the rest; a shard with no trace is labelled whole. Only the shards in flight cost item-level memory.

When a shard's key differs from the trace at its position (the INPUTs list otherwise now: files added or removed),
or the output holds part files of an earlier version (no shard in their names), its items may be committed under
other shards: from that shard on the listing asks a `CommittedIndex` of the whole output instead (every committed
item's 64-bit fingerprint, 8 bytes an item: the files' item_id columns read once), and the run's totals are
counted again from every file at its end (pipeline.ledger).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.output import LISTING_DIR, SHARDS_DIR, Output
from pipeline.seen import fingerprints
from workers.parts import add_totals, empty_totals, held_groups, is_part_name, parse_part_name, read_part_totals
from workers.storage import read_parquet_file

log = logging.getLogger(__name__)

COMPLETE, IN_FLIGHT, FRESH, CONFLICT = "complete", "in_flight", "fresh", "conflict"
LISTING_KEYS = (b"lavi_label.shard_pos", b"lavi_label.shard_key")  # a listing file's shard, in its metadata


@dataclasses.dataclass
class Committed:
    """What a shard's part files hold: items finished, groups of videos not finished, their totals, the files."""

    finished: set[str] = dataclasses.field(default_factory=set)
    groups: dict[str, set[int]] = dataclasses.field(default_factory=dict)  # unfinished videos: groups committed
    of: dict[str, int] = dataclasses.field(default_factory=dict)  # a video's number of groups
    totals: dict[str, Any] = dataclasses.field(default_factory=empty_totals)
    files: set[str] = dataclasses.field(default_factory=set)  # file names

    def add_file(self, name: str, totals: dict[str, Any], ids: list[str], held: dict[str, dict]) -> None:
        self.files.add(name)
        self.totals = add_totals(self.totals, totals)
        for item in set(ids):
            if item in held:
                self.groups.setdefault(item, set()).update(held[item]["groups"])
                self.of[item] = held[item]["of"]
            else:
                self.finished.add(item)
        for item in [i for i, got in self.groups.items() if len(got) >= self.of[i]]:
            self.finished.add(item)
            del self.groups[item]


def read_committed(output: Output, pos: int, key: str) -> Committed:
    """A shard's part files read back (item_id and the totals' columns, and their held groups)."""
    done = Committed()
    for path in output.part_paths(f"{pos:06d}-{key}-"):
        totals, ids, held = read_part_totals(output.fs, path)
        done.add_file(path.rsplit("/", 1)[-1], totals, ids.column("item_id").to_pylist(), held)
    return done


@dataclasses.dataclass
class Resume:
    """The traces of earlier runs in an output, by shard position (see the module doc)."""

    records: dict[int, dict]  # complete shards: pos -> its _shards record
    files: dict[int, set[str]]  # pos -> the keys of its part files
    listed: dict[int, str]  # pos -> key, of a killed run's listing files
    legacy: int  # part files of an earlier version (no shard in their name)
    metadata: dict  # the settings the files were written with (schemas.rows.read_metadata)

    @classmethod
    def scan(cls, output: Output) -> "Resume":
        """Read the traces: the _shards records, the part files' names, the listing files' footers."""
        records: dict[int, dict] = {}
        if output.fs.exists(output.path(SHARDS_DIR)):
            paths = [p for p in output.fs.ls(output.path(SHARDS_DIR), detail=False) if p.endswith(".json")]
            for path, data in output.fs.cat(paths, on_error="omit").items() if paths else ():
                record = json.loads(data)
                records[record["pos"]] = record
        files: dict[int, set[str]] = {}
        legacy = 0
        for path in output.part_paths():
            shard = parse_part_name(path)
            if shard is None:
                legacy += is_part_name(path)
            else:
                files.setdefault(shard[0], set()).add(shard[1])
        listed: dict[int, str] = {}
        if output.fs.exists(output.listing):
            for path in output.fs.ls(output.listing, detail=False):
                if path.rsplit("/", 1)[-1].startswith("shard-") and path.endswith(".parquet"):
                    with output.fs.open(path, "rb") as f:
                        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
                    if LISTING_KEYS[0] in meta:
                        listed[int(meta[LISTING_KEYS[0]])] = meta[LISTING_KEYS[1]].decode()
        return cls(records, files, listed, legacy, output.metadata())

    @property
    def empty(self) -> bool:
        return not (self.records or self.files or self.legacy)

    def decide(self, pos: int, key: str) -> str:
        """COMPLETE (skip it), IN_FLIGHT (read its files, label the rest), FRESH (label it whole) or CONFLICT (its
        items may be committed under other shards: ask a CommittedIndex)."""
        if self.legacy:
            return CONFLICT
        keys = {k for k in ((self.records.get(pos) or {}).get("key"), self.listed.get(pos)) if k}
        keys |= self.files.get(pos, set())
        if keys - {key}:
            return CONFLICT
        if (self.records.get(pos) or {}).get("key") == key:
            return COMPLETE
        return IN_FLIGHT if key in self.files.get(pos, set()) else FRESH

    def complete_totals(self) -> dict[str, Any]:
        """The totals of the complete shards' records."""
        total = empty_totals()
        for record in self.records.values():
            total = add_totals(total, record["totals"])
        return total


class CommittedIndex:
    """Every item committed anywhere in an output, for listings that cannot decide by shard: the finished items'
    fingerprints (a sorted uint64 array, 8 bytes an item) and the committed groups of unfinished videos."""

    def __init__(self, output: Output) -> None:
        ids: list[np.ndarray] = []
        done = Committed()
        for path in output.part_paths():
            with output.fs.open(path, "rb") as f:
                table = read_parquet_file(f, ["item_id"])
            held = held_groups(table.schema.metadata)
            items = table.column("item_id").unique().to_pylist()
            whole = [i for i in items if i not in held]
            ids.append(fingerprints(whole))
            done.add_file(path, {}, [i for i in items if i in held], held)
        ids.append(fingerprints(sorted(done.finished)))  # videos whose groups are all in
        self.finished = np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.uint64)
        self.groups = done.groups
        log.info("resume: indexed %d committed items and %d videos in part", len(self.finished), len(self.groups))

    def is_finished(self, item_ids: list[str]) -> np.ndarray:
        fps = fingerprints(item_ids)
        if not len(self.finished):
            return np.zeros(len(fps), dtype=bool)
        idx = np.minimum(np.searchsorted(self.finished, fps), len(self.finished) - 1)
        return self.finished[idx] == fps
