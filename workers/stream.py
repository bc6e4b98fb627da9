"""One input opened for range reads through fsspec: what the streamed video path decodes from.

A long video is never read whole: the probe reads its header, each clip group the byte ranges its frames need
(PyAV on the file object seeks; s3fs, gcsfs and http files turn that into range requests of `block_size`).
`InputFile` counts the bytes fetched from storage and keeps the first read error: PyAV swallows an exception
raised inside its read callback (it logs it and sees the end of the file), which would turn a dropped connection
into a silently truncated video, so the decoders ask `raise_read_error` when they are done.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

from workers.fetch import _KNOWN, FetchError, _classify, _describe, open_filesystem

PROBE_BLOCK = 1 << 16  # 64 KiB: a header (and an MP4's index at the end) is read in small range requests
DECODE_BLOCK = 4 << 20  # 4 MiB: a clip group's frames are read in larger ones


class InputFile(io.RawIOBase):
    """A read-only view of an fsspec file: counts the bytes it fetches, remembers the first read error."""

    def __init__(self, f, size: int):
        self._f = f
        self.size = size
        self._counted = 0  # bytes returned by reads, for files without a cache of their own (local disks)
        self.error: FetchError | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buffer) -> int:
        try:
            data = self._f.read(len(buffer))
        except _KNOWN as err:
            self.error = self.error or as_fetch_error(err)
            raise self.error from err
        buffer[: len(data)] = data
        self._counted += len(data)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.size - self.tell())
        buffer = bytearray(size)
        n = self.readinto(memoryview(buffer))
        return bytes(buffer[:n])

    @property
    def bytes_read(self) -> int:
        """Bytes fetched from storage: the requests of an fsspec cache (remote files), else the bytes read."""
        cache = getattr(self._f, "cache", None)
        fetched = getattr(cache, "total_requested_bytes", None)
        return int(fetched) if fetched is not None else self._counted

    def raise_read_error(self) -> None:
        """Raise the read error a decoder saw and swallowed, as a FetchError (see the module doc)."""
        if self.error is not None:
            raise self.error


def as_fetch_error(err: BaseException) -> FetchError:
    """A storage error (workers.fetch's known kinds) as a picklable FetchError with a row-ready message."""
    if isinstance(err, FetchError):
        return err
    if isinstance(err, _KNOWN):
        return FetchError(_describe(err), transient=_classify(err) == "transient")
    return FetchError(f"{type(err).__name__}: {err}"[:300])


@contextlib.contextmanager
def open_input(uri: str, storage_options: dict | None, block_size: int) -> Iterator[InputFile]:
    """`uri` opened for range reads (an InputFile); storage errors (missing, forbidden, unreachable) raise as
    FetchError, so a caller tells a read failure from a decode failure."""
    fs, path = open_filesystem(uri, storage_options)
    try:
        f = fs.open(path, "rb", block_size=block_size, cache_type="readahead")
        size = int(f.size) if getattr(f, "size", None) is not None else int(fs.size(path))
    except _KNOWN as err:
        raise as_fetch_error(err) from err
    try:
        yield InputFile(f, size)
    finally:
        f.close()
