"""The run's listing: the INPUTs listed on a thread of the driver, a shard at a time, while the pipeline labels.

Entries come from pipeline.sources (each uri once) in a deterministic order and are cut into shards of
`shard_size` distinct items; shard `pos` gets a key (8 hex of sha1 over its item ids) that says which items it
holds. Each shard is decided against what the output already holds (pipeline.resume): skipped whole when complete,
labelled in part or whole otherwise. A shard with items to label is written to `_listing/shard-<seq>.parquet`
(ITEM_SCHEMA, its items carrying their SHARD and a video's DONE_GROUPS; seq numbers the written shards in order),
written aside and moved, so a reader sees it whole; `_listing/_done.json` says how many there are once the
listing ends. The pipeline's reader (workers.shards) follows those files as they appear, so the first items are
labelled while a large corpus is still being listed (a block, workers.settings.READER_BLOCK_BYTES of items, at a time), and
the ledger (pipeline.ledger) learns of each shard. The listing runs at most `max_ahead_bytes` of listing files
ahead of the labelling, so its scratch files stay bounded too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.ledger import Ledger, ShardState
from pipeline.output import Output
from pipeline.resume import COMPLETE, CONFLICT, IN_FLIGHT, LISTING_KEYS, Committed, CommittedIndex, Resume, \
    read_committed
from pipeline.sources import PromptSpec, _batched, iter_items
from schemas.manifest import DONE_GROUPS, ITEM_SCHEMA, SHARD
from workers.fetch import OWN_BUDGET_S, OWN_RETRIES, retrying
from workers.parts import shard_id
from workers.shards import LISTING_DONE, listing_name

log = logging.getLogger(__name__)

SHARD_SIZE = 10_000  # items per listing shard


def max_ahead_bytes() -> int:
    """How far the listing may run ahead of the labelling, in bytes of its items in memory, beyond what the ledger
    adds for its largest shards (Ledger.wait_room): twice the reader's block size (workers.settings.READER_BLOCK_BYTES:
    the reader passes items on a block at a time, so less would wait forever)."""
    from workers import settings

    return 2 * settings.READER_BLOCK_BYTES


def min_ahead_items(config: RunConfig) -> int:
    """The fewest items the listing may hold ahead of the labelling, whatever their bytes: what the pipeline gathers
    before a labeler starts (a split batch, and two input blocks per labeler), so that it never waits on a listing
    that waits on it."""
    return config.decode_batch_size + 2 * config.workers * config.block_rows


def shard_key(item_ids: list[str]) -> str:
    """8 hex of sha1 over a shard's item ids in order: the same items listed the same way give the same key."""
    return hashlib.sha1("\n".join(item_ids).encode()).hexdigest()[:8]


class Lister:
    """Lists config's INPUTs into `output`'s listing on a thread (`start`); `error` holds what ended it early.
    `stats`: listed (distinct items), skipped (finished before), duplicates, own_constraints, non_media."""

    def __init__(self, config: RunConfig, output: Output, resume: Resume, ledger: Ledger,
                 shard_size: int | None = None, max_ahead: int | None = None) -> None:
        self.config, self.output, self.resume, self.ledger = config, output, resume, ledger
        self.shard_size = shard_size or SHARD_SIZE
        self.max_ahead = max_ahead or max_ahead_bytes()
        self.min_ahead = min_ahead_items(config)
        self.stats: dict[str, Any] = {"listed": 0, "skipped": 0, "own_constraints": 0}
        self.error: BaseException | None = None
        self.index: CommittedIndex | None = None  # built at the first shard that cannot be decided by its traces
        self.recount = False  # the run's totals must be counted from every file at its end (pipeline.resume)
        self.stop = threading.Event()
        self.done = threading.Event()
        self.waiting = False  # for room: max_ahead shards written and not complete
        self._thread = threading.Thread(target=self._run, name="lavi-listing", daemon=True)

    def start(self) -> "Lister":
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._list()
        except BaseException as err:  # noqa: BLE001 - handed to the driver, which ends the run with it
            self.error = err
        finally:
            self.done.set()

    def _list(self) -> None:
        config = self.config
        spec = PromptSpec(task=config.task, prompt=config.prompt, questions=config.questions,
                          constraint=config.constraint)
        seq = 0
        for pos, chunk in enumerate(_batched(iter_items(config.inputs, spec, config.storage, stats=self.stats),
                                             self.shard_size)):
            if self.stop.is_set():
                return
            state, keep = self._decide(pos, chunk)
            self.stats["skipped"] += len(chunk) - len(keep)
            if not keep:
                self.ledger.listed(state)
                continue
            self.waiting = True
            self.ledger.wait_room(self.max_ahead, self.min_ahead, self.stop)
            self.waiting = False
            if self.stop.is_set():
                return
            state.seq = seq
            data, state.bytes = self._encode(state, keep)
            self.ledger.listed(state)  # before its file: its first commit record may come at once
            self._put(self.output.path(f"_listing/{listing_name(seq)}"), data)
            seq += 1
        self._put(self.output.path(f"_listing/{LISTING_DONE}"), json.dumps({"shards": seq}).encode())
        self.ledger.done_listing()
        log.info("listing done: %d items in %d shards: %d to label (in %d listing files), %d already done",
                 self.stats["listed"], pos + 1 if self.stats["listed"] else 0, self.ledger.to_label, seq,
                 self.stats["skipped"])

    def _decide(self, pos: int, chunk: list[dict]) -> tuple[ShardState, list[dict]]:
        """The shard's state for the ledger and the items it labels (pipeline.resume decides)."""
        ids = [i["item_id"] for i in chunk]
        key = shard_key(ids)
        decision = CONFLICT if self.index is not None else self.resume.decide(pos, key)
        committed, groups = Committed(), {}
        if decision == COMPLETE:
            keep = []
        elif decision == IN_FLIGHT:
            committed = read_committed(self.output, pos, key)
            keep, groups = [i for i in chunk if i["item_id"] not in committed.finished], committed.groups
        elif decision == CONFLICT:
            if self.index is None:
                log.warning("listing shard %d differs from what the output holds there (the inputs list otherwise "
                            "now, or the output is of an earlier version): indexing every committed item", pos)
                self.index, self.recount = CommittedIndex(self.output), True
            finished = self.index.is_finished(ids)
            keep, groups = [i for i, f in zip(chunk, finished) if not f], self.index.groups
        else:
            keep = chunk
        sid = shard_id(pos, key)
        resumed = 0
        for item in keep:
            item[SHARD] = sid
            done = groups.get(item["item_id"])
            if done:
                item[DONE_GROUPS] = sorted(done)
                resumed += len(done)
        state = ShardState(pos=pos, key=key, items=len(chunk), to_label=len(keep), committed=committed,
                           resumed_groups=resumed, recorded=decision == COMPLETE)
        return state, keep

    @staticmethod
    def _encode(state: ShardState, items: list[dict]) -> tuple[bytes, int]:
        """A listing file: the items (ITEM_SCHEMA), the shard's position and key in its metadata; and the items'
        bytes in memory (as the reader holds them)."""
        meta = {LISTING_KEYS[0]: str(state.pos).encode(), LISTING_KEYS[1]: state.key.encode()}
        table = pa.Table.from_pylist(items, schema=ITEM_SCHEMA.with_metadata(meta))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes(), table.nbytes

    def _put(self, path: str, data: bytes) -> None:
        """Write aside and move: a reader sees the file whole or not at all."""
        fs = self.output.fs

        def put() -> None:
            tmp = f"{path.rsplit('/', 1)[0]}/_tmp-{uuid.uuid4().hex}"
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)

        retrying(put, "listing write", OWN_RETRIES, budget_s=OWN_BUDGET_S, target=path)

    def active(self) -> bool:
        """Listing now: not done, not waiting for the labelling to make room (a pipeline that waits for the next
        block of a slow listing is not stalled)."""
        return not self.done.is_set() and not self.waiting

    def empty(self, state: ShardState) -> None:
        """A complete shard's listing file, emptied (the scratch stays bounded; a reader after a rebuild skips it)."""
        self._put(self.output.path(f"_listing/{listing_name(state.seq)}"), self._encode(state, [])[0])
