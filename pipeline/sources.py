"""INPUT list -> a stream of manifest items {item_id, uri, media_type, prompts, error}.

An INPUT is a local file or directory, a glob, an s3:// / gs:// / file:// prefix, or a
manifest (.jsonl / .csv / .parquet) with a `uri` column and optional `questions` (a list;
a JSON list in CSV; a question is a string or {question, choices} / {question, json_schema}, its
own constraint), `prompt` and `media_type` columns. Directories and prefixes are walked
one directory listing at a time (`fs.walk`), manifests are read in record batches: the
driver never holds the whole listing (pipeline.listing writes it a shard at a time while the
pipeline labels).

Each uri is listed once: the listing keeps 64-bit fingerprints of the uris it has seen (pipeline.seen: 8 bytes a
uri, spilled to disk when large), never a set of every uri.

Items are built by schemas.manifest.make_item and written as its ITEM_SCHEMA. Problems with
one item (a vqa item with no questions) become items with `error` set: they flow through the
pipeline as error rows of stage "list" instead of disappearing. Walks skip files whose
extension is neither image nor video (counted in the log); manifest entries are kept
whatever their extension (the decoder sniffs the content). A caption prompt of None means
the model's default caption prompt for the item's (decoded) media type.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import io
import json
import logging
import posixpath
import re
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow.csv as pacsv

from pipeline.seen import Seen
from pipeline.storage import filesystem, full_uri, is_local
from schemas.constraint import Constraint, ConstraintError
from schemas.manifest import MANIFEST_EXTS, make_item, media_type_from_name
from schemas.rows import CAPTION, UNKNOWN, VQA
from workers.storage import iter_parquet_file

log = logging.getLogger(__name__)

GLOB_CHARS = re.compile(r"[*?\[]")


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """How each item's prompts are made: the task and the run-wide prompt/questions."""

    task: str = CAPTION
    prompt: str | None = None
    questions: tuple[str, ...] = ()
    constraint: str | None = None  # the run's (schemas.constraint JSON): on its prompt or questions, and on a
    # manifest's questions that carry none of their own


def iter_items(inputs: Iterable[str], spec: PromptSpec, storage_options: dict[str, Any] | None = None,
               stats: dict[str, int] | None = None) -> Iterator[dict]:
    """Stream items for every INPUT, each uri once.

    `stats`, when given, receives counts: listed (distinct items), duplicates, own_constraints (items with a
    question that carries its own constraint, from the manifest), non_media (pipeline.sources.iter_entries).
    """
    stats = stats if stats is not None else {}
    stats.update(listed=0, own_constraints=0)
    for entry in iter_entries(inputs, storage_options, stats):
        item = item_for_entry(entry, spec)
        stats["listed"] += 1
        stats["own_constraints"] += any(p["constraint"] != spec.constraint for p in item["prompts"])
        yield item


def iter_entries(inputs: Iterable[str], storage_options: dict[str, Any] | None = None,
                 stats: dict[str, int] | None = None, batch: int = 4096) -> Iterator[dict]:
    """The INPUTs' entries, each uri once: {uri (resolved), media_type, prompt, questions}, and a manifest
    record's other fields as they are. `stats` receives the count of duplicates, and `non_media`: the files a
    walk left out as neither image nor video, by extension. Entries are de-duplicated `batch` at a time
    (pipeline.seen)."""
    stats = stats if stats is not None else {}
    stats["duplicates"] = 0
    stats["non_media"] = {}
    seen = Seen()
    try:
        entries = (e for spec_uri in inputs for e in _iter_entries(spec_uri, storage_options or {}, stats))
        for chunk in _batched(entries, batch):
            new = seen.add(uri_fingerprints([e["uri"] for e in chunk]))
            stats["duplicates"] += len(chunk) - int(new.sum())
            yield from (e for e, keep in zip(chunk, new) if keep)
    finally:
        seen.close()
    if stats["duplicates"]:
        log.warning("%d duplicate uris in the inputs were labeled once", stats["duplicates"])


def uri_fingerprints(uris: list[str]) -> np.ndarray:
    """uint64 fingerprints of uris: the first 64 bits of sha1(uri), those of its item_id (schemas.rows.item_id)."""
    digests = b"".join(hashlib.sha1(u.encode("utf-8")).digest()[:8] for u in uris)
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def _batched(it: Iterable, n: int) -> Iterator[list]:
    chunk: list = []
    for x in it:
        chunk.append(x)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def sample_key(seed: int, uri: str, salt: str = "") -> int:
    """A uri's place in a seeded sample: the first 64 bits of sha1(salt, seed, uri)."""
    return int(hashlib.sha1(f"{salt}{seed}:{uri}".encode()).hexdigest()[:16], 16)


def sample(entries: Iterable[dict], n: int, seed: int) -> list[dict]:
    """The n entries of smallest sample_key (streamed: memory for n): an entry is in the sample or not by its uri
    and the seed alone, never by the rest of the corpus."""
    return heapq.nsmallest(n, entries, key=lambda e: sample_key(seed, e["uri"]))


def item_for_entry(entry: dict, spec: PromptSpec) -> dict:
    """The item a run makes of an INPUT entry: its prompts from the entry and the run's PromptSpec."""
    uri = entry["uri"]
    if spec.task == CAPTION:
        return make_item(uri, [{"task": CAPTION, "prompt": entry.get("prompt") or spec.prompt,
                                "constraint": spec.constraint}], entry.get("media_type"))
    try:
        asked = [(q, spec.constraint) for q in spec.questions] + [
            _question(q, spec.constraint) for q in entry.get("questions") or []]
    except ValueError as err:  # a malformed question refuses its item, not the run
        return make_item(uri, [{"task": VQA, "prompt": ""}], entry.get("media_type"), error=str(err))
    questions = list(dict.fromkeys(asked))
    if not questions:  # refused when listed: one error row per item, with an empty question
        return make_item(uri, [{"task": VQA, "prompt": ""}], entry.get("media_type"),
                         error="no questions for this item: give --question or a questions column in the manifest")
    return make_item(uri, [{"task": VQA, "prompt": q, "constraint": c} for q, c in questions], entry.get("media_type"))


def _question(q: str | dict, default: str | None) -> tuple[str, str | None]:
    """A manifest question -> (text, constraint JSON): a string (the run's constraint, if any), or an object
    {"question": str, "choices": [str, ...]} or {"question": str, "json_schema": {...}} (its own)."""
    if isinstance(q, str):
        return q, default
    if not isinstance(q, dict) or not isinstance(q.get("question"), str) or set(q) - {"question", "choices",
                                                                                    "json_schema"}:
        raise ValueError(f"bad question {q!r:.200}: a string, or {{question, choices}} or {{question, json_schema}}")
    if q.get("choices") is not None and not q["choices"]:
        raise ValueError(f"question {q['question']!r:.100}: its choices are empty")
    try:
        c = Constraint.of(q.get("choices"), q.get("json_schema"))
    except ConstraintError as err:
        raise ValueError(f"question {q['question']!r:.100}: {err}") from None
    return q["question"], c.to_json() if c is not None else default


def check_inputs(inputs: Iterable[str], storage_options: dict[str, Any] | None = None) -> None:
    """Raise ValueError for an INPUT that does not exist (a glob: its directory), before anything is listed: a run's
    listing streams while it labels, and a typo in its last INPUT must not wait for the others to be labelled."""
    for spec_uri in inputs:
        _kind(spec_uri, storage_options or {})


def _kind(spec_uri: str, storage_options: dict[str, Any]) -> tuple[str, fsspec.AbstractFileSystem, str]:
    """(glob / manifest / dir / file, its filesystem, its path); ValueError when it does not exist."""
    fs, path = filesystem(spec_uri, storage_options)
    if GLOB_CHARS.search(path):
        root = GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0] or "/"
        if not fs.isdir(root):
            raise ValueError(f"input glob {path!r}: its directory {root!r} does not exist")
        return "glob", fs, path
    if path.lower().endswith(MANIFEST_EXTS) and fs.isfile(path):
        return "manifest", fs, path
    if fs.isdir(path):
        return "dir", fs, path
    if fs.isfile(path):
        return "file", fs, path
    raise ValueError(f"input {spec_uri!r} does not exist (a file, directory, glob, prefix or manifest)")


def _iter_entries(spec_uri: str, storage_options: dict[str, Any], stats: dict | None = None) -> Iterator[dict]:
    kind, fs, path = _kind(spec_uri, storage_options)
    if kind == "glob":
        yield from _iter_glob(fs, path, stats)
    elif kind == "manifest":
        yield from _iter_manifest(fs, path)
    elif kind == "dir":
        yield from _iter_walk(fs, path, None, stats=stats)
    else:
        yield {"uri": full_uri(fs, path)}


def _iter_glob(fs: fsspec.AbstractFileSystem, pattern: str, stats: dict | None = None) -> Iterator[dict]:
    root = GLOB_CHARS.split(pattern, 1)[0].rsplit("/", 1)[0] or "/"
    regex = re.compile(fsspec.utils.glob_translate(pattern))
    depth = None if "**" in pattern else pattern[len(root):].strip("/").count("/") + 1  # no deeper than it can match
    yield from _iter_walk(fs, root, regex, depth, stats)


def _iter_walk(fs: fsspec.AbstractFileSystem, root: str, regex: re.Pattern | None,
               maxdepth: int | None = None, stats: dict | None = None) -> Iterator[dict]:
    """Media files under root, in a deterministic order; the others are counted by extension in stats["non_media"]
    (files with none under "(none)")."""
    unknown: dict[str, int] = stats.setdefault("non_media", {}) if stats is not None else {}
    before = sum(unknown.values())
    for dirpath, dirnames, filenames in fs.walk(root, maxdepth=maxdepth):
        dirnames.sort()  # walk order is deterministic
        for name in sorted(filenames):
            path = f"{dirpath.rstrip('/')}/{name}"
            if regex is not None and not regex.match(path):
                continue
            if media_type_from_name(name) == UNKNOWN:
                ext = posixpath.splitext(name)[1].lower() or "(none)"
                unknown[ext] = unknown.get(ext, 0) + 1
                continue
            yield {"uri": full_uri(fs, path)}
    if sum(unknown.values()) > before:
        log.info("skipped %d files under %s that are neither images nor videos (by extension)",
                 sum(unknown.values()) - before, root)


def _iter_manifest(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[dict]:
    base = posixpath.dirname(path)
    local = is_local(full_uri(fs, path))  # an absolute path in a local manifest is a local file
    for record in _iter_records(fs, path):
        uri = record.get("uri")
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"manifest {path!r} has a record without a uri: {record!r:.200}")
        if "://" not in uri and not uri.startswith("/"):
            uri = full_uri(fs, f"{base}/{uri}")  # relative to the manifest
        elif local and "://" not in uri:
            uri = f"file://{uri}"
        questions = record.get("questions")
        if isinstance(questions, str):  # CSV: a JSON list (of strings or question objects) or one question
            questions = json.loads(questions) if questions.startswith("[") else [questions] if questions else []
        yield {**record, "uri": uri, "media_type": record.get("media_type"), "prompt": record.get("prompt"),
               "questions": questions}


def _iter_records(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[dict]:
    lower = path.lower()
    with fs.open(path, "rb") as f:
        if lower.endswith(".jsonl"):
            for line in io.TextIOWrapper(f, encoding="utf-8"):
                if line.strip():
                    yield json.loads(line)
        elif lower.endswith(".csv"):
            for batch in pacsv.open_csv(f):
                yield from batch.to_pylist()
        else:
            for batch in iter_parquet_file(f):
                yield from batch.to_pylist()
