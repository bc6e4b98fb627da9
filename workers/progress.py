"""The labelers' work so far, told to the driver while their blocks are still generating.

Output rows reach the driver a block at a time (the labeler's input block: 32 clips on CPU, 256 on a GPU), which on
a slow model is minutes apart, and a large model's first prefill alone can take minutes. So each labeler tells one
small actor the driver made for the run (`RowCounter`, found by name), every second or so: the rows it finished,
its engine's work (prefills and their tokens, decode steps: lavi.serving.generate.Work) and, while a call is under way, a
heartbeat. The driver's progress line shows the work; its stall watchdog (pipeline.recovery.stream) counts a
labeler that computes as progress, so a slow batch is never taken for a stalled pipeline. The counts are for the
person waiting and the watchdog, never for bookkeeping: a lost count costs nothing.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)
LOADING = "loading"  # a labeler's work while it loads its model ({LOADING: 1}); its engine's counts replace it


class RowCounter:
    """The run's counts: rows the labelers finished (a rebuilt pipeline's redone rows count again), their engines'
    work (summed over labelers, each one's latest figures), and when a labeler last said it was computing."""

    def __init__(self) -> None:
        self.rows = 0
        self.work: dict[str, dict[str, int]] = {}  # labeler -> its engine's latest counts
        self.beat = 0.0  # time.time() of the last heartbeat of a busy labeler
        self.ready = 0.0  # time.time() when a labeler first said it had loaded its model (its counts, not "loading")

    def add(self, n: int, labeler: str | None = None, work: dict[str, int] | None = None,
            busy: bool = False) -> None:
        self.rows += n
        if labeler is not None and work is not None:
            self.work[labeler] = work
            if not self.ready and LOADING not in work:
                self.ready = time.time()
        if busy:
            self.beat = time.time()

    def total(self) -> int:
        return self.rows

    def state(self) -> dict:
        """{"rows", "work": summed engine counts, "beat_age_s": seconds since a busy labeler's heartbeat (None:
        never), "ready_age_s": seconds since the first labeler had loaded its model (None: none yet)}. Ages, not
        times: the driver's clock may not be this node's."""
        work: dict[str, int] = {}
        for counts in self.work.values():
            for k, v in counts.items():
                work[k] = work.get(k, 0) + v
        now = time.time()
        return {"rows": self.rows, "work": work, "beat_age_s": now - self.beat if self.beat else None,
                "ready_age_s": now - self.ready if self.ready else None}


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
    seconds (and at `flush`), with `work()`'s figures. While `busy()` holds (a call under way) a thread of its own
    beats every `every_s`, so a batch whose prefill alone takes minutes still shows a labeler at work. name None:
    counts nothing (a labeler outside a run: eval, tests)."""

    def __init__(self, name: str | None, every_s: float = 1.0, work: Callable[[], dict[str, int]] | None = None,
                 labeler: str | None = None) -> None:
        self.name, self.every_s = name, every_s
        self.work, self.labeler = work, labeler
        self.pending, self.last = 0, time.monotonic()
        self._actor = None
        self._lock = threading.Lock()  # the engine's thread adds while a labeler call flushes
        self._calls = 0  # calls under way (an async labeler runs two at once)
        self._wake = threading.Event()
        if name is not None:
            threading.Thread(target=self._beat, name="lavi-heartbeat", daemon=True).start()

    def add(self, n: int) -> None:
        if self.name is None:
            return
        with self._lock:
            self.pending += n
            due = time.monotonic() - self.last >= self.every_s
        if due:
            self.flush()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """`with reporter.busy():` around a labeler call: its heartbeat goes on while the call runs."""
        with self._lock:
            self._calls += 1
        self._wake.set()
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1

    def _beat(self) -> None:
        while self.name is not None:
            self._wake.wait()
            while self._calls > 0 and self.name is not None:
                self.flush(beat=True)
                time.sleep(self.every_s)
            self._wake.clear()

    def flush(self, wait: bool = False, beat: bool = False) -> None:
        """Send what is pending (and the engine's work); wait: until the counter has it (a labeler's block is done:
        its rows are counted before they reach the driver, so the run's last figure is whole). beat: a heartbeat of
        a labeler computing."""
        with self._lock:
            pending, self.pending, self.last = self.pending, 0, time.monotonic()
            busy = beat and self._calls > 0
        if self.name is None or not (pending or busy or wait):
            return
        try:
            import ray

            if self._actor is None:
                self._actor = ray.get_actor(self.name)
            work = self.work() if self.work is not None else None
            sent = self._actor.add.remote(pending, self.labeler, work, busy)
            if wait:
                ray.get(sent, timeout=10)
        except Exception as err:  # noqa: BLE001 - progress only: a count that cannot be told is dropped
            log.debug("row counter %s: %s", self.name, err)
            self.name = None
