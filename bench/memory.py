"""Peak memory of a measured run, the largest batch that fits, and the device's copy bandwidth (for the
decode-step roofline).

GPU: `torch.cuda.max_memory_allocated` after a reset (weights, caches and activations; not the
allocator's cached-but-free blocks). CPU: the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs, Linux >= 4.0) minus the RSS right before the model was built:
weights, caches and activations plus whatever the allocator kept; null with a reason elsewhere.
"""
from __future__ import annotations

import ctypes
import time
from typing import Callable

import torch

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """reset() before a run, peak() after: bytes, or None (then `reason` says why)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reason: str | None = None
        rss = _status_kib("VmRSS")
        self.baseline = rss * 1024 if rss is not None else 0
        if device.type == "cpu" and rss is None:
            self.reason = "no /proc/self/status: peak RSS unavailable on this OS"

    def rebase(self) -> None:
        """Take the current RSS as the zero (call right before building a model)."""
        rss = _status_kib("VmRSS")
        self.baseline = rss * 1024 if rss is not None else 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.reason is None:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError as err:
                self.reason = f"cannot reset peak RSS ({err}); reporting null"

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.reason is not None:
            return None
        hwm = _status_kib("VmHWM")
        return None if hwm is None else max(0, hwm * 1024 - self.baseline)

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated (weights + caches + activations)"
        return self.reason or "peak RSS (VmHWM reset per run) minus the RSS right before the model was built"


def timed_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of `fn`, the device synchronised before and after (CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def best_s(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The best of `repeats` timed calls of `fn` after one untimed (page faults on CPU, first-touch on GPU)."""
    fn()
    return min(timed_s(fn, device) for _ in range(repeats))


def _buffer_bytes(device: torch.device, nbytes: int | None) -> int:
    # 1 GiB on CUDA, 256 MiB on CPU: well past a server's shared last-level cache, which 64 MiB was not always
    return nbytes or (2**30 if device.type == "cuda" else 2**28)


@torch.no_grad()
def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 7) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write (2 x size per copy); the best
    of `repeats` copies of `_buffer_bytes`."""
    nbytes = _buffer_bytes(device, nbytes)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = best_s(lambda: dst.copy_(src), device, repeats)
    del src, dst
    return 2 * nbytes / best


@torch.no_grad()
def read_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 7) -> float:
    """A streaming read's bandwidth in bytes/s (a sum over the buffer: reads only, as a decode step's weights
    are read); the best of `repeats`."""
    nbytes = _buffer_bytes(device, nbytes)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    best = best_s(src.sum, device, repeats)
    del src
    return nbytes / best


def probe_batch(device: torch.device, try_batch: Callable[[int], None], release: Callable[[], None], max_batch: int,
                memory_fraction: float) -> list[dict]:
    """CUDA: double the batch from 1 until `try_batch(b)` (a short generation) runs out of memory or its peak
    passes `memory_fraction` of the device; `release()` frees caches between tries. -> one dict per try."""
    total = torch.cuda.get_device_properties(device).total_memory
    tried, b = [], 1
    while b <= max_batch:
        release()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            try_batch(b)
            peak = torch.cuda.max_memory_allocated(device)
        except torch.cuda.OutOfMemoryError:
            tried.append({"batch_size": b, "fits": False, "peak_mem_bytes": None})
            break
        fits = peak <= memory_fraction * total
        tried.append({"batch_size": b, "fits": fits, "peak_mem_bytes": int(peak)})
        if not fits:
            break
        b *= 2
    release()
    return tried


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim), so that the RSS a next model's peak is
    measured from is not inflated, or deflated, by what the last one left in the heap; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
