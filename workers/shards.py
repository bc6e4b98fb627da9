"""The pipeline's first stage: listing shards -> their items, read by plain Ray tasks.

The driver writes the items to Parquet listing shards (pipeline.sources.write_shards) and hands Ray Data the list
of their URIs (`ray.data.from_items`, blocks owned by the driver). Each shard is read whole by a task of this
function, with `workers.fetch.retrying`'s retries. Ray Data's own `read_parquet` lists and footer-reads its files
through a pool of actors spread over the cluster (ray.data FooterReader): a node lost while they list failed the
job, and on a small machine the pool is dozens of processes. A task lost with its node is simply run again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from schemas.manifest import ITEM_SCHEMA
from workers.fetch import OWN_BUDGET_S, OWN_RETRIES, fetch_bytes
from workers.storage import iter_parquet_file

SHARD = "shard"  # the column of the driver's blocks: one listing shard URI a row


def read_shards(batch: pa.Table, storage_options: dict | None = None, rows: int = 1000) -> Iterator[pa.Table]:
    """Ray Data map_batches fn: the items (ITEM_SCHEMA) of the shards named in `batch`, `rows` at a time. A shard is
    the job's own file, not a user's input: retried as long as a commit (workers.fetch.OWN_BUDGET_S), then it
    raises FetchError and the job fails (its committed items kept)."""
    for uri in batch.column(SHARD).to_pylist():
        data = fetch_bytes(uri, storage_options, OWN_RETRIES, budget_s=OWN_BUDGET_S)
        for records in iter_parquet_file(pa.BufferReader(data), batch_size=rows):
            yield pa.Table.from_batches([records]).cast(ITEM_SCHEMA)
