"""What the listing has seen: distinct 64-bit fingerprints in sorted numpy runs, spilled to disk when large.

The listing drops a uri it has seen before (a manifest that names a file twice, a directory and a glob inside it).
A Python set of every uri costs ~150 bytes a uri (300 MB at 2M items); here each costs 8 bytes: the first 64 bits
of the uri's sha1, the same hash as its item_id (schemas.rows.item_id), so two uris that collide here are two uris
whose item ids already collide in their first 16 hex digits. Lookups are batched (one vectorised search per run
for a batch of fingerprints), runs merge as a binary counter does (log2(N / batch) runs at most), and a run over
`spill_entries` is written to `spill_dir` and memory-mapped, so the driver's memory stays bounded however many
items a corpus has.
"""

from __future__ import annotations

import os
import tempfile
import uuid

import numpy as np


def fingerprints(item_ids: list[str]) -> np.ndarray:
    """uint64 fingerprints of item ids (the first 16 hex digits of each: 64 bits of sha1(uri))."""
    return np.fromiter((int(i[:16], 16) for i in item_ids), dtype=np.uint64, count=len(item_ids))


class Seen:
    """A set of uint64 fingerprints that only grows; `add` says which of a batch are new."""

    def __init__(self, spill_entries: int = 1 << 24, spill_dir: str | None = None) -> None:
        self.runs: list[np.ndarray] = []  # sorted, pairwise disjoint; older and larger first
        self.spill_entries = spill_entries
        self.spill_dir = spill_dir
        self._spilled: list[str] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def contains(self, fps: np.ndarray) -> np.ndarray:
        """A boolean mask: which of `fps` were added before."""
        hit = np.zeros(len(fps), dtype=bool)
        for run in self.runs:
            idx = np.minimum(np.searchsorted(run, fps), len(run) - 1)
            hit |= run[idx] == fps
        return hit

    def add(self, fps: np.ndarray) -> np.ndarray:
        """Add a batch; returns a mask of the entries that are new: the first occurrence of each fingerprint that
        was not added before."""
        fps = np.asarray(fps, dtype=np.uint64)
        uniq, first = np.unique(fps, return_index=True)
        new = ~self.contains(uniq)
        mask = np.zeros(len(fps), dtype=bool)
        mask[first[new]] = True
        if new.any():
            self._push(uniq[new])
        return mask

    def _push(self, run: np.ndarray) -> None:
        self.runs.append(run)
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            b, a = self.runs.pop(), self.runs.pop()
            merged = np.concatenate([a, b])
            merged.sort(kind="stable")
            for old in (a, b):
                if isinstance(old, np.memmap):
                    self._forget(old.filename)
            self.runs.append(self._spill(merged) if len(merged) >= self.spill_entries else merged)

    def _spill(self, run: np.ndarray) -> np.ndarray:
        """A large run on disk, memory-mapped (the page cache holds what lookups touch, not the driver's heap)."""
        if self.spill_dir is None:
            self.spill_dir = tempfile.mkdtemp(prefix="lavi-seen-")
        path = os.path.join(self.spill_dir, f"run-{uuid.uuid4().hex}.npy")
        np.save(path, run)
        self._spilled.append(path)
        return np.load(path, mmap_mode="r")

    def _forget(self, path: str) -> None:
        try:
            os.remove(path)
        except OSError:
            pass
        if path in self._spilled:
            self._spilled.remove(path)

    def close(self) -> None:
        """Drop the runs and delete the spilled files."""
        self.runs = []
        for path in list(self._spilled):
            self._forget(path)
