"""Read one input's bytes through fsspec, with retries on transient errors.

Filesystems come from workers.storage (cached per protocol and storage options, so a Ray
worker opens one S3/HTTP client and reuses it for every item).
"""

from __future__ import annotations

import logging
import time

import fsspec
from fsspec.core import split_protocol

from workers.storage import filesystem

log = logging.getLogger(__name__)

# errors that retrying cannot fix
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class FetchError(Exception):
    """A read that failed for good; `str(err)` is a message fit for a row."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.message = message
        self.transient = transient  # True when retries ran out on a transient error

    def __reduce__(self):  # keeps `transient` across the isolated child's pickle
        return FetchError, (self.message, self.transient)


def _optional_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(transient, permanent) exception types of the HTTP and S3 clients, when installed."""
    transient: list[type] = []
    permanent: list[type] = []
    try:
        import aiohttp

        transient += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError]
    except ImportError:
        pass
    try:
        import botocore.exceptions as bx

        transient += [bx.ConnectionError, bx.HTTPClientError]
        permanent += [bx.NoCredentialsError, bx.PartialCredentialsError]
    except ImportError:
        pass
    return tuple(transient), tuple(permanent)


_CLIENT_TRANSIENT, _CLIENT_PERMANENT = _optional_errors()
_KNOWN = (OSError, TimeoutError) + _CLIENT_TRANSIENT + _CLIENT_PERMANENT


def _classify(err: BaseException) -> str:
    """'transient' or 'permanent', for an error of the _KNOWN types."""
    status = getattr(err, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int) and status >= 400:
        return "transient" if status >= 500 or status in (408, 429) else "permanent"
    if isinstance(err, _PERMANENT + _CLIENT_PERMANENT):
        return "permanent"
    return "transient"  # connection, timeout, other OSErrors (s3fs maps 5xx to OSError EIO)


def open_filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """workers.storage.filesystem for a read: an unknown protocol or missing backend is a FetchError."""
    try:
        return filesystem(uri, storage_options)
    except (ValueError, ImportError) as err:  # "Protocol not known", missing backend
        raise FetchError(f"cannot open {split_protocol(uri)[0] or 'file'}:// filesystem: {err}") from err


def _read(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int | None) -> bytes:
    if max_bytes is None:
        return fs.cat_file(path)
    with fs.open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # never holds more than the limit plus one byte
    if len(data) > max_bytes:
        raise FetchError(f"file too large: over the limit of {max_bytes} bytes")
    return data


def _describe(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "not found"
    if isinstance(err, PermissionError):
        return f"permission denied: {err}"
    if isinstance(err, IsADirectoryError):
        return "is a directory"
    text = str(err).strip() or type(err).__name__
    return f"{type(err).__name__}: {text}"[:300]


def fetch_bytes(
    uri: str,
    storage_options: dict | None = None,
    retries: int = 3,
    max_bytes: int | None = None,
    backoff_s: float = 0.5,
) -> bytes:
    """All bytes of `uri`, read through fsspec.

    Retries `retries` times after the first attempt on transient errors (connection,
    timeout, HTTP 5xx/429, other OSErrors), sleeping backoff_s * 2**attempt between tries;
    never retries not-found or permission errors. Files over `max_bytes` are refused.
    Raises FetchError with a message fit for a row on final failure.
    """
    fs, path = open_filesystem(uri, storage_options)
    for attempt in range(retries + 1):
        try:
            return _read(fs, path, max_bytes)
        except _KNOWN as err:
            if _classify(err) == "permanent":
                raise FetchError(_describe(err)) from err
            if attempt == retries:
                raise FetchError(f"read failed after {retries + 1} attempts: {_describe(err)}", transient=True) from err
            log.warning("transient read error on %s (attempt %d): %s", uri, attempt + 1, _describe(err))
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")
