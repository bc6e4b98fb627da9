"""A model directory on the worker's local disk: a local path as is, a remote one downloaded once.

Downloads go to $LAVI_CACHE (default ~/.cache/lavi-label/models), one directory per model URI,
marked complete only when every file arrived; concurrent actors on one node race safely.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from typing import Any

import fsspec

from workers.storage import filesystem, is_local

log = logging.getLogger(__name__)


def local_model_dir(path: str, storage_options: dict[str, Any] | None = None, cache_root: str | None = None) -> str:
    """A model directory on local disk: `path` itself, or a cached download of a remote one."""
    if is_local(path):
        return fsspec.core.strip_protocol(path)
    root = cache_root or os.environ.get("LAVI_CACHE", os.path.expanduser("~/.cache/lavi-label/models"))
    # <hash of the URI>/<its last name>: a model named after its directory (a LLaVA-OneVision) keeps its name
    target = os.path.join(root, hashlib.sha1(path.encode()).hexdigest()[:16], path.rstrip("/").rsplit("/", 1)[-1])
    if os.path.exists(os.path.join(target, ".complete")):
        return target
    fs, remote = filesystem(path, storage_options)
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    os.makedirs(tmp)  # and its parent
    for src in fs.find(remote):  # a flat checkpoint dir: config, weights, tokenizer
        fs.get_file(src, os.path.join(tmp, os.path.relpath(src, remote.rstrip("/"))))
    open(os.path.join(tmp, ".complete"), "w").close()
    try:
        os.rename(tmp, target)  # atomic: concurrent actors on one node race safely
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another actor got there first
    log.info("model %s cached at %s", path, target)
    return target
