"""One input opened for range reads through fsspec: what the streamed video path decodes from.

A long video is never read whole: the probe reads its header, each clip group the byte ranges its frames need
(PyAV on the file object seeks; s3fs, gcsfs and http files turn each fetch into one range request).
Each fetch (and the open) is retried on transient errors as whole-file reads are (`workers.fetch.retrying`:
backoff, bounded in attempts and time). `InputFile` counts the bytes fetched from storage and the fetches retried
(`Reads`), and keeps the first read error that retrying did not cure: PyAV swallows an exception raised inside
its read callback (it logs it and sees the end of the file), which would turn a dropped connection into a
silently truncated video, so the decoders ask `raise_read_error` when they are done.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

from workers.fetch import (DEFAULT_RETRIES, RETRY_BUDGET_S, FetchError, _classify, _describe, known,
                           open_filesystem, retrying)

MIN_FETCH = 1 << 15  # 32 KiB (what PyAV asks at once): the first read after a seek (a header, an index, a keyframe)
PROBE_FETCH = 1 << 18  # 256 KiB: the most the probe fetches at once (an MP4's index can be a few MB)
DECODE_FETCH = 2 << 20  # 2 MiB: the most a clip group fetches at once, when it reads on and on
_BUFFERS = 3  # fetched ranges kept: a container's header, its index and where it reads now


@dataclass(frozen=True)
class Reads:
    """What reading (part of) an input cost: bytes fetched from storage, and fetches retried after a transient
    error (those that then succeeded and those that did not)."""

    bytes: int = 0
    retries: int = 0

    def __add__(self, other: "Reads") -> "Reads":
        return Reads(self.bytes + other.bytes, self.retries + other.retries)


class InputFile(io.RawIOBase):
    """A read-only view of an fsspec file opened without a cache of its own, with an adaptive read-ahead: a read
    that continues the last fetch doubles the next one (from MIN_FETCH up to `max_fetch`), a read elsewhere (a
    seek) starts small again. So a demuxer's header and index reads and the lead-in of a seek cost a few small
    range requests, sequential decoding a few large ones, and a group ends at most one fetch past what it used.
    Counts the bytes fetched and the fetches retried; remembers the first read error (see the module doc)."""

    def __init__(self, f, size: int, max_fetch: int = DECODE_FETCH, retries: int = DEFAULT_RETRIES,
                 budget_s: float = RETRY_BUDGET_S, target: str = "", retried: int = 0):
        self._f = f
        self.size = size
        self.max_fetch = max_fetch
        self._pos = 0
        self._buffers: list[tuple[int, bytes]] = []  # (start, data), the most recent last
        self._window = MIN_FETCH
        self.bytes_read = 0  # bytes fetched from storage
        self.retries, self.budget_s, self.target = retries, budget_s, target
        self.retried = retried  # fetches retried after a transient error (the open's included)
        self.error: FetchError | None = None

    @property
    def reads(self) -> Reads:
        return Reads(self.bytes_read, self.retried)

    def _count_retry(self) -> None:
        self.retried += 1

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), max(0, self.size - self._pos))
        if want == 0:
            return 0
        start, data = self._buffer_at(self._pos) or self._fetch(self._pos, want)
        got = data[self._pos - start:self._pos - start + want]
        buffer[:len(got)] = got
        self._pos += len(got)
        return len(got)

    def _buffer_at(self, pos: int) -> tuple[int, bytes] | None:
        return next(((a, d) for a, d in reversed(self._buffers) if a <= pos < a + len(d)), None)

    def _fetch(self, pos: int, want: int) -> tuple[int, bytes]:
        sequential = bool(self._buffers) and pos == self._buffers[-1][0] + len(self._buffers[-1][1])
        self._window = min(2 * self._window, self.max_fetch) if sequential else MIN_FETCH
        n = min(max(want, self._window), self.size - pos)

        def once() -> bytes:
            self._f.seek(pos)
            data = self._f.read(n)
            if not data:  # the file is shorter than it was when opened
                raise EOFError(f"read past the end: {pos} of {self.size} bytes")
            return data

        try:
            data = retrying(once, "range read", self.retries, budget_s=self.budget_s, on_retry=self._count_retry,
                            target=self.target)
        except FetchError as err:
            self.error = self.error or err
            raise
        except EOFError as err:
            self.error = self.error or as_fetch_error(err)
            raise self.error from err
        self.bytes_read += len(data)
        self._buffers = (self._buffers + [(pos, data)])[-_BUFFERS:]
        return pos, data

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.size - self._pos)
        buffer = bytearray(size)
        n = self.readinto(memoryview(buffer))
        return bytes(buffer[:n])

    def raise_read_error(self) -> None:
        """Raise the read error a decoder saw and swallowed, as a FetchError (see the module doc)."""
        if self.error is not None:
            raise self.error


def fetch_limit(span_s: float, bytes_per_s: float | None) -> int:
    """The largest fetch for reading `span_s` seconds of a video of `bytes_per_s` (size over duration): an eighth
    of the span's expected bytes, within [MIN_FETCH, DECODE_FETCH], so a clip group reads past its end by at most
    about an eighth of what it needs."""
    if not bytes_per_s:
        return DECODE_FETCH
    return int(min(max(span_s * bytes_per_s / 8, MIN_FETCH), DECODE_FETCH))


def as_fetch_error(err: BaseException) -> FetchError:
    """A storage error (workers.fetch's known kinds) as a picklable FetchError with a row-ready message."""
    if isinstance(err, FetchError):
        return err
    if known(err):
        return FetchError(_describe(err), transient=_classify(err) == "transient")
    return FetchError(f"{type(err).__name__}: {err}"[:300])


@contextlib.contextmanager
def open_input(uri: str, storage_options: dict | None, max_fetch: int = DECODE_FETCH,
               retries: int = DEFAULT_RETRIES) -> Iterator[InputFile]:
    """`uri` opened for range reads (an InputFile fetching at most `max_fetch` bytes a request, each fetch and
    the open retried `retries` times on transient errors); storage errors (missing, forbidden, unreachable once
    the retries ran out) raise as FetchError, so a caller tells a read failure from a decode failure."""
    fs, path = open_filesystem(uri, storage_options)
    retried = [0]

    def opened():
        f = fs.open(path, "rb", cache_type="none")
        return f, int(f.size) if getattr(f, "size", None) is not None else int(fs.size(path))

    f, size = retrying(opened, "open", retries, on_retry=lambda: retried.__setitem__(0, retried[0] + 1), target=uri)
    try:
        yield InputFile(f, size, max_fetch, retries, target=uri, retried=retried[0])
    finally:
        f.close()
