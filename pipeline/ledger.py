"""The driver's book of a run: per listing shard, what it labels and what is committed; per run, the totals.

The listing (pipeline.listing) tells the ledger of each shard as it is written (`listed`); the commit records of the
part files (workers.commit, and the driver's own assembled leftovers, pipeline.sink) arrive as the pipeline streams
(`commit`). A shard is complete when every item it labels is finished: an item whole in a file, a video when all its
clip groups are. A complete shard is recorded in the output (`_shards/<pos>.json`: its key, item count, files and
totals, the sum of its files' totals) and its state is dropped; its listing file is emptied. So the driver holds
item-level state (the files it saw, the groups of videos not finished) only for the shards in flight, however
large the corpus, and the run's totals are the sum of the shard records: nothing is read back to count them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import Any

from pipeline.output import LISTING_DIR, SHARDS_DIR, Output
from pipeline.resume import Committed, read_committed
from workers.fetch import OWN_BUDGET_S, OWN_RETRIES, retrying
from workers.parts import add_totals, empty_totals, shard_id
from workers.shards import listing_name
from workers.storage import read_parquet_file

log = logging.getLogger(__name__)

RUN_COUNTS = ("files", "units", "bytes_read", "read_retries", "reads_failed", "reads_recovered", "commit_retries")


@dataclasses.dataclass
class ShardState:
    """One listing shard of this run: its place, what it labels, what its files hold so far."""

    pos: int
    key: str
    items: int  # distinct items in the shard
    to_label: int  # of them, the items this run labels (not finished before)
    seq: int | None = None  # its listing file (None: not written, nothing to label)
    bytes: int = 0  # its items' bytes in memory (an Arrow table of them)
    committed: Committed = dataclasses.field(default_factory=Committed)  # its files, earlier runs' and this one's
    finished: int = 0  # items of to_label finished so far
    resumed_groups: int = 0  # clip groups that earlier runs committed of the videos it labels
    recorded: bool = False  # complete before this run (its record is in the output already)

    @property
    def id(self) -> str:
        return shard_id(self.pos, self.key)


class Ledger:
    """See the module doc. Thread-safe: the listing thread calls `listed` and `wait_room`, the driver `commit`."""

    def __init__(self, output: Output, done_totals: dict[str, Any] | None = None, on_complete=None) -> None:
        self.output = output
        self.totals = dict(done_totals or empty_totals())  # the complete shards': earlier runs' and this one's
        self.shards: dict[int, ShardState] = {}  # in flight, by position
        self.by_id: dict[str, int] = {}
        self.run = {"items": 0, "rows": 0, "generated_tokens": 0, "errors": 0, **dict.fromkeys(RUN_COUNTS, 0)}
        self.to_label = 0  # items listed for labelling so far
        self.written = 0  # listing files written
        self.completed = 0  # of them, complete
        self.ahead = 0  # bytes (in memory) of the items of the listing files written and not complete
        self.largest = 0  # the most bytes of a listing file's items
        self.ahead_items = 0  # and their items
        self.listing_done = False
        self.positions = 0  # shards listed so far (written or not)
        self.resumed_groups = 0
        self.on_complete = on_complete  # fn(ShardState) once a written shard is complete (its listing file emptied)
        self._lock = threading.Condition()

    # -- the listing's side ----------------------------------------------------------------------------------
    def wait_room(self, max_ahead_bytes: int, min_ahead_items: int, stop: threading.Event) -> None:
        """Block the listing while the items of its files written and not complete reach `max_ahead_bytes` (in memory)
        plus two of its largest shards, and number at least `min_ahead_items`. So the listing runs ahead of the
        labelling by about that much (its scratch files, and the items in flight, stay bounded whatever the corpus),
        and never by less than the pipeline gathers before it labels, which would wait forever: the reader holds
        less than a block of items (max_ahead_bytes is two) and the shards with items among those are at most two
        more than that block's bytes, so while the listing waits some shard not complete has every item in the
        pipeline, and completes."""
        with self._lock:
            while self.ahead >= max_ahead_bytes + 2 * self.largest and self.ahead_items >= min_ahead_items \
                    and not stop.is_set():
                self._lock.wait(timeout=1.0)

    def wait_written(self, stop: threading.Event) -> bool:
        """Block until the listing wrote a shard (True) or ended (`stop` set) without one (False)."""
        with self._lock:
            while not self.written and not stop.is_set():
                self._lock.wait(timeout=0.2)
            return self.written > 0

    def listed(self, state: ShardState) -> None:
        """A shard the listing decided: written (seq set) and to be labelled, or finished already."""
        with self._lock:
            self.positions = max(self.positions, state.pos + 1)
            self.to_label += state.to_label
            self.resumed_groups += state.resumed_groups
            if state.seq is not None:
                self.written += 1
                self.ahead += state.bytes
                self.largest = max(self.largest, state.bytes)
                self.ahead_items += state.to_label
            if state.recorded:
                pass  # its record and totals are the output's already
            elif state.to_label == 0:
                self._complete(state)
            else:
                self.shards[state.pos] = state
                self.by_id[state.id] = state.pos
            self._lock.notify_all()

    def done_listing(self) -> None:
        with self._lock:
            self.listing_done = True
            self._lock.notify_all()

    # -- the pipeline's side ---------------------------------------------------------------------------------
    def commit(self, record: dict[str, Any]) -> None:
        """A part file's record (workers.commit): its totals and the units it finished."""
        with self._lock:
            pos = self.by_id.get(record["shard"])
            state = self.shards.get(pos) if pos is not None else None
            if state is None:
                raise AssertionError(f"a part file {record['file']} of shard {record['shard']}, which is not in "
                                     "flight (complete, or never listed): a duplicated commit")
            if record["file"] in state.committed.files:
                return  # the same file again (its task retried): same name, same rows
            done = state.committed
            done.files.add(record["file"])
            done.totals = add_totals(done.totals, record["totals"])
            state.finished += record["whole"]
            for item, group, of in record["groups"]:
                got = done.groups.setdefault(item, set())
                got.add(group)
                done.of[item] = of
                if len(got) >= of:
                    del done.groups[item]
                    state.finished += 1
            totals = record["totals"]
            self.run["rows"] += totals["rows"]
            self.run["generated_tokens"] += totals["generated_tokens"]
            self.run["errors"] += totals["status"].get("error", 0)
            self.run["files"] += 1
            for k in RUN_COUNTS[1:]:
                self.run[k] += record[k]
            if state.finished > state.to_label:
                raise AssertionError(f"shard {state.id}: {state.finished} items finished of {state.to_label} "
                                     "(a duplicated unit)")
            if state.finished == state.to_label:
                self._complete(state)

    def _complete(self, state: ShardState) -> None:
        """Record a complete shard in the output and drop its state (the lock is held)."""
        record = {"pos": state.pos, "key": state.key, "shard": state.id, "items": state.items,
                  "files": len(state.committed.files), "totals": state.committed.totals}
        path = self.output.path(f"{SHARDS_DIR}/{state.pos:06d}.json")
        data = json.dumps(record, sort_keys=True).encode()

        def write() -> None:
            self.output.fs.makedirs(self.output.path(SHARDS_DIR), exist_ok=True)
            self.output.fs.pipe_file(path, data)

        retrying(write, "shard record", OWN_RETRIES, budget_s=OWN_BUDGET_S, target=path)
        self.totals = add_totals(self.totals, state.committed.totals)
        self.run["items"] += state.to_label
        self.shards.pop(state.pos, None)
        self.by_id.pop(state.id, None)
        if state.seq is not None:
            self.completed += 1
            self.ahead -= state.bytes
            self.ahead_items -= state.to_label
            if self.on_complete is not None:
                self.on_complete(state)
        self._lock.notify_all()

    # -- what the driver reads -------------------------------------------------------------------------------
    def items_finished(self) -> int:
        """Items this run finished: those of complete shards, and of the shards in flight so far."""
        with self._lock:
            return self.run["items"] + sum(s.finished for s in self.shards.values())

    def in_flight(self) -> list[ShardState]:
        with self._lock:
            return list(self.shards.values())

    def complete(self) -> bool:
        """The listing is done and every shard it wrote is complete."""
        with self._lock:
            return self.listing_done and not self.shards

    def reset(self, state: ShardState, committed: Committed, finished: int) -> None:
        """After a rebuild: a shard in flight as its files now say (some of their records may never have arrived)."""
        with self._lock:
            old, new = state.committed.totals, committed.totals
            self.run["rows"] += new["rows"] - old["rows"]
            self.run["generated_tokens"] += new["generated_tokens"] - old["generated_tokens"]
            self.run["errors"] += new["status"].get("error", 0) - old["status"].get("error", 0)
            self.run["files"] += len(committed.files - state.committed.files)
            state.committed, state.finished = committed, finished
            if state.finished >= state.to_label:
                self._complete(state)

    def rescan(self) -> tuple[frozenset[int], dict[int, dict]]:
        """After a lost graph: each shard in flight as its own part files say (a file whose record never reached the
        driver is counted, never redone); returns what the rebuilt graph's reader leaves out: the complete shards,
        and per shard in flight its finished items and committed groups."""
        state: dict[int, dict] = {}
        for shard in self.in_flight():
            listed = _listed_ids(self.output, shard)
            if listed is None:
                continue  # not written yet: nothing of it can be committed
            ids = set(listed)
            committed = read_committed(self.output, shard.pos, shard.key)
            finished = ids & committed.finished
            self.reset(shard, committed, len(finished))
            if len(finished) < shard.to_label:
                state[shard.seq] = {"done": sorted(finished),
                                    "groups": {i: sorted(g) for i, g in committed.groups.items() if i in ids}}
        skip = frozenset(range(self.written)) - {s.seq for s in self.in_flight()}  # a shard its files complete included
        return skip, state


def _listed_ids(output: Output, state: ShardState) -> list[str] | None:
    """The item ids of a shard's listing file (None: the listing has not written it yet)."""
    path = output.path(f"{LISTING_DIR}/{listing_name(state.seq)}")
    try:
        with output.fs.open(path, "rb") as f:
            return read_parquet_file(f, ["item_id"]).column("item_id").to_pylist()
    except FileNotFoundError:
        return None
