"""The output location of a run: its filesystem and base path, resolved once, and its layout.

Layout of an output directory (any fsspec URI):
    part-<16 hex of sha1(sorted item_ids)>.parquet   committed files: LABEL_SCHEMA + metadata (pipeline.sink)
    _tmp/                                            files being written; never counted
    _listing/                                        this run's item shards (pipeline.sources)
    _retry/                                          a `retry`'s scratch output, until it is merged (pipeline.retry)
    _summary.json                                    written last (pipeline.summary)
    _report.html                                     a page for people (pipeline.report; `_`: readers skip it)
Readers (pyarrow, pandas, HF datasets) ignore `_`-prefixed paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pipeline.storage import filesystem, full_uri
from schemas.rows import read_metadata
from workers.storage import read_parquet_file

PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
PART_GLOB = f"{PART_PREFIX}*{PART_SUFFIX}"
SUMMARY_NAME = "_summary.json"
REPORT_NAME = "_report.html"
TMP_DIR = "_tmp"
LISTING_DIR = "_listing"
RETRY_DIR = "_retry"


def part_name(item_ids: list[str]) -> str:
    """Deterministic part file name from the items it holds: a rerun of the same items writes the same name."""
    digest = hashlib.sha1("\n".join(sorted(set(item_ids))).encode()).hexdigest()[:16]
    return f"{PART_PREFIX}{digest}{PART_SUFFIX}"


@dataclasses.dataclass(frozen=True)
class OutputState:
    """What a previous run left in an output directory."""

    files: tuple[str, ...]
    done_items: frozenset[str]
    rows: int
    metadata: dict  # schemas.rows.read_metadata of the first file; {} when there is none


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

    def part_paths(self) -> list[str]:
        """The committed part files, sorted."""
        if not self.fs.exists(self.base):
            return []
        return sorted(self.fs.glob(self.path(PART_GLOB)))

    def scan(self) -> OutputState:
        """Committed part files, their finished item_ids and row count (reads the item_id column only)."""
        files = self.part_paths()
        done: set[str] = set()
        rows = 0
        meta: dict = {}
        for i, path in enumerate(files):
            with self.fs.open(path, "rb") as f:
                table = read_parquet_file(f, ["item_id"])
                if i == 0:
                    meta = read_metadata(table.schema.metadata)
                ids = table.column("item_id")
            done.update(ids.unique().to_pylist())
            rows += len(ids)
        return OutputState(tuple(self.uri_of(p) for p in files), frozenset(done), rows, meta)

    def clear(self) -> int:
        """--overwrite: delete committed parts, _summary.json, _report.html and the scratch directories; returns
        files deleted."""
        if not self.fs.exists(self.base):
            return 0
        paths = self.part_paths() + [p for p in (self.path(SUMMARY_NAME), self.path(REPORT_NAME)) if self.fs.exists(p)]
        for path in paths:
            self.fs.rm(path)
        self.clear_scratch()
        return len(paths)

    def clear_scratch(self) -> None:
        """Delete _tmp/, _listing/ and _retry/ (leftovers of a killed run or retry: never part of the output)."""
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
