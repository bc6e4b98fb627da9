"""An engine's in-flight pool on a thread of its own, shared by a labeler's concurrent calls.

Ray Data calls an async labeler for several input blocks at once (`StreamingLabeler`); each call submits its block's
requests here and awaits them, and this thread steps the engine (`lavi.serving.engine.Engine.step`): the next block's
requests are admitted while the current one drains, so the pool stays full across blocks. Anything else that must
use the engine's cache (a block retried in static batches after a failed step) runs here too, as an exclusive job,
once no row is in flight.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from lavi.serving.engine import Engine
    from lavi.serving.tickets import Ticket

log = logging.getLogger(__name__)


class EngineServer:
    def __init__(self, engine: "Engine", idle_s: float = 0.05) -> None:
        import torch

        self.engine, self.idle_s = engine, idle_s
        # OpenMP's thread count is per thread: a new one starts at OMP_NUM_THREADS (Ray sets 1 under a whole CPU), not
        # at what the labeler set (workers.cpu_share.cpu_threads), so this thread computed on one core of two
        self.threads = torch.get_num_threads()
        self.jobs: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()
        self.wake = threading.Event()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="engine-server", daemon=True)
        self.thread.start()

    def submit(self, *args, **kwargs) -> "Ticket":
        """`Engine.submit`: the requests join the pool; await the ticket's `done`."""
        ticket = self.engine.submit(*args, **kwargs)
        self.wake.set()
        return ticket

    def exclusive(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on this thread once no row is in flight (new requests wait meanwhile); its result or error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((fn, future))
        self.wake.set()
        return future

    def stop(self) -> None:
        """End the thread after its current step (an actor's process ends it anyway)."""
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        while not self.stopped:
            try:
                if not self.jobs.empty():
                    if self.engine.in_flight:
                        self.engine.step(admit=False)
                        continue
                    fn, future = self.jobs.get()
                    try:
                        future.set_result(fn())
                    except BaseException as err:  # noqa: BLE001 - the caller gets it
                        future.set_exception(err)
                    continue
                if not self.engine.step():
                    self.wake.wait(self.idle_s)
                    self.wake.clear()
            except Exception as err:  # noqa: BLE001 - the failed tickets carry it to their calls
                log.warning("in-flight step failed (%s: %s); its blocks are retried in static batches",
                            type(err).__name__, err)
