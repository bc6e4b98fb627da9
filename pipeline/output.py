"""The output location of a run: its filesystem and base path, resolved once, and its layout.

Layout of an output directory (any fsspec URI):
    part-<shard>-<16 hex of sha1(sorted unit keys)>.parquet
                       committed files: LABEL_SCHEMA + metadata, whole units of one listing shard (workers.parts)
    _shards/<position>.json
                       a listing shard whose items are all committed: its key and totals (pipeline.ledger)
    _tmp/              files being written; never counted
    _listing/          this run's listing shards, written as the inputs are listed (pipeline.listing)
    _retry/            a `retry`'s scratch output, until it is merged (pipeline.retry)
    _summary.json      written last (pipeline.summary)
    _report.html       a page for people (pipeline.report; `_`: readers skip it)
Readers (pyarrow, pandas, HF datasets) ignore `_`-prefixed paths.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pyarrow.parquet as pq

from pipeline.storage import filesystem, full_uri
from schemas.rows import read_metadata
from workers.parts import GROUPS_KEY, PART_GLOB, PART_PREFIX, PART_SUFFIX, TMP_DIR, held_groups, part_name  # noqa: F401
from workers.storage import read_parquet_file

SUMMARY_NAME = "_summary.json"
REPORT_NAME = "_report.html"
LISTING_DIR = "_listing"
RETRY_DIR = "_retry"
SHARDS_DIR = "_shards"


@dataclasses.dataclass(frozen=True)
class OutputState:
    """What a previous run left in an output directory."""

    files: tuple[str, ...]
    done_items: frozenset[str]  # finished: every row of the item is committed
    rows: int
    metadata: dict  # schemas.rows.read_metadata of the first file; {} when there is none
    done_groups: dict[str, frozenset[int]] = dataclasses.field(default_factory=dict)  # unfinished videos: the
    # clip groups committed so far


class Output:
    """One output URI: `fs` and `base` (its path in fs, no trailing slash), and what a run does there."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri
        self.fs, base = filesystem(uri, storage_options)
        self.base = base.rstrip("/")

    def path(self, name: str) -> str:
        """The path of `name` (a file or sub-directory) inside the output."""
        return f"{self.base}/{name}"

    def uri_of(self, path: str) -> str:
        """A path inside the output -> a URI that opens it again."""
        return full_uri(self.fs, path)

    @property
    def listing(self) -> str:
        """The directory of this run's listing shards."""
        return self.path(LISTING_DIR)

    def part_paths(self, prefix: str = "") -> list[str]:
        """The committed part files (those whose name starts with `part-<prefix>`), sorted."""
        if not self.fs.exists(self.base):
            return []
        return sorted(self.fs.glob(self.path(f"{PART_PREFIX}{prefix}*{PART_SUFFIX}")))

    def metadata(self) -> dict:
        """The settings (schemas.rows.read_metadata: model, job id, generation) the output's files were written with,
        from one file's footer; {} when there is none."""
        paths = self.part_paths()
        if not paths:
            return {}
        with self.fs.open(paths[0], "rb") as f:
            return read_metadata(pq.ParquetFile(f).schema_arrow.metadata)

    def scan(self) -> OutputState:
        """Every committed part file read back: their finished item_ids (an item is finished when it is whole in a
        file, or all its clip groups are committed), the committed groups of the others, and the row count (reads
        the item_id column and the files' metadata). Memory for every item: for tools and tests on small outputs;
        a run decides its resume per listing shard (pipeline.resume)."""
        files = self.part_paths()
        done: set[str] = set()
        groups: dict[str, set[int]] = {}
        of: dict[str, int] = {}
        rows = 0
        meta: dict = {}
        for i, path in enumerate(files):
            with self.fs.open(path, "rb") as f:
                table = read_parquet_file(f, ["item_id"])
                if i == 0:
                    meta = read_metadata(table.schema.metadata)
                held = held_groups(table.schema.metadata)
                ids = table.column("item_id")
            for item in ids.unique().to_pylist():
                if item in held:
                    groups.setdefault(item, set()).update(held[item]["groups"])
                    of[item] = held[item]["of"]
                else:
                    done.add(item)
            rows += len(ids)
        done.update(item for item, got in groups.items() if len(got) >= of[item])
        partial = {item: frozenset(got) for item, got in groups.items() if item not in done}
        return OutputState(tuple(self.uri_of(p) for p in files), frozenset(done), rows, meta, partial)

    def clear(self) -> int:
        """--overwrite: delete committed parts, _summary.json, _report.html and the scratch directories; returns
        files deleted."""
        if not self.fs.exists(self.base):
            return 0
        paths = self.part_paths() + [p for p in (self.path(SUMMARY_NAME), self.path(REPORT_NAME)) if self.fs.exists(p)]
        for path in paths:
            self.fs.rm(path)
        if self.fs.exists(self.path(SHARDS_DIR)):
            self.fs.rm(self.path(SHARDS_DIR), recursive=True)
        self.clear_scratch()
        return len(paths)

    def clear_scratch(self) -> None:
        """Delete _tmp/, _listing/ and _retry/ (leftovers of a killed run or retry: never part of the output)."""
        self.fs.invalidate_cache()  # an object store's listings cached before the workers wrote there
        for sub in (TMP_DIR, LISTING_DIR, RETRY_DIR):
            if self.fs.exists(self.path(sub)):
                self.fs.rm(self.path(sub), recursive=True)

    def clear_summary(self) -> None:
        """Remove `_summary.json` as a run starts: while it works, the output is not complete."""
        if self.fs.exists(self.path(SUMMARY_NAME)):
            self.fs.rm(self.path(SUMMARY_NAME))

    def write_summary(self, summary: dict) -> str:
        """Write `_summary.json` (the completion marker: written after every part file); returns its URI."""
        self.fs.pipe_file(self.path(SUMMARY_NAME), json.dumps(summary, indent=2, sort_keys=True).encode())
        return self.uri_of(self.path(SUMMARY_NAME))

    def read_summary(self) -> dict | None:
        """The output's `_summary.json`, or None when the run never finished."""
        if not self.fs.exists(self.path(SUMMARY_NAME)):
            return None
        return json.loads(self.fs.cat_file(self.path(SUMMARY_NAME)))
