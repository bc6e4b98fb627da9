"""The two worker stages of the Ray Data graph, as plain functions/classes over Arrow tables.

decode_batch(items, settings): manifest items -> one row per clip (CLIP_SCHEMA), on CPU tasks.
Labeler: the callable class for `map_batches` (Ray's batch-inference pattern): `__init__`
loads the engine once per actor; `__call__` expands (clip x prompt) requests, runs
`engine.generate` in sub-batches and returns one LABEL_SCHEMA row per (item, clip, prompt),
plus `_item_rows` (rows the item yields in all) so the sink commits only whole items.
Input error rows pass through as error rows; an inference error becomes error rows of stage
"infer" for its sub-batch; every input row comes out exactly once per prompt (checked).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import shutil
import uuid
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from pipeline.config import CPU_BATCH
from schemas.rows import ERROR, IMAGE, INFER, OK, READ, TRUNCATED, VIDEO, row_id, table_from_rows
from workers.decode import DecodeSettings, error_row, fetch_and_decode

log = logging.getLogger(__name__)

ITEM_ROWS = "_item_rows"
PROMPT_TYPE = pa.struct([("task", pa.string()), ("prompt", pa.string())])
CLIP_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("uri", pa.string()), ("media_type", pa.string()),
    ("prompts", pa.list_(PROMPT_TYPE)),
    ("clip_index", pa.int32()), ("clip_start_s", pa.float64()), ("clip_end_s", pa.float64()),
    ("frame_timestamps_s", pa.list_(pa.float64())), ("width", pa.int32()), ("height", pa.int32()),
    ("frames", pa.large_binary()),  # uint8 (F, S, S, 3), C order; empty on error rows
    ("frame_shape", pa.list_(pa.int32())),
    ("status", pa.string()), ("error_stage", pa.string()), ("error", pa.string()),
    (ITEM_ROWS, pa.int32()),
])


def decode_batch(items: pa.Table, settings: DecodeSettings) -> pa.Table:
    """Manifest items (pipeline.sources.ITEM_SCHEMA) -> decoded clips (CLIP_SCHEMA)."""
    out: list[dict] = []
    for item in items.to_pylist():
        if item.get("error"):  # refused when listed (e.g. a vqa item without questions)
            rows = [error_row(item, READ, item["error"], settings.image_size)]
        else:
            rows = fetch_and_decode(item, settings)
        n = len(rows) * len(item["prompts"])
        for row in rows:
            frames = np.ascontiguousarray(row.pop("frames"))
            row.update(frames=frames.tobytes(), frame_shape=list(frames.shape), prompts=item["prompts"])
            row[ITEM_ROWS] = n
            out.append(row)
    return pa.Table.from_pylist(out, schema=CLIP_SCHEMA)


def local_model_dir(path: str, storage_options: dict[str, Any] | None = None, cache_root: str | None = None) -> str:
    """A model directory on local disk: `path` itself, or a cached download of a remote one."""
    protocol = fsspec.utils.get_protocol(path)
    if protocol in ("file", "local"):
        return fsspec.core.strip_protocol(path)
    root = cache_root or os.environ.get("LAVI_CACHE", os.path.expanduser("~/.cache/lavi-label/models"))
    target = os.path.join(root, hashlib.sha1(path.encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(target, ".complete")):
        return target
    fs, remote = fsspec.core.url_to_fs(path, **(storage_options or {}))
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    os.makedirs(tmp)
    for src in fs.find(remote):  # a flat checkpoint dir: config, weights, tokenizer
        fs.get_file(src, os.path.join(tmp, os.path.relpath(src, remote.rstrip("/"))))
    open(os.path.join(tmp, ".complete"), "w").close()
    try:
        os.rename(tmp, target)  # atomic: concurrent actors on one node race safely
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another actor got there first
    log.info("model %s cached at %s", path, target)
    return target


class Labeler:
    """map_batches callable: CLIP_SCHEMA batches -> LABEL_SCHEMA rows (+ _item_rows)."""

    def __init__(self, model: str | None, job_id: str, generation: dict, storage_options: dict | None = None,
                 device: str = "cpu", max_batch: int | None = 32, compile: bool = False, memory_share: float = 1.0,
                 frames: int | None = None):
        """max_batch None: on a GPU, as many rows as its memory holds (`Engine.fit_batch`, measured once at load,
        `memory_share` of the device when replicas share it); on CPU, CPU_BATCH. compile: the decode step."""
        import torch  # workers only: the driver never loads torch for this
        from lavi.engine import DEFAULT_MODEL, Engine, GenerationConfig

        # None: the bundled model of this node's installation (a driver's path may not exist here); bf16 on GPUs
        cuda = device.startswith("cuda")
        self.engine = Engine.load(local_model_dir(model or DEFAULT_MODEL, storage_options), device=device,
                                  dtype=torch.bfloat16 if cuda else None, max_batch=max_batch or CPU_BATCH,
                                  compile=compile)
        self.gen = GenerationConfig(**generation)
        if max_batch is None and cuda:
            self.engine.fit_batch(share=memory_share, new_tokens=self.gen.max_new_tokens, frames=frames)
            log.info("labeler batch from GPU memory: %d rows", self.engine.max_batch)
        self.job_id = job_id
        self.max_batch = self.engine.max_batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        clips = batch.to_pylist()
        out: list[dict | None] = []
        slots: list[tuple[int, int, str]] = []  # (output index, clip index in batch, prompt text) to infer
        for c, clip in enumerate(clips):
            for p in clip["prompts"]:
                text = p["prompt"] if p["prompt"] is not None else self._default_prompt(clip["media_type"])
                out.append(self._row(clip, p["task"], text))
                if clip["status"] != ERROR:
                    slots.append((len(out) - 1, c, text))
        for start in range(0, len(slots), self.max_batch):
            self._infer(clips, slots[start:start + self.max_batch], out)
        expected = sum(len(clip["prompts"]) for clip in clips)
        if len(out) != expected:
            raise AssertionError(f"labeler emitted {len(out)} rows for {expected} (clip, prompt) pairs")
        table = table_from_rows([{k: v for k, v in r.items() if k != ITEM_ROWS} for r in out])
        return table.append_column(ITEM_ROWS, pa.array([r[ITEM_ROWS] for r in out], pa.int32()))

    def _default_prompt(self, media_type: str) -> str:
        return self.engine.default_prompt(media_type if media_type in (IMAGE, VIDEO) else IMAGE)

    def _row(self, clip: dict, task: str, prompt: str) -> dict:
        is_error = clip["status"] == ERROR
        return {
            "row_id": row_id(clip["item_id"], clip["clip_index"], prompt, task),
            "item_id": clip["item_id"], "uri": clip["uri"], "media_type": clip["media_type"],
            "clip_index": clip["clip_index"], "clip_start_s": clip["clip_start_s"], "clip_end_s": clip["clip_end_s"],
            "frame_timestamps_s": clip["frame_timestamps_s"], "width": clip["width"], "height": clip["height"],
            "task": task, "prompt": prompt, "text": None, "status": ERROR if is_error else None,
            "error_stage": clip["error_stage"] if is_error else None, "error": clip["error"] if is_error else None,
            "num_prompt_tokens": None, "num_generated_tokens": None,
            "model": self.engine.name, "job_id": self.job_id,
            "created_at": dt.datetime.now(dt.timezone.utc), ITEM_ROWS: clip[ITEM_ROWS],
        }

    def _infer(self, clips: list[dict], slots: list[tuple[int, int, str]], out: list[dict]) -> None:
        """Generate for one sub-batch; a failure marks exactly these rows as infer errors."""
        used = sorted({c for _, c, _ in slots})
        local = {c: i for i, c in enumerate(used)}
        try:
            visuals = [np.frombuffer(clips[c]["frames"], np.uint8).reshape(clips[c]["frame_shape"]).copy()
                       for c in used]  # writable: torch refuses read-only buffers
            gens = self.engine.generate(visuals, [(local[c], text) for _, c, text in slots], self.gen)
            if len(gens) != len(slots):
                raise RuntimeError(f"engine returned {len(gens)} generations for {len(slots)} requests")
        except (RuntimeError, ValueError) as err:  # torch errors (incl. CUDA OOM), bad frames
            log.warning("inference failed for %d requests: %s", len(slots), err)
            for i, _, _ in slots:
                out[i].update(status=ERROR, error_stage=INFER, error=f"{type(err).__name__}: {err}"[:500])
            return
        now = dt.datetime.now(dt.timezone.utc)
        for (i, _, _), g in zip(slots, gens):
            out[i].update(text=g.text, status=OK if g.finished else TRUNCATED, num_prompt_tokens=g.num_prompt_tokens, num_generated_tokens=g.num_generated_tokens,
                          created_at=now)
