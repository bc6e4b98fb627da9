"""Part files: the output's committed Parquet files, their names, what each records, and their atomic write.

A part file holds whole units (an image item, or one clip group of a video) of one listing shard
(pipeline.listing):
    part-<shard: its position, 6 digits>-<its key, 8 hex>-<16 hex of sha1(the sorted unit keys)>.parquet
so its name says which shard it belongs to (a resume finds a shard's files by that prefix) and is a function of
the units it holds (a retried write writes the same name, over the same rows). Outputs of earlier versions have
`part-<16 hex>.parquet` (no shard): `parse_part_name` reads them as legacy.

A file's metadata: LABEL_SCHEMA's (schema version, model, job, generation) and GROUPS_KEY, the clip groups it holds
(JSON {item_id: {"of": groups of the video, "groups": [its groups in this file]}}; an item absent from it is whole
in the file). `part_totals` counts what a file holds from those alone; a shard's totals and the run's are sums of
them, so nothing reads every row back to count (pipeline.ledger).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.rows import COLUMNS, LABEL_SCHEMA
from workers.fetch import OWN_BUDGET_S, OWN_RETRIES, retrying

PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
PART_GLOB = f"{PART_PREFIX}*{PART_SUFFIX}"
TMP_DIR = "_tmp"
GROUPS_KEY = b"lavi_label.groups"
_NAME = re.compile(r"^part-(?:(\d{6})-([0-9a-f]{8})-)?([0-9a-f]{16})\.parquet$")


def shard_id(pos: int, key: str) -> str:
    """The id of a listing shard: "<position, 6 digits>-<key, 8 hex>" (what items carry in schemas.manifest.SHARD)."""
    return f"{pos:06d}-{key}"


def parse_shard_id(shard: str) -> tuple[int, str]:
    pos, key = shard.split("-")
    return int(pos), key


def part_name(units: list[str], shard: str | None = None) -> str:
    """Deterministic part file name from the units it holds (item ids, and "item_id/group" for a video's clip
    groups) and its listing shard: a rerun of the same units writes the same name."""
    digest = hashlib.sha1("\n".join(sorted(set(units))).encode()).hexdigest()[:16]
    return f"{PART_PREFIX}{shard + '-' if shard else ''}{digest}{PART_SUFFIX}"


def parse_part_name(name: str) -> tuple[int, str] | None:
    """A part file's (shard position, shard key); None for a legacy name (no shard) or anything else."""
    m = _NAME.match(name.rsplit("/", 1)[-1])
    return (int(m.group(1)), m.group(2)) if m and m.group(1) else None


def is_part_name(name: str) -> bool:
    return _NAME.match(name.rsplit("/", 1)[-1]) is not None


def held_groups(metadata: dict[bytes, bytes] | None) -> dict[str, dict]:
    """A part file's GROUPS_KEY: {item_id: {"of": n, "groups": [...]}} of the video groups it holds."""
    return json.loads((metadata or {}).get(GROUPS_KEY, b"{}"))


def empty_totals() -> dict[str, Any]:
    return {"rows": 0, "items": 0, "clips": 0, "status": {}, "error_stage": {}, "prompt_tokens": 0,
            "generated_tokens": 0}


def add_totals(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """a + b, key by key (counts, and the status / error_stage counters)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            merged = dict(a.get(k) or {})
            for name, n in v.items():
                merged[name] = merged.get(name, 0) + n
            out[k] = dict(sorted((name, n) for name, n in merged.items() if n))
        else:
            out[k] = a.get(k, 0) + v
    return out


def negated(t: dict[str, Any]) -> dict[str, Any]:
    """-t, so that add_totals(a, negated(b)) is a - b (a count that reaches 0 stays as 0)."""
    return {k: ({n: -c for n, c in v.items()} if isinstance(v, dict) else -v) for k, v in t.items()}


def _counts(column: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    return {c["values"]: c["counts"] for c in pc.value_counts(column).to_pylist() if c["values"] is not None}


def part_totals(table: pa.Table, held: dict[str, dict]) -> dict[str, Any]:
    """What one part file holds (LABEL_SCHEMA columns item_id, clip_index, status, error_stage, num_*_tokens, and its
    held groups): rows; items, counted where they end whole (an image, or a video in the file of its group 0);
    clips (distinct item and clip); status and error-stage counts; prompt and generated tokens."""
    ids = table.column("item_id")
    distinct = pc.unique(ids).to_pylist()
    items = sum(1 for i in distinct if i not in held) + sum(1 for v in held.values() if 0 in v["groups"])
    clips = table.group_by(["item_id", "clip_index"]).aggregate([]).num_rows if table.num_rows else 0
    return {"rows": table.num_rows, "items": items, "clips": clips,
            "status": dict(sorted(_counts(table.column("status")).items())),
            "error_stage": dict(sorted(_counts(table.column("error_stage")).items())),
            "prompt_tokens": pc.sum(table.column("num_prompt_tokens")).as_py() or 0,
            "generated_tokens": pc.sum(table.column("num_generated_tokens")).as_py() or 0}


TOTALS_COLUMNS = ["item_id", "clip_index", "status", "error_stage", "num_prompt_tokens", "num_generated_tokens"]


def read_part_totals(fs: fsspec.AbstractFileSystem, path: str) -> tuple[dict[str, Any], pa.Table, dict]:
    """(part_totals, its item_id column as a table, its held groups) of a committed file, read from its columns."""
    from workers.storage import read_parquet_file

    with fs.open(path, "rb") as f:
        table = read_parquet_file(f, TOTALS_COLUMNS)
    held = held_groups(table.schema.metadata)
    return part_totals(table, held), table.select(["item_id"]), held


def write_part(fs: fsspec.AbstractFileSystem, base: str, table: pa.Table, name: str,
               metadata: dict[bytes, bytes], held: dict[str, dict]) -> int:
    """Commit `table` (LABEL_SCHEMA columns) as `base/name`: written under _tmp/ and moved to its name (a rename on
    a local disk, a server-side copy on an object store), so the file appears whole or not at all; retried as long
    as an output store may be away (workers.fetch.OWN_BUDGET_S). Returns how many tries were retried."""
    meta = {**metadata, GROUPS_KEY: json.dumps(held, sort_keys=True).encode()} if held else dict(metadata)
    data = table.select(list(COLUMNS)).cast(LABEL_SCHEMA.with_metadata(meta))
    final = f"{base}/{name}"

    def commit() -> None:
        tmp = f"{base}/{TMP_DIR}/{uuid.uuid4().hex}-{name}"
        fs.makedirs(f"{base}/{TMP_DIR}", exist_ok=True)
        try:
            with fs.open(tmp, "wb") as f:
                pq.write_table(data, f, compression="zstd")
            fs.mv(tmp, final)
        except BaseException:
            _forget(fs, tmp)  # a try cut short leaves no file behind where it can (the run's end clears the rest)
            raise

    retried = [0]
    retrying(commit, "commit", OWN_RETRIES, budget_s=OWN_BUDGET_S, target=final,
             on_retry=lambda: retried.__setitem__(0, retried[0] + 1))
    return retried[0]


def _forget(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm(path)
    except Exception:  # noqa: BLE001 - absent, or the store still away: the run's end clears _tmp/
        pass
