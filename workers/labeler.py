"""The labeler actor: decoded clips (schemas.clips.CLIP_SCHEMA) -> output rows (LABEL_SCHEMA).

Labeler is the callable class for `map_batches` (Ray's batch-inference pattern): `__init__`
loads the engine once per actor (or `from_engine` wraps one already loaded, as `lavi-label
eval` does); `__call__` expands each clip's prompts into requests to infer, runs
`engine.generate` in sub-batches and returns one LABEL_SCHEMA row per (item, clip, prompt),
plus the bookkeeping columns (schemas.clips.BOOKKEEPING: rows its unit yields in all, its clip group, bytes read)
so the sink commits only whole units.
Input error rows pass through as error rows; an inference error becomes error rows of stage
"infer" for its sub-batch; every row leaves with a status (checked). A prompt's constraint (choices
or a JSON schema, lavi.serving.constrain) masks its tokens; one the model cannot meet, or a text that breaks
it anyway, makes that row an infer error, so every ok row meets its constraint.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from schemas.clips import BOOKKEEPING, CLIP_SCHEMA
from schemas.rows import ERROR, IMAGE, INFER, OK, TRUNCATED, VIDEO, error_columns, row_id, table_from_rows
from workers.cpu_share import cpu_share, cpu_threads, node_cpus
from workers.model_cache import local_model_dir
from workers.progress import LOADING, RowReporter

if TYPE_CHECKING:  # torch loads in the actor, not where this module is imported
    from lavi.serving.constrain import Constraint
    from lavi.serving.engine import Engine
    from lavi.serving.steps import GenerationConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelerSpec:
    """What a labeler actor needs, frozen, built once by the driver from the run's config (pipeline.graph).

    max_batch: generation rows per batch (the driver resolves auto on CPU to a number); None: on a GPU, as many rows
    as its memory holds (`Engine.fit_batch`, measured once at load, `memory_share` of the device when replicas share
    it), on CPU the engine's default. compile: the decode step. inflight: in-flight batching (a finished row's cache
    row goes to a waiting request) over each input block; False: static batches. quantize: "int8", weight-only int8
    decoder linear layers (lavi.serving.quant). visual_compress: a concat model's fewer visual tokens (lavi.visual_tokens.methods).
    progress: the name of the run's row counter (workers.progress), told of rows and work as they happen.
    workers, cpus_per_worker: the run's CPU labelers, from which each sets its torch threads (`cpu_threads`)."""

    model: str | None
    job_id: str
    generation: dict = field(default_factory=dict)
    storage_options: dict = field(default_factory=dict)
    device: str = "cpu"
    max_batch: int | None = 32
    compile: bool = False
    memory_share: float = 1.0
    frames: int | None = None
    inflight: bool = True
    quantize: str | None = None
    dtype: str | None = None  # pipeline.config.DTYPES; None: bf16 on a GPU, lavi.serving.cpu_pack.cpu_dtype on CPU
    visual_compress: str | None = None
    progress: str | None = None
    workers: int = 1
    cpus_per_worker: float = 0.5


class Labeler:
    """map_batches callable: CLIP_SCHEMA batches -> LABEL_SCHEMA rows (+ the bookkeeping columns)."""

    def __init__(self, spec: LabelerSpec):
        # the run's counter hears of this labeler from the start: a model's download and load (minutes at real sizes)
        # is work under way, shown as such and never taken for a stall
        reporter = RowReporter(spec.progress, work=lambda: {LOADING: 1}, labeler=uuid.uuid4().hex[:12])
        with reporter.busy():
            engine, gen = self._load(spec)
        self._attach(engine, spec.job_id, gen, reporter)
        reporter.flush(wait=True)  # loaded: the counter has the engine's counts, not "loading", before any block

    @staticmethod
    def _load(spec: LabelerSpec) -> tuple["Engine", "GenerationConfig"]:
        import torch  # workers only: the driver never loads torch for this

        from lavi.bundled import DEFAULT_MODEL
        from lavi.serving.cpu_pack import cpu_dtype, weight_count
        from lavi.serving.engine import Engine
        from lavi.serving.steps import GenerationConfig

        # None: the bundled model of this node's installation (a driver's path may not exist here); by default bf16 on
        # GPUs, float32 on a CPU without native bf16 (lavi.serving.cpu_pack.cpu_dtype: a bf16 checkpoint would compute
        # ~4x slower), the checkpoint's own dtype on one with it
        cuda = spec.device.startswith("cuda")
        batch = {} if spec.max_batch is None else {"max_batch": spec.max_batch}
        dtype = getattr(torch, spec.dtype) if spec.dtype else torch.bfloat16 if cuda else cpu_dtype()
        cpus = None if cuda else node_cpus()
        if not cuda:  # the load (copies, casts, oneDNN's packing) on all of this labeler's share, not Ray's one thread
            torch.set_num_threads(cpu_share(cpus, spec.workers, spec.cpus_per_worker))
        engine = Engine.load(local_model_dir(spec.model or DEFAULT_MODEL, spec.storage_options), device=spec.device,
                             dtype=dtype, compile=spec.compile,
                             quantize=spec.quantize, visual_compress=spec.visual_compress, **batch)
        engine.inflight = spec.inflight
        if not cuda:
            threads = cpu_threads(cpus, spec.workers, spec.cpus_per_worker, weight_count(engine.model))
            torch.set_num_threads(threads)
            log.info("CPU labeler: %d torch threads", threads)
        gen = GenerationConfig(**spec.generation)
        if spec.max_batch is None and cuda:
            engine.fit_batch(share=spec.memory_share, new_tokens=gen.max_new_tokens, frames=spec.frames)
            log.info("labeler batch from GPU memory: %d rows", engine.max_batch)
        return engine, gen

    @classmethod
    def from_engine(cls, engine: "Engine", job_id: str, generation: dict) -> "Labeler":
        """A labeler around an engine already loaded (lavi.serving.engine.Engine), batching as its max_batch says."""
        from lavi.serving.steps import GenerationConfig

        labeler = cls.__new__(cls)
        labeler._attach(engine, job_id, GenerationConfig(**generation), RowReporter(None))
        return labeler

    def _attach(self, engine: "Engine", job_id: str, gen: "GenerationConfig", reporter: RowReporter) -> None:
        reporter.work = lambda: engine.generator.work.as_dict()  # the engine's counts from now on (no longer loading)
        self.reporter = reporter
        self.engine = engine
        self.gen = gen
        self.job_id = job_id
        self.max_batch = engine.max_batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        """CLIP_SCHEMA rows -> LABEL_SCHEMA rows + the bookkeeping columns, one per (clip, prompt), in input order."""
        with self.reporter.busy():
            clips, out, asks, rules = self._requests(batch)
            # in-flight batching: the whole block at once, the engine keeping its pool of max_batch rows full
            step = max(1, len(asks)) if getattr(self.engine, "inflight", False) else self.max_batch
            for start in range(0, len(asks), step):
                self._infer(clips, asks[start:start + step], out, rules)
            return self._table(out)

    def _requests(self, batch: pa.Table) -> tuple[list[dict], list[dict], list[tuple[int, int, str]], dict]:
        """A block's clips, its output rows (status still None), the requests to infer (output row, clip in the
        block, prompt text) and the constraints their texts must meet (by output row)."""
        clips = batch.to_pylist()
        out: list[dict] = []
        asks: list[tuple[int, int, str]] = []
        rules: dict[int, "Constraint"] = {}
        for c, clip in enumerate(clips):
            for p in clip["prompts"]:
                text = p["prompt"] if p["prompt"] is not None else self._default_prompt(clip["media_type"])
                out.append(self._row(clip, p["task"], text, p.get("constraint")))
                if clip["status"] != ERROR and self._constrain(len(out) - 1, p.get("constraint"), out[-1], rules):
                    asks.append((len(out) - 1, c, text))
        return clips, out, asks, rules

    def _table(self, out: list[dict]) -> pa.Table:
        """The block's rows as LABEL_SCHEMA + the bookkeeping columns, once every one has its status (checked)."""
        self.reporter.flush(wait=True)
        unlabelled = [r["row_id"] for r in out if r["status"] is None]
        if unlabelled:  # a request never asked, or its answer never stored
            raise AssertionError(f"labeler left {len(unlabelled)} of {len(out)} rows without a status, "
                                 f"e.g. {unlabelled[:3]}")
        table = table_from_rows([{k: v for k, v in r.items() if k not in BOOKKEEPING} for r in out])
        for name in BOOKKEEPING:
            table = table.append_column(CLIP_SCHEMA.field(name), pa.array([r[name] for r in out],
                                                                            CLIP_SCHEMA.field(name).type))
        return table

    def _default_prompt(self, media_type: str) -> str:
        return self.engine.default_prompt(media_type if media_type in (IMAGE, VIDEO) else IMAGE)

    def _constrain(self, i: int, spec: str | None, row: dict, rules: dict) -> bool:
        """Note row i's constraint in `rules`; False (the row an infer error) when this model cannot meet it."""
        if spec is None:
            return True
        from lavi.serving.constrain import Constraint, ConstraintError

        try:
            constraint = Constraint.parse(spec)
            self.engine.vocabulary.grammar(constraint)  # compiled once per constraint, or refused by name
        except ConstraintError as err:
            row.update(error_columns(INFER, f"constraint: {err}"))
            return False
        rules[i] = constraint
        return True

    def _row(self, clip: dict, task: str, prompt: str, constraint: str | None = None) -> dict:
        failed = error_columns(clip["error_stage"], clip["error"]) if clip["status"] == ERROR else {}
        return {
            "row_id": row_id(clip["item_id"], clip["clip_index"], prompt, task, constraint),
            "item_id": clip["item_id"], "uri": clip["uri"], "media_type": clip["media_type"],
            "clip_index": clip["clip_index"], "clip_start_s": clip["clip_start_s"], "clip_end_s": clip["clip_end_s"],
            "frame_timestamps_s": clip["frame_timestamps_s"], "width": clip["width"], "height": clip["height"],
            "task": task, "prompt": prompt, "text": None, "status": None, "error_stage": None, "error": None,
            "num_prompt_tokens": None, "num_generated_tokens": None,
            "model": self.engine.name, "job_id": self.job_id,
            "created_at": dt.datetime.now(dt.timezone.utc), **{k: clip.get(k) for k in BOOKKEEPING}, **failed,
        }

    @staticmethod
    def _inputs(clips: list[dict], asks: list[tuple[int, int, str]]) -> tuple[list, list, list[tuple[int, str]]]:
        """The engine's inputs for requests: each clip's frames once, its media, (frames index, prompt) pairs."""
        used = sorted({c for _, c, _ in asks})
        local = {c: i for i, c in enumerate(used)}
        visuals = [np.frombuffer(clips[c]["frames"], np.uint8).reshape(clips[c]["frame_shape"]).copy()
                   for c in used]  # writable: torch refuses read-only buffers
        media = [_media(clips[c]) for c in used]
        return visuals, media, [(local[c], text) for _, c, text in asks]

    def _infer(self, clips: list[dict], asks: list[tuple[int, int, str]], out: list[dict], rules: dict,
               inflight: bool | None = None) -> None:
        """Generate for one sub-batch of requests; a failure marks exactly their rows as infer errors."""
        try:
            visuals, media, requests = self._inputs(clips, asks)
            gens = self.engine.generate(visuals, requests, self.gen, media, [rules.get(i) for i, _, _ in asks],
                                        on_rows=self.reporter.add, inflight=inflight)
        except (RuntimeError, ValueError) as err:  # torch errors (incl. CUDA OOM), bad frames
            if len(asks) > self.max_batch:  # a whole in-flight block: find the failing batches, fail only those
                log.warning("inference failed for a block of %d requests (%s): retrying in batches of %d",
                            len(asks), err, self.max_batch)
                self._retry(clips, asks, out, rules)
                return
            log.warning("inference failed for %d requests: %s", len(asks), err)
            for i, _, _ in asks:
                out[i].update(error_columns(INFER, f"{type(err).__name__}: {err}"))
            return
        self._store(asks, gens, out)

    def _retry(self, clips: list[dict], asks: list[tuple[int, int, str]], out: list[dict], rules: dict) -> None:
        """Requests whose in-flight generation failed, again in static batches of max_batch: only the batches that
        fail again become infer error rows."""
        for start in range(0, len(asks), self.max_batch):
            self._infer(clips, asks[start:start + self.max_batch], out, rules, inflight=False)

    def _store(self, asks: list[tuple[int, int, str]], gens: list, out: list[dict]) -> None:
        """The generations' texts, counts and statuses into their output rows."""
        if len(gens) != len(asks):
            raise RuntimeError(f"engine returned {len(gens)} generations for {len(asks)} requests")
        now = dt.datetime.now(dt.timezone.utc)
        for (i, _, _), g in zip(asks, gens):
            counts = dict(num_prompt_tokens=g.num_prompt_tokens, num_generated_tokens=g.num_generated_tokens,
                          created_at=now)
            if g.violation is not None:  # no ok row breaks its constraint
                out[i].update(**error_columns(INFER, f"constraint not met: {g.violation}"), **counts)
            else:
                out[i].update(text=g.text, status=OK if g.finished else TRUNCATED, **counts)


def _media(clip: dict) -> tuple:
    """A clip's media entry for the engine: (kind, (height, width)), and for a video its frames' times in seconds
    (`frame_timestamps_s`), which a model that sees time reads (Qwen2.5-VL's temporal positions, Qwen3-VL's
    "<t seconds>" prompt text); the others read the first two."""
    entry = (clip["media_type"], (clip["height"], clip["width"]))
    times = clip["frame_timestamps_s"]
    return (*entry, tuple(times)) if clip["media_type"] == VIDEO and times else entry


class StreamingLabeler(Labeler):
    """The labeler with in-flight batching across blocks: an async callable, so that Ray Data runs its calls for
    several blocks at once; each submits its block's requests to the engine's pool, stepped by a thread of the
    actor's own (`workers.serve.EngineServer`), and awaits them, so the next block's requests take the rows the
    current one frees. A block whose requests fail in flight is retried in static batches on that thread (only
    the batches that fail again become infer error rows). Rows leave with their own block, each exactly once."""

    def _attach(self, engine: "Engine", job_id: str, gen: "GenerationConfig", reporter: RowReporter) -> None:
        from workers.serve import EngineServer

        super()._attach(engine, job_id, gen, reporter)
        self.server = EngineServer(engine)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        with self.reporter.busy():
            return await self._call(batch)

    async def _call(self, batch: pa.Table) -> pa.Table:
        import asyncio

        loop = asyncio.get_running_loop()
        clips, out, asks, rules = self._requests(batch)
        if asks:
            visuals, media, requests = self._inputs(clips, asks)
            ticket = self.server.submit(visuals, requests, self.gen, media, [rules.get(i) for i, _, _ in asks],
                                        self.reporter.add)
            await loop.run_in_executor(None, ticket.done.wait)
            if ticket.error is None:
                self._store(asks, self.engine.completions(ticket), out)
            else:
                await asyncio.wrap_future(self.server.exclusive(lambda: self._retry(clips, asks, out, rules)))
        return await loop.run_in_executor(None, self._table, out)  # it waits on the row counter: not on the loop
