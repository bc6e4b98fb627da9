"""An in-flight pool's bookkeeping (lavi.serving.inflight): a submission's ticket, its items and its requests."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from lavi.core.fusion import Visual
from lavi.serving.steps import RowTokens


@dataclass
class Ticket:
    """One submission: its requests' results (in request order), filled as they finish. `ids[i]` is request i's
    number in the pool (its constraint's in `InflightPool.guide`)."""

    results: list[RowTokens | None]
    ids: list[int]
    prompts: list[list[int]]
    on_rows: Callable[[int], None] | None = None
    remaining: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, i: int, row: RowTokens) -> None:
        self.results[i] = row
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def fail(self, err: BaseException) -> None:
        self.error = err
        self.done.set()


@dataclass
class Item:
    """A submitted item: encoded when its first request is admitted, let go when its last one is."""

    encode: Callable[[list[int]], Visual]  # the submission's: its item indices -> their visual state
    index: int
    waiting: int  # its requests not admitted yet
    vis: Visual | None = None  # (1 item) once encoded


@dataclass
class Request:
    ticket: Ticket
    i: int  # in the ticket
    item: Item
    prompt: list[int]
    budget: int
    gid: int  # in the pool
