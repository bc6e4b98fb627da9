"""Rows labelled so far, told to the driver while a labeler's block is still generating.

Output rows reach the driver a block at a time (the labeler's input block: 32 clips on CPU, 256 on a GPU), which on
a slow model is minutes apart. So the labelers also count each row as the engine finishes it and add the counts,
every second or so, to one small actor the driver made for the run (`RowCounter`, found by name); the driver's
progress line reads it. The counts are for the person waiting, never for bookkeeping: a lost count costs nothing.
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class RowCounter:
    """The run's count of rows the labelers finished (a rebuilt pipeline's redone rows count again)."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def total(self) -> int:
        return self.rows


def start_counter(name: str):
    """The driver's counter for a run (a Ray actor of RowCounter), on the driver's node (which outlives the workers'
    nodes). Ray is imported here, not with the module: the driver sets Ray's environment before it imports it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(num_cpus=0, max_restarts=0)(RowCounter)
    return actor.options(name=name, scheduling_strategy=here).remote()


class RowReporter:
    """A labeler's side: `add(n)` as rows finish; the sum goes to the counter named `name` at most every `every_s`
    seconds (and at `flush`). name None: counts nothing (a labeler outside a run: eval, tests)."""

    def __init__(self, name: str | None, every_s: float = 1.0) -> None:
        self.name, self.every_s = name, every_s
        self.pending, self.last = 0, time.monotonic()
        self._actor = None
        self._lock = threading.Lock()  # the engine's thread adds while a labeler call flushes

    def add(self, n: int) -> None:
        if self.name is None:
            return
        with self._lock:
            self.pending += n
            due = time.monotonic() - self.last >= self.every_s
        if due:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send what is pending; wait: until the counter has it (a labeler's block is done: its rows are counted
        before they reach the driver, so the run's last figure is whole)."""
        with self._lock:
            pending, self.pending, self.last = self.pending, 0, time.monotonic()
        if self.name is None or not pending:
            return
        try:
            import ray

            if self._actor is None:
                self._actor = ray.get_actor(self.name)
            sent = self._actor.add.remote(pending)
            if wait:
                ray.get(sent, timeout=10)
        except Exception as err:  # noqa: BLE001 - progress only: a count that cannot be told is dropped
            log.debug("row counter %s: %s", self.name, err)
            self.name = None
