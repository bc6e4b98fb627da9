"""Run summary (`_summary.json`, written last) and the progress line shown while a run works.

Totals (rows, items, clips, statuses, tokens) are read back from the committed Parquet
files, so they describe the whole output, including rows from earlier resumed attempts;
`this_run` holds what this attempt did and how fast.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from typing import Any

import pyarrow.compute as pc

from pipeline.output import Output
from schemas.rows import ERROR, SCHEMA_VERSION
from workers.storage import read_parquet_file

log = logging.getLogger(__name__)

_COLUMNS = ["item_id", "clip_index", "status", "error_stage", "num_prompt_tokens", "num_generated_tokens"]


def totals(output: Output) -> dict[str, Any]:
    """Counts over every committed part file of the output."""
    rows = 0
    items: set[str] = set()
    clips: set[tuple[str, int | None]] = set()
    status: collections.Counter = collections.Counter()
    stage: collections.Counter = collections.Counter()
    prompt_tokens = generated_tokens = 0
    for path in output.part_paths():
        with output.fs.open(path, "rb") as f:
            table = read_parquet_file(f, _COLUMNS)  # on this thread: see there
        rows += table.num_rows
        ids = table.column("item_id").to_pylist()
        items.update(ids)
        clips.update(zip(ids, table.column("clip_index").to_pylist()))
        status.update(table.column("status").to_pylist())
        stage.update(s for s in table.column("error_stage").to_pylist() if s is not None)
        prompt_tokens += pc.sum(table.column("num_prompt_tokens")).as_py() or 0
        generated_tokens += pc.sum(table.column("num_generated_tokens")).as_py() or 0
    return {
        "rows": rows, "items": len(items), "clips": len(clips),
        "status": dict(sorted(status.items())), "error_stage": dict(sorted(stage.items())),
        "error_rate": (status.get(ERROR, 0) / rows) if rows else 0.0,
        "prompt_tokens": prompt_tokens, "generated_tokens": generated_tokens,
    }


def build_summary(output: Output, *, job_id: str, model: str,
                  generation: dict, wall_s: float, items_listed: int, items_skipped: int,
                  rows_written: int, items_written: int, generated_tokens: int, files_written: int) -> dict:
    """The `_summary.json` document."""
    total = totals(output)
    wall = max(wall_s, 1e-9)
    return {
        "schema_version": SCHEMA_VERSION, "job_id": job_id, "model": model, "generation": generation,
        "complete": True, **total,
        "this_run": {
            "wall_s": round(wall_s, 3), "items_listed": items_listed, "items_skipped": items_skipped,
            "items": items_written, "rows": rows_written, "files": files_written,
            "generated_tokens": generated_tokens,
            "items_per_s": round(items_written / wall, 3), "rows_per_s": round(rows_written / wall, 3),
            "tokens_per_s": round(generated_tokens / wall, 3),
        },
    }


def format_summary(summary: dict) -> str:
    """A few lines a person reads at the end of a run."""
    run = summary["this_run"]
    status = ", ".join(f"{k} {v}" for k, v in summary["status"].items()) or "none"
    lines = [
        f"job {summary['job_id']}: {summary['rows']} rows for {summary['items']} items "
        f"({summary['clips']} clips); status: {status}",
        f"this run: {run['items']} items, {run['rows']} rows in {run['wall_s']:.1f} s "
        f"({run['items_per_s']:.2f} items/s, {run['tokens_per_s']:.1f} tokens/s); "
        f"{run['items_skipped']} items already done",
    ]
    skipped = summary.get("non_media_files") or {}
    if skipped:
        lines.append(f"left out {sum(skipped.values())} files that are neither images nor videos: "
                     + ", ".join(f"{ext} {n}" for ext, n in sorted(skipped.items(), key=lambda kv: -kv[1])))
    if summary["error_stage"]:
        stages = ", ".join(f"{k} {v}" for k, v in summary["error_stage"].items())
        lines.append(f"errors by stage: {stages} (error rate {summary['error_rate']:.1%})")
    return "\n".join(lines)


class Progress:
    """What a run has done so far, for the person waiting: on a terminal a live bar (tqdm: items done of the total,
    rate, ETA, with rows and error rows so far), updated on every batch of rows that reaches the driver; off a
    terminal (Ray Jobs logs, CI) a plain log line every `every_s` seconds. `bar` None: a bar when stderr is a
    terminal."""

    def __init__(self, total_items: int, every_s: float = 10.0, bar: bool | None = None, stream=None):
        self.total_items = total_items
        self.every_s = every_s
        self.start = self._last = time.monotonic()
        self._bar = None
        self._shown: tuple[int, int] | None = None  # the figures of the last line logged
        stream = stream or sys.stderr
        if bar if bar is not None else stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_items, unit="item", file=stream, dynamic_ncols=True, smoothing=0.1,
                             desc="labelling")

    def update(self, items_done: int, rows_done: int, errors: int = 0, force: bool = False) -> str | None:
        now = time.monotonic()
        if self._bar is not None:
            self._bar.set_postfix_str(f"{rows_done} rows, {errors} errors", refresh=False)
            self._bar.update(items_done - self._bar.n)
            return None
        if (not force and now - self._last < self.every_s) or self._shown == (items_done, rows_done):
            return None
        self._last, self._shown = now, (items_done, rows_done)
        elapsed = max(now - self.start, 1e-9)
        rate = items_done / elapsed
        left = self.total_items - items_done
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        line = (f"progress: {items_done}/{self.total_items} items, {rows_done} rows ({errors} errors), "
                f"{rate:.2f} items/s, {rows_done / elapsed:.1f} rows/s, ETA {eta}")
        log.info(line)
        return line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
