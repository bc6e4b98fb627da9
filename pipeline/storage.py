"""The driver's filesystems: workers.storage's one helper, and its pyarrow wrapper for Ray Data.

Storage options (endpoint, credentials) apply to remote protocols only, so one set of
`--storage-option`s can serve an S3 input and a local output in the same run.
"""

from __future__ import annotations

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from workers.storage import LOCAL_PROTOCOLS, filesystem, full_uri, is_local  # noqa: F401 (the driver's names)


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """Wrap an fsspec filesystem for pyarrow / Ray Data readers (picklable: ships to workers)."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
