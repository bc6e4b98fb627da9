"""Run summary (`_summary.json`, written last) and the progress line shown while a run works.

Totals (rows, items, clips, statuses, tokens) describe the whole output, rows of earlier resumed attempts included:
the sum of the listing shards' records (pipeline.ledger), each the sum of its part files' records written at
commit, so the end of a run reads nothing back; `totals` recounts them from the files' columns, one file at a time,
where that sum cannot be trusted (pipeline.resume: inputs listed otherwise than before) and after a `retry`.
`this_run` holds what this attempt did and how fast.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from typing import Any

from pipeline.output import Output
from schemas.rows import ERROR, SCHEMA_VERSION
from workers.parts import add_totals, empty_totals, read_part_totals
from workers.progress import LOADING, start_counter

log = logging.getLogger(__name__)


def totals(output: Output) -> dict[str, Any]:
    """Counts over every committed part file of the output, read back a file at a time (memory for one file)."""
    total = empty_totals()
    for path in output.part_paths():
        total = add_totals(total, read_part_totals(output.fs, path)[0])
    return with_rate(total)


def with_rate(total: dict[str, Any]) -> dict[str, Any]:
    """Totals with their error rate (error rows over rows)."""
    return {**total, "error_rate": (total["status"].get(ERROR, 0) / total["rows"]) if total["rows"] else 0.0}


def build_summary(total: dict[str, Any], *, job_id: str, model: str, generation: dict, wall_s: float,
                  items_listed: int, items_skipped: int, rows_written: int, items_written: int, generated_tokens: int,
                  files_written: int) -> dict:
    """The `_summary.json` document: the output's totals and this run's figures."""
    wall = max(wall_s, 1e-9)
    return {
        "schema_version": SCHEMA_VERSION, "job_id": job_id, "model": model, "generation": generation,
        "complete": True, **with_rate(total),
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
    items listed so far, rate, ETA, with rows labelled, rows written, error rows and the labelers' work so far); off a
    terminal (Ray Jobs logs, CI) a plain log line every `every_s` seconds. `update` comes from the driver's loop as
    files are committed, `labelled` from a ticker while blocks are still generating (rows the labelers finished and
    their engines' work: workers.progress); both may call at once. The total grows while the inputs are listed
    (`listing` True until it is final). `bar` None: a bar when stderr is a terminal."""

    def __init__(self, total_items: int = 0, every_s: float = 10.0, bar: bool | None = None, stream=None,
                 listed=None):
        self.total_items = total_items
        self.listing = False
        self.listed = listed  # fn -> (items listed so far, listing still going): the total between updates
        self.every_s = every_s
        self.start = self._last = time.monotonic()
        self._bar = None
        self._shown: tuple | None = None  # the figures of the last line logged
        self._lock = threading.Lock()
        self.items = self.rows = self.errors = 0
        self.rows_labelled: int | None = None
        self.work: dict[str, int] = {}
        stream = stream or sys.stderr
        if bar if bar is not None else stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_items, unit="item", file=stream, dynamic_ncols=True, smoothing=0.1,
                             desc="labelling")

    def update(self, items_done: int, rows_done: int, errors: int = 0, force: bool = False,
               total: int | None = None, listing: bool | None = None) -> str | None:
        """Items and rows committed so far (and the items listed so far, while the listing goes on)."""
        with self._lock:
            self.items, self.rows, self.errors = items_done, rows_done, errors
            if total is not None:
                self.total_items = total
            if listing is not None:
                self.listing = listing
            return self._show(force)

    def labelled(self, rows: int, work: dict[str, int] | None = None) -> str | None:
        """Rows the labelers have finished, written or not, and their engines' work."""
        with self._lock:
            self.rows_labelled = rows
            self.work = work or self.work
            return self._show(False)

    def _work(self) -> str:
        w = self.work
        if not w:
            return ""
        loading = f"{w[LOADING]} loading the model, " if w.get(LOADING) else ""
        return (f"; labelers: {loading}{w.get('prefills', 0)} prefills ({w.get('prefill_tokens', 0)} tokens), "
                f"{w.get('decode_steps', 0)} decode steps")

    def _show(self, force: bool) -> str | None:
        now = time.monotonic()
        if self.listed is not None:
            self.total_items, self.listing = self.listed()
        labelled = max(self.rows_labelled or 0, self.rows)
        done = f"{labelled} rows labelled, {self.rows} written ({self.errors} errors){self._work()}"
        total = f"{self.total_items}{'+ (listing)' if self.listing else ''}"
        if self._bar is not None:
            if self._bar.total != self.total_items:
                self._bar.total = self.total_items
            self._bar.set_postfix_str(done, refresh=False)
            self._bar.update(self.items - self._bar.n)
            self._bar.refresh()
            return None
        figures = (self.items, self.rows, labelled, self.total_items, tuple(sorted(self.work.items())))
        if (not force and now - self._last < self.every_s) or self._shown == figures:
            return None
        self._last, self._shown = now, figures
        elapsed = max(now - self.start, 1e-9)
        rate = self.items / elapsed
        left = self.total_items - self.items
        eta = f"{left / rate:.0f} s{'+' if self.listing else ''}" if rate > 0 else "?"
        line = (f"progress: {self.items}/{total} items, {done}, {rate:.2f} items/s, "
                f"{labelled / elapsed:.1f} rows/s, ETA {eta}")
        log.info(line)
        return line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def release_free_memory() -> None:
    """Give the driver's freed heap back to the system (glibc's malloc_trim; nothing elsewhere). The driver frees what
    each block's bookkeeping took, but glibc keeps freed pages in its arenas, so its resident memory crept up with the
    corpus (seen in a 400k-item run: +15 MB over 200k items without, +9 MB with a trim every few seconds)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


class Ticker:
    """The run's counter (workers.progress), read every `every_s` seconds on a thread of its own, so that the
    progress display moves while blocks are still generating (rows labelled, the engines' prefills and decode steps),
    and the stall watchdog knows when a labeler is computing (`busy`). A counter that cannot be reached stops the
    ticker, never the run."""

    BUSY_S = 30.0  # a labeler's heartbeat at most this old: it computes (it beats every second while it does)
    TRIM_TICKS = 30  # every this many ticks, the driver's freed heap goes back to the system (release_free_memory)

    def __init__(self, progress: Progress, name: str, every_s: float = 1.0) -> None:
        self.progress, self.name, self.every_s = progress, name, every_s
        self.state: dict = {}
        self.ready_at: float | None = None  # time.monotonic() here when the first labeler had loaded its model
        self._read_at = time.monotonic()
        self._stop = threading.Event()
        try:
            self._counter = start_counter(name)
        except Exception as err:  # noqa: BLE001 - progress only: the labelers then count nothing
            log.warning("no live row count for this run (%s: %s)", type(err).__name__, err)
            self._counter, self.name = None, None
        self._thread = threading.Thread(target=self._tick, name="lavi-progress", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import ray

        self.state = ray.get(self._counter.state.remote(), timeout=10)
        self._read_at = time.monotonic()
        if self.ready_at is None and self.state.get("ready_age_s") is not None:
            self.ready_at = self._read_at - self.state["ready_age_s"]
        self.progress.labelled(self.state["rows"], self.state["work"])

    def _tick(self) -> None:
        ticks = 0
        while self._counter is not None and not self._stop.wait(self.every_s):
            ticks += 1
            if ticks % self.TRIM_TICKS == 0:
                release_free_memory()
            try:
                self._read()
            except Exception as err:  # noqa: BLE001 - progress only
                log.debug("row counter: %s", err)
                return

    def busy(self) -> bool:
        """Whether a labeler said, a moment ago, that it is computing (a long prefill is work, not a stall)."""
        age = self.state.get("beat_age_s")
        return age is not None and age + time.monotonic() - self._read_at < self.BUSY_S

    def stop(self) -> None:
        """One last read (the rows of the last blocks), then the counter goes."""
        import ray

        self._stop.set()
        self._thread.join(timeout=15)
        if self._counter is None:
            return
        try:
            self._read()
            ray.kill(self._counter)
        except Exception:  # noqa: BLE001 - already gone with its node or the cluster
            pass
