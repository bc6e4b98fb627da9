"""Training examples from the user's own data, for `lavi-label train` (and `distill`).

Formats, told apart by name and columns (`read_records`):
- a Parquet of (media, prompt, target): `uri` (string) or `bytes` (binary) for the media, `prompt`, `target`;
- the pipeline's own output (its directory of part files, or one of them): status ok rows, prompt -> text; an
  item's rows (a video's: one clip's) are one example;
- LLaVA conversation JSON (LLaVA-Pretrain / LLaVA-Instruct layout; a .json list or .jsonl): `image` (or
  `video`), a path under `image_root`, and `conversations` of `from: human|gpt` turns with the `<image>`
  placeholder;
- a Parquet of embedded images and conversations, as the LLaVA-OneVision data is published: `images` (a list of
  {bytes, path}) or `image`, and `conversations` (from/value) or `messages` (role/content, the content a string
  or a list of typed parts).
A conversation gives one target per assistant turn, its earlier turns as context (`lavi.serving.chat_template.Turns`), rendered
by the model's chat template at collate time. A directory of Parquet files is read whole.

Media decode through the labeling pipeline's code, so training sees what inference sees. Nothing in the data
is fatal: records that cannot be used (no image, several images, a conversation with no answer) are counted by
reason when read; media that cannot be read or decoded are counted, skipped and not drawn again.
"""
from __future__ import annotations

import collections
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from lavi.resolution import DynamicResolution
from lavi.serving.chat_template import Prompt, Turns
from lavi.training.train import Example
from schemas.rows import DECODE, ERROR, OK, READ
from workers.decode import DecodeSettings, decode_item
from workers.fetch import FetchError, fetch_bytes
from workers.storage import filesystem, read_parquet_file

log = logging.getLogger(__name__)

FORMATS = ("prompt-target Parquet", "pipeline output", "LLaVA conversation JSON", "conversation Parquet")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PLACEHOLDER = re.compile(r"<(?:image|video)>\n?")


@dataclass(frozen=True)
class Record:
    """One training item before decoding: where its media is, and the (prompt, target) pairs asked of it."""

    uri: str  # the media's URI ("bytes": embedded)
    pairs: tuple[tuple[Prompt, str], ...]
    data: bytes | None = None  # embedded media
    clip: int | None = None  # a video's clip to train on (pipeline output); None: the first
    media_type: str | None = None  # declared "image" / "video"; None: told from the bytes and name


class Unusable(ValueError):
    """A record that cannot be trained on; its message is the reason it is counted under."""


@dataclass
class Records:
    records: list[Record]
    format: str
    skipped: collections.Counter = field(default_factory=collections.Counter)  # reason -> records


def read_records(uris: str | Sequence[str], image_root: str | None = None,
                 storage_options: dict | None = None) -> Records:
    """The records of training data URIs in any of the module's formats (several: Parquet of one format, read as
    one table; pipeline outputs of one corpus give each item the targets of all of them)."""
    uris = [uris] if isinstance(uris, str) else list(uris)
    uri = ", ".join(uris)
    if any(u.endswith((".json", ".jsonl")) for u in uris):
        if len(uris) > 1:
            raise ValueError(f"{uri}: a LLaVA conversation JSON is read alone")
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            raw = f.read().decode("utf-8")
        rows = ([json.loads(line) for line in raw.splitlines() if line.strip()] if path.endswith(".jsonl")
                else json.loads(raw))
        if not isinstance(rows, list):
            raise ValueError(f"{uri}: a LLaVA conversation JSON is a list of records")
        return _conversations(rows, "LLaVA conversation JSON", uri, image_root)
    tables = []
    for one in uris:
        fs, path = filesystem(one, storage_options)
        files = sorted(fs.glob(path.rstrip("/") + "/*.parquet")) if fs.isdir(path) else [path]
        if not files:
            raise ValueError(f"{one}: a directory with no .parquet files")
        for name in files:
            with fs.open(name, "rb") as f:
                tables.append(read_parquet_file(f))
    table = pa.concat_tables(tables, promote_options="default")
    cols = set(table.column_names)
    if {"conversations", "messages"} & cols:
        return _conversations(table.to_pylist(), "conversation Parquet", uri, image_root)
    if {"item_id", "prompt", "text", "status"} <= cols:
        return _pipeline_output(table)
    if {"prompt", "target"} <= cols and {"uri", "bytes"} & cols:
        rows = table.select([c for c in ("uri", "bytes", "prompt", "target") if c in cols]).to_pylist()
        return Records([Record(r.get("uri") or "bytes", ((r["prompt"], r["target"]),), data=r.get("bytes"))
                        for r in rows], FORMATS[0])
    raise ValueError(f"{uri}: not a training format ({', '.join(FORMATS)}); its columns are {sorted(cols)}")


def _pipeline_output(table: pa.Table) -> Records:
    """Status ok rows (truncated texts are not targets), one record per item and clip, in first-seen order."""
    keep = table.select(["item_id", "uri", "media_type", "clip_index", "prompt", "text", "status"]).to_pylist()
    groups: dict[tuple, list[dict]] = {}
    skipped = collections.Counter()
    for r in keep:
        if r["status"] != OK:
            skipped[f"status {r['status']}"] += 1
            continue
        groups.setdefault((r["item_id"], r["clip_index"]), []).append(r)
    records = [Record(rows[0]["uri"], tuple((r["prompt"], r["text"]) for r in rows), clip=clip,
                      media_type=rows[0]["media_type"]) for (_, clip), rows in groups.items()]
    return Records(records, FORMATS[1], skipped)


def _conversations(rows: list[dict], fmt: str, uri: str, image_root: str | None) -> Records:
    out = Records([], fmt)
    for row in rows:
        try:
            source, data, media_type = _media(row, image_root, uri)
            turns = row.get("conversations") if row.get("conversations") is not None else row.get("messages")
            out.records.append(Record(source, conversation_pairs(turns or []), data=data, media_type=media_type))
        except Unusable as err:
            out.skipped[str(err)] += 1
    return out


def _media(row: dict, image_root: str | None, uri: str) -> tuple[str, bytes | None, str | None]:
    """(uri, embedded bytes, declared type) of a conversation record's one image or video."""
    for key, media_type in (("images", "image"), ("image", "image"), ("videos", "video"), ("video", "video")):
        value = row.get(key)
        if value is None:
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        if len(items) > 1:
            raise Unusable(f"several {media_type}s (one per example is supported)")
        if not items:
            continue
        item = items[0]
        if isinstance(item, (bytes, bytearray)):
            return "bytes", bytes(item), media_type
        if isinstance(item, dict):
            if item.get("bytes"):
                return item.get("path") or "bytes", item["bytes"], media_type
            item = item.get("path")
        if isinstance(item, str) and item:
            return _resolve(item, image_root, uri), None, media_type
        raise Unusable(f"a {media_type} with neither bytes nor a path")
    raise Unusable("no image or video")


def _resolve(path: str, image_root: str | None, uri: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    if image_root is None:
        raise ValueError(f"{uri} names its media by relative path ({path!r}): pass --image-root, the URI they are under")
    return image_root.rstrip("/") + "/" + path


def conversation_pairs(turns: list[dict]) -> tuple[tuple[Prompt, str], ...]:
    """LLaVA (`from`/`value`) or chat (`role`/`content`) turns -> one (prompt, target) per assistant turn, the
    earlier turns its context. Media placeholders leave the text (the chat template places the media); system
    turns are dropped; consecutive turns of one role are joined by a newline."""
    messages: list[list[str]] = []
    for t in turns:
        role = _ROLES.get(str(t.get("from", t.get("role", ""))).lower())
        if role is None:
            raise Unusable(f"a turn of unknown role {t.get('from', t.get('role'))!r}")
        if role == "system":
            continue
        text = _text_of(t.get("value", t.get("content")))
        if messages and messages[-1][0] == role:
            messages[-1][1] += "\n" + text
        else:
            messages.append([role, text])
    if messages and messages[0][0] != "user":
        raise Unusable("a conversation that does not start with a user turn")
    pairs, history = [], []
    for (_, user), (_, answer) in zip(messages[::2], messages[1::2]):
        if answer:
            pairs.append((Turns(tuple(history), user) if history else user, answer))
        history.append((user, answer))
    if not pairs:
        raise Unusable("a conversation with no assistant answer")
    return tuple(pairs)


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        text = content
    else:  # typed parts: [{"type": "text", "text": ...}, {"type": "image"}]
        text = "\n".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return _PLACEHOLDER.sub("", text).strip()


@dataclass
class TrainData:
    """`data(step)` for `lavi.training.train.train`: batch_items records drawn per step (deterministic in seed and step, so
    a resumed run sees the same batches), decoded at the model's input size. An undecodable record is counted,
    skipped and replaced by the next one drawn."""

    uri: str | tuple[str, ...]  # one URI, or several read as one (see read_records)
    image_size: int
    frames: int
    batch_items: int = 32
    seed: int = 0
    storage_options: dict = field(default_factory=dict)
    image_root: str | None = None
    cache_bytes: int = 1 << 30  # decoded frames kept between steps
    rank: int = 0  # data-parallel training: this rank of `world` reads (and decodes) its shard of each step only
    world: int = 1
    dynamic: DynamicResolution | None = None  # a dynamic-resolution model's contract (frames at their own size)

    def __post_init__(self) -> None:
        read = read_records(self.uri, self.image_root, self.storage_options)
        self.name = self.uri if isinstance(self.uri, str) else ", ".join(self.uri)
        self.records, self.format, self.skipped = read.records, read.format, read.skipped
        if not self.records:
            raise ValueError(f"{self.name}: no usable training records ({self._skips()})")
        self.settings = DecodeSettings(image_size=self.image_size, frames_per_clip=self.frames,
                                       storage_options=self.storage_options, isolate=False, dynamic=self.dynamic)
        self.bad: set[int] = set()
        self._cache: OrderedDict[int, tuple[np.ndarray, str]] = OrderedDict()
        self._cached = 0
        log.info("%s (%s): %d records, %d targets%s", self.name, self.format, len(self.records),
                 sum(len(r.pairs) for r in self.records), f"; skipped {self._skips()}" if self.skipped else "")

    def _skips(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common()) or "none skipped"

    def summary(self) -> dict:
        """For train_summary.json: the data's format, records and what was skipped (so far), by reason."""
        return {"uri": self.uri, "format": self.format, "records": len(self.records),
                "targets": sum(len(r.pairs) for r in self.records), "skipped": dict(self.skipped)}

    def _decoded(self, i: int) -> tuple[np.ndarray, str] | None:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        record = self.records[i]
        try:
            data = record.data or fetch_bytes(record.uri, self.storage_options)
        except FetchError as err:
            return self._skip(i, READ, err)
        item = {"item_id": "train", "uri": record.uri, "media_type": record.media_type, "prompts": []}
        decoded = decode_item(item, self.settings, data)
        if decoded[0]["status"] == ERROR:
            return self._skip(i, DECODE, decoded[0]["error"])
        clip = next((d for d in decoded if record.clip is None or d["clip_index"] == record.clip), None)
        if clip is None:
            return self._skip(i, DECODE, f"no clip {record.clip} in the decoded video (other --clip-seconds?)")
        out = self._cache[i] = (clip["frames"], clip["media_type"])
        self._cached += out[0].nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            self._cached -= self._cache.popitem(last=False)[1][0].nbytes
        return out

    def _skip(self, i: int, stage: str, error) -> None:
        self.bad.add(i)
        self.skipped[f"{stage} error"] += 1
        log.warning("training record skipped (%s error; %d so far): %s: %s", stage, len(self.bad),
                    self.records[i].uri, error)
        return None

    def __call__(self, step: int) -> list[Example]:
        """This step's examples: the first batch_items decodable records of a per-step permutation (a rank: every
        world-th of it, from its rank on, and its share of batch_items, so the ranks' shards are the one batch)."""
        order = np.random.default_rng([self.seed, step]).permutation(len(self.records))[self.rank::self.world]
        share = self.batch_items // self.world + (self.rank < self.batch_items % self.world)
        out = []
        for i in order:
            if len(out) == share:
                break
            if i in self.bad:
                continue
            decoded = self._decoded(int(i))
            if decoded is not None:
                out.append(Example(decoded[0], self.records[i].pairs, media=decoded[1]))
        if not out:
            raise ValueError(f"no decodable records in {self.name} ({self._skips()})")
        return out
