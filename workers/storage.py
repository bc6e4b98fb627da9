"""fsspec filesystems for user URIs (local paths, file://, s3://, gs://, http(s)://, ...): one helper.

Storage options (endpoint, credentials) apply to remote protocols only, so one set of
`--storage-option`s serves an S3 input and a local output in the same run. Filesystems are
cached per (protocol, storage options) in the process, so a Ray worker opens one S3/HTTP
client and reuses it for every item (fsspec's own instance cache is per thread). The driver
(pipeline.storage) and the workers (fetch, the model cache, training data) all use this one.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import fsspec
from fsspec.core import split_protocol

LOCAL_PROTOCOLS = ("file", "local")

_CACHE: dict[tuple[str, str], fsspec.AbstractFileSystem] = {}
_LOCK = threading.Lock()


def is_local(uri: str) -> bool:
    """True for a plain path or a file:// / local:// URI."""
    return fsspec.utils.get_protocol(uri) in LOCAL_PROTOCOLS


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(cached filesystem, path inside it) for `uri`; options are passed to remote filesystems only.

    Raises what fsspec raises for an unknown protocol (ValueError) or a missing backend (ImportError).
    """
    options = {} if is_local(uri) else dict(storage_options or {})
    if "::" in uri:  # a chained URL (simplecache::s3://...): fsspec builds the chain
        return fsspec.core.url_to_fs(uri, **options)
    protocol = split_protocol(uri)[0] or "file"
    key = (protocol, json.dumps(options, sort_keys=True, default=repr))
    with _LOCK:
        fs = _CACHE.get(key)
        if fs is None:
            fs = _CACHE[key] = fsspec.filesystem(protocol, **options)
    return fs, fs._strip_protocol(uri)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path returned by `fs` (walk/find/glob) -> a URI that `filesystem` opens again."""
    return fs.unstrip_protocol(path)


def read_parquet_file(f, columns: list[str] | None = None):
    """One Parquet file (an open binary file) as a table, decoded on this thread. Arrow's own threads would still be
    releasing the file's Python buffers after the read returns, and at interpreter exit that aborts the process
    (apache/arrow#39862: a finished job's driver exiting 134)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(f).read(columns=columns, use_threads=False)


def iter_parquet_file(f, batch_size: int = 10_000):
    """The record batches of one Parquet file, decoded on this thread (see `read_parquet_file`)."""
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, use_threads=False)
