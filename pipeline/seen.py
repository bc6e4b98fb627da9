"""What the listing has seen: distinct 64-bit fingerprints in sorted runs, the large ones in files, so that the
driver's memory is bounded however many items a corpus has.

The listing drops a uri it has seen before (a manifest that names a file twice, a directory and a glob inside it).
A Python set of every uri costs ~150 bytes a uri (300 MB at 2M items); here each costs 8 bytes, on disk once its run
is large: the first 64 bits of the uri's sha1, the same hash as its item_id (schemas.rows.item_id), so two uris that
collide here are two uris whose item ids already collide in their first 16 hex digits.

Runs merge as a binary counter does (log2(N / batch) runs at most). A run of `spill_entries` or more is a file of
raw sorted uint64s in `spill_dir` with only its fences in memory (the first fingerprint of each `BLOCK` entries, a
page: 1/512 of it). A lookup finds each query's page from the fences and searches it in the mapped file, a slice of
queries at a time, the pages dropped from the process after each slice (a mapped page counts in its resident set;
the page cache keeps it): its cost is the batch's, not the run's. Two runs merge by streaming both into a new file,
a chunk of each at a time. So the memory held is the runs under `spill_entries`, the fences, and one slice's pages
or one merge's chunks: a corpus ten times larger costs the driver ~1/512 more of its fingerprints, not all of them.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import uuid
from collections.abc import Iterator

import numpy as np

BLOCK = 512  # entries (one 4 KB page) per fence: a file run's lookup touches one page a query
QUERIES = 256  # queries a lookup runs at once (2 MB of pages touched at most before they are dropped)
CHUNK = 1 << 16  # entries (512 KB) a merge reads of a run at once
EMPTY = np.zeros(0, dtype=np.uint64)


def fingerprints(item_ids: list[str]) -> np.ndarray:
    """uint64 fingerprints of item ids (the first 16 hex digits of each: 64 bits of sha1(uri))."""
    return np.fromiter((int(i[:16], 16) for i in item_ids), dtype=np.uint64, count=len(item_ids))


class FileRun:
    """A sorted run of distinct fingerprints in a file of raw uint64s, its fences in memory. Lookups read the file
    through a read-only mapping whose pages are dropped from the process after each slice of queries (the page cache
    keeps them); merges read it in chunks."""

    def __init__(self, path: str, chunks: Iterator[np.ndarray]) -> None:
        """Write the sorted `chunks` (each sorted, each after the last) to `path`."""
        self.path, self.length = path, 0
        fences = []
        with open(path, "wb") as f:
            for chunk in chunks:
                fences.append(chunk[(-self.length) % BLOCK::BLOCK].copy())  # the entries at multiples of BLOCK (a copy:
                # a view would keep the whole chunk)
                f.write(np.ascontiguousarray(chunk, dtype=np.uint64).tobytes())
                self.length += len(chunk)
        self.fences = np.concatenate(fences) if fences else EMPTY
        self._fd = os.open(path, os.O_RDONLY)
        self._map = mmap.mmap(self._fd, self.length * 8, prot=mmap.PROT_READ)

    def __len__(self) -> int:
        return self.length

    def chunks(self) -> Iterator[np.ndarray]:
        """The run in order, CHUNK entries at a time (read, not mapped)."""
        for start in range(0, self.length, CHUNK):
            n = min(CHUNK, self.length - start)
            yield np.frombuffer(os.pread(self._fd, n * 8, start * 8), dtype=np.uint64)

    def contains(self, fps: np.ndarray) -> np.ndarray:
        """A boolean mask: which of `fps` are in the run. Each query's block is found from the fences, then searched
        in the file, all queries of a slice at once (a binary search of log2(BLOCK) gathers): the pages touched are
        at most one a query, dropped again after each slice of QUERIES."""
        data = np.frombuffer(self._map, dtype=np.uint64)
        hit = np.zeros(len(fps), dtype=bool)
        try:
            for start in range(0, len(fps), QUERIES):
                q = fps[start:start + QUERIES]
                block = np.searchsorted(self.fences, q, side="right") - 1  # -1: below the run's first entry
                lo = np.maximum(block, 0) * BLOCK
                hi = np.minimum(lo + BLOCK, self.length)
                for _ in range(BLOCK.bit_length()):  # lower bound of q in data[lo:hi], every query at once
                    mid = (lo + hi) // 2
                    right = (lo < hi) & (data[np.minimum(mid, self.length - 1)] < q)
                    lo, hi = np.where(right, mid + 1, lo), np.where(right | (lo >= hi), hi, mid)
                hit[start:start + len(q)] = (block >= 0) & (data[np.minimum(lo, self.length - 1)] == q)
                self._map.madvise(mmap.MADV_DONTNEED)
        finally:
            del data  # the mapping can close only once no array views it
        return hit

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
        try:
            os.remove(self.path)
        except OSError:
            pass


def _array_chunks(run: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(run), CHUNK):
        yield run[start:start + CHUNK]


def _chunks(run: np.ndarray | FileRun) -> Iterator[np.ndarray]:
    return run.chunks() if isinstance(run, FileRun) else _array_chunks(run)


def merged(a: Iterator[np.ndarray], b: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Two sorted, disjoint runs (as sorted chunks) -> their union in sorted chunks, a chunk of each at a time: each
    step writes everything up to the smaller of the two chunks' last entries, which uses one chunk up whole."""
    x, y = next(a, EMPTY), next(b, EMPTY)
    while len(x) or len(y):
        if not len(y) or not len(x):
            yield x if len(x) else y
            x, y = (next(a, EMPTY), y) if len(x) else (x, next(b, EMPTY))
            continue
        pivot = min(x[-1], y[-1])
        i, j = np.searchsorted(x, pivot, side="right"), np.searchsorted(y, pivot, side="right")
        part = np.concatenate([x[:i], y[:j]])
        part.sort()
        yield part
        x, y = x[i:], y[j:]
        if not len(x):
            x = next(a, EMPTY)
        if not len(y):
            y = next(b, EMPTY)


class Seen:
    """A set of uint64 fingerprints that only grows; `add` says which of a batch are new."""

    def __init__(self, spill_entries: int = 1 << 16, spill_dir: str | None = None) -> None:
        self.runs: list[np.ndarray | FileRun] = []  # sorted, pairwise disjoint; older and larger first
        self.spill_entries = spill_entries
        self.spill_dir = spill_dir
        self._made_dir = False

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def contains(self, fps: np.ndarray) -> np.ndarray:
        """A boolean mask: which of `fps` (sorted) were added before."""
        hit = np.zeros(len(fps), dtype=bool)
        for run in self.runs:
            if isinstance(run, FileRun):
                hit |= run.contains(fps)
            elif len(run):
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
            if len(a) + len(b) < self.spill_entries:
                both = np.concatenate([a, b])
                both.sort()
                self.runs.append(both)
                continue
            self.runs.append(FileRun(self._path(), merged(_chunks(a), _chunks(b))))
            for old in (a, b):
                if isinstance(old, FileRun):
                    old.close()

    def _path(self) -> str:
        if self.spill_dir is None:
            self.spill_dir, self._made_dir = tempfile.mkdtemp(prefix="lavi-seen-"), True
        return os.path.join(self.spill_dir, f"run-{uuid.uuid4().hex}.u64")

    def close(self) -> None:
        """Drop the runs and delete their files (and the directory, where this set made it)."""
        for run in self.runs:
            if isinstance(run, FileRun):
                run.close()
        self.runs = []
        if self._made_dir and self.spill_dir is not None:
            try:
                os.rmdir(self.spill_dir)
            except OSError:
                pass
