"""Run summary (`_summary.json`, written last) and the progress line shown while a run works.

Totals (rows, items, clips, statuses, tokens) are read back from the committed Parquet
files, so they describe the whole output, including rows from earlier resumed attempts;
`this_run` holds what this attempt did and how fast.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from typing import Any

import pyarrow.compute as pc

from pipeline.output import Output
from workers.progress import start_counter
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
    """What a run has done so far, for the person waiting: on a terminal a live bar (tqdm: items written of the
    total, rate, ETA, with rows labelled, rows written and error rows so far); off a terminal (Ray Jobs logs, CI) a
    plain log line every `every_s` seconds. `update` comes from the driver's loop as rows are written, `labelled`
    from a ticker while blocks are still generating (rows the labelers finished: workers.progress); both may
    call at once. `bar` None: a bar when stderr is a terminal."""

    def __init__(self, total_items: int, every_s: float = 10.0, bar: bool | None = None, stream=None):
        self.total_items = total_items
        self.every_s = every_s
        self.start = self._last = time.monotonic()
        self._bar = None
        self._shown: tuple[int, int, int] | None = None  # the figures of the last line logged
        self._lock = threading.Lock()
        self.items = self.rows = self.errors = 0
        self.rows_labelled: int | None = None
        stream = stream or sys.stderr
        if bar if bar is not None else stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_items, unit="item", file=stream, dynamic_ncols=True, smoothing=0.1,
                             desc="labelling")

    def update(self, items_done: int, rows_done: int, errors: int = 0, force: bool = False) -> str | None:
        """Rows written (committed) so far."""
        with self._lock:
            self.items, self.rows, self.errors = items_done, rows_done, errors
            return self._show(force)

    def labelled(self, rows: int) -> str | None:
        """Rows the labelers have finished, written or not."""
        with self._lock:
            self.rows_labelled = rows
            return self._show(False)

    def _show(self, force: bool) -> str | None:
        now = time.monotonic()
        labelled = max(self.rows_labelled or 0, self.rows)
        done = f"{labelled} rows labelled, {self.rows} written ({self.errors} errors)"
        if self._bar is not None:
            self._bar.set_postfix_str(done, refresh=False)
            self._bar.update(self.items - self._bar.n)
            self._bar.refresh()
            return None
        if (not force and now - self._last < self.every_s) or self._shown == (self.items, self.rows, labelled):
            return None
        self._last, self._shown = now, (self.items, self.rows, labelled)
        elapsed = max(now - self.start, 1e-9)
        rate = self.items / elapsed
        left = self.total_items - self.items
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        line = (f"progress: {self.items}/{self.total_items} items, {done}, {rate:.2f} items/s, "
                f"{labelled / elapsed:.1f} rows/s, ETA {eta}")
        log.info(line)
        return line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Ticker:
    """The run's row counter (workers.progress), read every `every_s` seconds on a thread of its own, so that the
    progress display moves while blocks are still generating, and shows a line off a terminal even when no row
    was written for a while. A counter that cannot be reached stops the ticker, never the run."""

    def __init__(self, progress: Progress, name: str, every_s: float = 1.0) -> None:
        self.progress, self.name, self.every_s = progress, name, every_s
        self._stop = threading.Event()
        try:
            self._counter = start_counter(name)
        except Exception as err:  # noqa: BLE001 - progress only: the labelers then count nothing
            log.warning("no live row count for this run (%s: %s)", type(err).__name__, err)
            self._counter, self.name = None, None
        self._thread = threading.Thread(target=self._tick, name="lavi-progress", daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        import ray

        while self._counter is not None and not self._stop.wait(self.every_s):
            try:
                self.progress.labelled(ray.get(self._counter.total.remote(), timeout=10))
            except Exception as err:  # noqa: BLE001 - progress only
                log.debug("row counter: %s", err)
                return

    def stop(self) -> None:
        """One last read (the rows of the last blocks), then the counter goes."""
        import ray

        self._stop.set()
        self._thread.join(timeout=15)
        if self._counter is None:
            return
        try:
            self.progress.labelled(ray.get(self._counter.total.remote(), timeout=10))
            ray.kill(self._counter)
        except Exception:  # noqa: BLE001 - already gone with its node or the cluster
            pass
