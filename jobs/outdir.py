"""A command's `--out` as a URI: a local path or object storage (s3://, gs://, ...), written through fsspec.

`train`, `distill`, `eval` and `convert` write here as `run` does, with the project's one filesystem helper
(workers.storage.filesystem, through pipeline.storage): storage options apply to remote URIs only. Small files
(JSON, manifests) are written whole with `write_text`. A step that needs a local directory (torch and safetensors
write files by path) writes to `Staged.dir`: the out itself when it is local; when it is remote, a temporary
directory whose files `push` uploads (at each training checkpoint, and at the end of `staged`) and `pull` fills from
the remote out, so that a rerun resumes from the remote copy.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import fsspec

from pipeline.storage import filesystem, is_local

log = logging.getLogger(__name__)


def join(uri: str, *names: str) -> str:
    """`uri`/names/...: a plain path as pathlib spells it (what the commands printed before they took URIs), a URI
    with one slash between its parts."""
    if is_local(uri) and "://" not in uri:
        return str(Path(uri, *names))
    return "/".join([uri.rstrip("/"), *names])


def read_text(uri: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The text of the file at `uri`, or None where there is none."""
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache(path)  # a listing cached in this process must not hide what another one wrote since
    try:
        return fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        return None


def read_json(uri: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The JSON document at `uri`, or None where there is no file."""
    text = read_text(uri, storage_options)
    return None if text is None else json.loads(text)


def write_text(uri: str, text: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write `text` at `uri` whole: on local disk under a temporary name renamed into place (parents made), in object
    storage as one PUT. A reader sees the old file or the new one, never a part of one."""
    fs, path = filesystem(uri, storage_options)
    if not is_local(uri):
        fs.pipe_file(path, text.encode("utf-8"))
        return
    fs.makedirs(fs._parent(path), exist_ok=True)
    tmp = f"{path}.tmp"
    fs.pipe_file(tmp, text.encode("utf-8"))
    fs.mv(tmp, path)


class Staged:
    """The local directory a step writes `uri`'s files to (`dir`): `uri` itself when it is local, a temporary
    directory uploaded to it when it is remote (`remote`)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, prefix: str = "lavi-out-") -> None:
        self.uri = uri
        self.remote = not is_local(uri)
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) when it was last uploaded
        if self.remote:
            self.fs, base = filesystem(uri, storage_options)
            self.base = base.rstrip("/")
            self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        else:
            self.dir = Path(fsspec.core.strip_protocol(uri))
            self.dir.mkdir(parents=True, exist_ok=True)

    def pull(self, names: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()) -> int:
        """Download the remote out's files into `dir`: those at the relative paths `names`, or all of them but what
        is under the top-level names `skip`. Returns the files downloaded (0 for a local out: it is `dir`)."""
        if not self.remote:
            return 0
        self.fs.invalidate_cache(self.base)  # another process may have written it since this one listed it
        n = 0
        for src in self.fs.find(self.base):
            rel = src[len(self.base) + 1:] if src.startswith(f"{self.base}/") else ""
            if not rel or rel.endswith("/"):  # not under the out, or a directory marker
                continue
            if (names is not None and rel not in names) or rel.split("/", 1)[0] in skip:
                continue
            dst = self.dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(src, str(dst))
            self._pushed[rel] = _stamp(dst)  # the remote copy is these bytes: no upload until the file changes
            n += 1
        if n:
            log.info("%d files of %s downloaded to %s", n, self.uri, self.dir)
        return n

    def push(self, last: tuple[str, ...] = ()) -> int:
        """Upload the files of `dir` that are new or changed since the last push (size or mtime), those at the
        relative paths `last` after all others: a marker (train_state.json) that a reader finds only once the files
        it stands for are there. Returns the files uploaded (0 for a local out)."""
        if not self.remote:
            return 0
        files = sorted((p for p in self.dir.rglob("*") if p.is_file()),
                       key=lambda p: (p.relative_to(self.dir).as_posix() in last, p.as_posix()))
        n = 0
        for p in files:
            rel, stamp = p.relative_to(self.dir).as_posix(), _stamp(p)
            if self._pushed.get(rel) != stamp:
                self.fs.put_file(str(p), f"{self.base}/{rel}")
                self._pushed[rel] = stamp
                n += 1
        log.info("%d files uploaded to %s", n, self.uri)
        return n

    def close(self) -> None:
        """Remove the temporary directory of a remote out (nothing for a local one)."""
        if self.remote:
            shutil.rmtree(self.dir, ignore_errors=True)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def staged(uri: str, storage_options: dict[str, Any] | None = None, last: tuple[str, ...] = (),
           prefix: str = "lavi-out-") -> Iterator[Staged]:
    """A `Staged` for `uri`, pushed (`last` after the rest) when the block ends without an error, its temporary
    directory removed however it ends. What earlier pushes uploaded stays in the out when the block fails."""
    stage = Staged(uri, storage_options, prefix)
    try:
        yield stage
        stage.push(last)
    finally:
        stage.close()
