"""The pipeline's first stage: the listing's shards -> their items, read by one long-lived task as they appear.

The driver lists the INPUTs on a thread while the pipeline runs (pipeline.listing), writing listing shards
`shard-<seq>.parquet` in order, each moved into place whole, and `_done.json` ({"shards": n}) once it ends. The
reader follows them: it reads shard 0, 1, 2, ... as each appears (polling the listing directory) and stops after
the last one. What it yields is a function of those files alone, so a reader task lost with its node and run again
yields the same items in the same order (Ray replays a streaming generator; one that yields otherwise fails the
dataset, and the driver rebuilds it). A rebuilt pipeline's reader is told which shards are complete (`skip`) and,
for the others, which items are finished and which clip groups are committed (`state`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from schemas.manifest import DONE_GROUPS, ITEM_SCHEMA
from workers.fetch import OWN_BUDGET_S, OWN_RETRIES, fetch_bytes, retrying
from workers.storage import filesystem, iter_parquet_file

SOURCE = "reader"  # the column of the driver's one block: the reader's number
LISTING_DONE = "_done.json"


def listing_name(seq: int) -> str:
    return f"shard-{seq:06d}.parquet"


def read_listing(batch: pa.Table, listing: str, storage_options: dict | None = None,
                 skip: frozenset[int] = frozenset(), state: dict[int, dict] | None = None, rows: int = 1000,
                 poll_s: float = 0.2) -> Iterator[pa.Table]:
    """Ray Data map_batches fn (one task): the items (ITEM_SCHEMA) of the listing's shards, in order, `rows` at a
    time, waiting for each shard the driver has yet to write. `skip`: shards left out; `state`: seq -> {"done":
    finished item ids, "groups": {item_id: committed groups}}, applied to that shard's items. A shard is the job's own
    file: read with retries as long as a commit's (workers.fetch.OWN_BUDGET_S), then the task fails."""
    fs, base = filesystem(listing, storage_options)
    base, state, seq = base.rstrip("/"), state or {}, 0

    def exists(path: str) -> bool:
        return retrying(lambda: fs.exists(path), "listing read", OWN_RETRIES, budget_s=OWN_BUDGET_S, target=path)

    while True:
        path = f"{base}/{listing_name(seq)}"
        if exists(path):
            if seq not in skip:
                data = fetch_bytes(fs.unstrip_protocol(path), storage_options, OWN_RETRIES, budget_s=OWN_BUDGET_S)
                for records in iter_parquet_file(pa.BufferReader(data), batch_size=rows):
                    table = _apply(pa.Table.from_batches([records]).cast(ITEM_SCHEMA), state.get(seq))
                    if table.num_rows:
                        yield table
            seq += 1
            continue
        done = f"{base}/{LISTING_DONE}"
        if exists(done) and seq >= json.loads(fs.cat_file(done))["shards"]:
            return
        time.sleep(poll_s)


def _apply(items: pa.Table, state: dict | None) -> pa.Table:
    """A rebuilt pipeline's view of a shard's items: the finished ones left out, a video's committed groups added
    to its DONE_GROUPS."""
    if not state:
        return items
    items = items.filter(pc.invert(pc.is_in(items.column("item_id"), value_set=pa.array(state["done"],
                                                                                       pa.string()))))
    if not state.get("groups"):
        return items
    rows = items.to_pylist()
    for row in rows:
        more = state["groups"].get(row["item_id"])
        if more:
            row[DONE_GROUPS] = sorted(set(row[DONE_GROUPS] or ()) | set(more))
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)
