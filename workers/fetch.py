"""Read one input's bytes through fsspec, with retries on transient errors.

Filesystems come from workers.storage (cached per protocol and storage options, so a Ray
worker opens one S3/HTTP client and reuses it for every item). `retrying` is the one retry
loop of reads and commits: exponential backoff, bounded in attempts and in total time, so an
object store that is down for a while costs each read at most RETRY_BUDGET_S before it
becomes an error row, and a store that comes back within that time costs nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import fsspec
from fsspec.core import split_protocol

from workers.storage import filesystem

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_RETRIES = 3  # retries after the first attempt (--fetch-retries)
RETRY_BUDGET_S = 30.0  # the most one read sleeps between its attempts, all retries together
# the job's own files (listing shards, part files, the summary) on the output's store: retried for longer than a
# user's input, so that a store unreachable for a while delays the job instead of failing it
OWN_RETRIES, OWN_BUDGET_S = 10, 180.0
RETRIED_OUT = "failed after"  # in the message of an error whose retries ran out (what summaries count)

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


def _client_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(transient, permanent) exception types of the HTTP and S3 clients this process has imported: an error of a
    client comes only from one that is, and importing them for every worker (aiohttp, botocore) would cost each
    worker process a quarter of a second at its start."""
    import sys

    transient: list[type] = []
    permanent: list[type] = []
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        transient += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError]
    bx = sys.modules.get("botocore.exceptions")
    if bx is not None:
        transient += [bx.ConnectionError, bx.HTTPClientError]
        permanent += [bx.NoCredentialsError, bx.PartialCredentialsError]
    return tuple(transient), tuple(permanent)


def known(err: BaseException) -> bool:
    """Whether `err` is a storage error this module classifies (`_classify`): an OSError, a timeout, an HTTP or S3
    client's."""
    transient, permanent = _client_errors()
    return isinstance(err, (OSError, TimeoutError) + transient + permanent)


def _classify(err: BaseException) -> str:
    """'transient' or 'permanent', for an error `known` knows."""
    status = getattr(err, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int) and status >= 400:
        return "transient" if status >= 500 or status in (408, 429) else "permanent"
    if isinstance(err, _PERMANENT + _client_errors()[1]):
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


def backoff_delays(retries: int, backoff_s: float = 0.5, budget_s: float = RETRY_BUDGET_S) -> list[float]:
    """The sleeps before each retry: backoff_s * 2**k, cut so that they add up to at most budget_s (retries that
    would start past the budget are not made)."""
    delays, left = [], budget_s
    for k in range(retries):
        delay = min(backoff_s * 2**k, left)
        if delay <= 1e-6:  # the budget is spent (up to float error)
            break
        delays.append(delay)
        left -= delay
    return delays


def retrying(call: Callable[[], T], what: str, retries: int = DEFAULT_RETRIES, backoff_s: float = 0.5,
             budget_s: float = RETRY_BUDGET_S, on_retry: Callable[[], None] | None = None, target: str = "") -> T:
    """call(), retried on transient errors (connection, timeout, HTTP 5xx/429, other OSErrors) after the sleeps of
    `backoff_delays`; never on not-found or permission errors. Raises FetchError with a message fit for a row:
    "<what> failed after N attempts (retried for S s): ..." once the retries or the budget run out. `target` (a uri)
    goes into the log lines only."""
    delays = backoff_delays(retries, backoff_s, budget_s)
    for attempt in range(len(delays) + 1):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - storage errors only (`known`), the rest raised as they are
            if not known(err):
                raise
            if _classify(err) == "permanent":
                raise FetchError(_describe(err)) from err
            if attempt == len(delays):
                raise FetchError(f"{what} {RETRIED_OUT} {attempt + 1} attempts (retried for {sum(delays):g} s): "
                                 f"{_describe(err)}", transient=True) from err
            log.warning("transient %s error on %s (attempt %d of %d): %s", what, target, attempt + 1,
                        len(delays) + 1, _describe(err))
            if on_retry is not None:
                on_retry()
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


def fetch_bytes(
    uri: str,
    storage_options: dict | None = None,
    retries: int = DEFAULT_RETRIES,
    max_bytes: int | None = None,
    backoff_s: float = 0.5,
    budget_s: float = RETRY_BUDGET_S,
    on_retry: Callable[[], None] | None = None,
) -> bytes:
    """All bytes of `uri`, read through fsspec.

    Retries `retries` times after the first attempt on transient errors, sleeping backoff_s * 2**attempt between
    tries and budget_s at most in all (`retrying`); never retries not-found or permission errors. Files over
    `max_bytes` are refused. Raises FetchError with a message fit for a row on final failure ("read failed after
    N attempts (retried for S s): ..."). on_retry: called before each retry (what a caller counts).
    """
    fs, path = open_filesystem(uri, storage_options)
    return retrying(lambda: _read(fs, path, max_bytes), "read", retries, backoff_s, budget_s, on_retry, target=uri)
