"""fsspec filesystems for user URIs: local paths, file://, s3://, gs://, ...

Storage options (endpoint, credentials) apply to remote protocols only, so one set of
`--storage-option`s can serve an S3 input and a local output in the same run.
"""

from __future__ import annotations

from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

LOCAL_PROTOCOLS = ("file", "local")


def is_local(uri: str) -> bool:
    protocol = fsspec.utils.get_protocol(uri)
    return protocol in LOCAL_PROTOCOLS


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fs, path inside fs) for `uri`; options are passed to remote filesystems only."""
    options = {} if is_local(uri) else dict(storage_options or {})
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path returned by `fs` (walk/find/glob) -> a URI that `filesystem` opens again."""
    return fs.unstrip_protocol(path)


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """Wrap an fsspec filesystem for pyarrow / Ray Data readers (picklable: ships to workers)."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
