"""`run(config)`: one labeling run, driven from here: list, build the graph, follow its commits, summarise.

    Resume.scan(out)     what earlier runs left, per listing shard (pipeline.resume)
    Lister (a thread)    the INPUTs, a shard at a time, into out/_listing/ (pipeline.listing)
    build_dataset        the Ray Data graph over those shards (pipeline.graph)
    stream -> Ledger     the commit records of its part files, per shard; complete shards recorded (pipeline.ledger)
    _summary.json        the shards' totals and this run's figures (pipeline.summary)

The driver plans and watches; it does not carry the rows: part files are written in the cluster, and what reaches
the driver is a record per file (and the rare unit cut between blocks, committed here: pipeline.sink). Its memory
holds the shards in flight, not the corpus. A lost node, actor or object ends a graph; it is rebuilt over what is
not committed (each shard in flight read back from its own files: Ledger.rescan), up to config.max_rebuilds times.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import secrets
import time
import uuid
from typing import Any, Callable

from lavi.visual_tokens.methods import checked
from pipeline import graph
from pipeline.cluster import connect_ray
from pipeline.config import RunConfig
from pipeline.ledger import Ledger
from pipeline.listing import Lister
from pipeline.models import check_constraint, model_info
from pipeline.output import LISTING_DIR, Output
from pipeline.recovery import check_resources, cluster_check, lost_cluster_part, stream
from pipeline.resume import Resume
from pipeline.sink import ParquetSink
from pipeline.sources import check_inputs
from pipeline.summary import Progress, Ticker, build_summary, totals
from schemas.rows import metadata
from workers.commit import CommitSpec
from workers.fetch import OWN_BUDGET_S, OWN_RETRIES, retrying
from workers.labeler import LabelerSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Labelled:
    """What `_label` found: the pipeline rebuilds it went through, the stalls it got over, the labelers' engines' work
    (prefills, their tokens, decode steps), the seconds Ray took to start or connect, and those from then until the
    first labeler had loaded its model."""

    rebuilds: list[dict] = dataclasses.field(default_factory=list)
    stalls: list[dict] = dataclasses.field(default_factory=list)
    work: dict = dataclasses.field(default_factory=dict)
    ray_start_s: float | None = None
    labeler_ready_s: float | None = None


def run(config: RunConfig, labeler_class: type | None = None) -> dict:
    """Label every input item into Parquet at config.out; returns the `_summary.json` document.

    Resumes: items already committed in config.out are skipped (unless config.overwrite).
    Raises ValueError on unusable inputs, model or an output written with other settings. `labeler_class`: the
    benchmark's labeler without a model (bench.fixed_labeler); None, the run's own.
    """
    start = time.monotonic()
    options = config.storage
    model = config.model or _default_model()
    info = model_info(model, options)
    generation = _generation(config, model, info)
    check_inputs(config.inputs, options)
    output = Output(config.out, options)
    if config.overwrite:
        log.info("--overwrite: removed %d files from %s", output.clear(), config.out)
    resume = Resume.scan(output)
    meta = resume.metadata
    if meta and (meta.get("model") != info["name"] or meta.get("generation") != generation):
        raise ValueError(f"{config.out} holds labels from model {meta.get('model')!r} with settings "
                         f"{meta.get('generation')}; this run uses {info['name']!r} with {generation}: "
                         "pass --overwrite to replace them, or choose another --out")
    job_id = config.job_id or meta.get("job_id") or f"lavi-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    output.clear_summary()  # the completion marker goes until this run completes
    output.clear_scratch()  # after Resume.scan read a killed run's listing
    ledger = Ledger(output, resume.complete_totals())
    lister = Lister(config, output, resume, ledger)
    ledger.on_complete = lister.empty
    commit = CommitSpec(out=output.uri_of(output.base), storage_options=options,
                        metadata=metadata(info["name"], generation, job_id), rows_per_file=config.rows_per_file)
    log.info("listing %s into %s", ", ".join(config.inputs), output.listing)
    lister.start()
    try:
        labelled = _label(config, info, output, ledger, lister, commit, job_id, labeler_class)
    finally:
        lister.stop.set()
    output.clear_scratch()
    total = totals(output) if lister.recount or _orphans(resume, ledger) else ledger.totals
    summary = _summary(config, total, ledger, lister.stats, labelled, job_id=job_id, model=info["name"],
                       generation=generation, wall_s=time.monotonic() - start)
    # the completion marker, retried like a commit (an output store unreachable for a while)
    retrying(lambda: output.write_summary(summary), "summary write", OWN_RETRIES, budget_s=OWN_BUDGET_S)
    return summary


def _generation(config: RunConfig, model: str, info: dict[str, Any]) -> dict:
    """The run's generation settings (its output's metadata), once the model is checked to take the run's options
    (a constraint its vocabulary can meet, its frames, a visual compression) before anything is listed: a run
    refused only then would be all error rows."""
    check_constraint(model, info["name"], config.constraint, config.storage)
    if config.frames is not None and config.frames > info["max_frames"]:
        raise ValueError(f"--frames {config.frames} is over the model's max_frames {info['max_frames']}: lower it")
    if config.visual_compress:
        checked(config.visual_compress, info["name"], info["fusion"], info.get("compress_methods"),
                info["vision_in_context"])
    generation = config.generation_settings()
    groups = config.decode_settings(info["image_size"], config.frames or info["default_frames"], info["pinpoints"],
                                    info["dynamic"]).group_clips
    if groups != config.clips_per_group:  # fewer clips a group at this model's input (DecodeSettings.group_clips)
        generation["clips_per_group"] = groups
    return generation


def _summary(config: RunConfig, total: dict, ledger: Ledger, stats: dict, labelled: Labelled, **run: Any) -> dict:
    """`_summary.json`'s document: the output's totals, this run's figures (the ledger's, the listing's `stats`),
    and `run`'s fields (job_id, model, generation, wall_s)."""
    summary = build_summary(
        total, **run, items_listed=stats["listed"], items_skipped=stats["skipped"], rows_written=ledger.run["rows"],
        items_written=ledger.run["items"], generated_tokens=ledger.run["generated_tokens"],
        files_written=ledger.run["files"])
    summary["non_media_files"] = dict(sorted(stats.get("non_media", {}).items()))  # left out of walks, by extension
    summary["pipeline_rebuilds"] = labelled.rebuilds  # a lost node, actor or object: the graph rebuilt over the rest
    summary["stalls"] = labelled.stalls  # periods of --stall-timeout with no row that the job got over
    summary["model_dir"] = config.model  # None: the bundled model; `retry` labels with it again
    summary["items_with_own_constraints"] = stats["own_constraints"]  # a manifest's per-question choices or schema
    summary["this_run"].update(units=ledger.run["units"], bytes_read=ledger.run["bytes_read"],  # units: items, groups
                               reads_failed_after_retries=ledger.run["reads_failed"],  # `lavi-label retry` redoes them
                               read_retries=ledger.run["read_retries"],  # fetches retried after a transient error
                               reads_recovered_by_retries=ledger.run["reads_recovered"],  # read whole after a retry
                               commit_retries=ledger.run["commit_retries"],  # part-file writes retried (store away)
                               clip_groups_resumed=ledger.resumed_groups,
                               engine_work=labelled.work,  # the labelers' prefills, their tokens and decode steps
                               ray_start_s=labelled.ray_start_s,  # Ray started (local) or connected to
                               labeler_ready_s=labelled.labeler_ready_s)  # from Ray's start: a labeler has its model
    summary["max_error_rate"] = config.max_error_rate
    summary["error_rate_exceeded"] = summary["error_rate"] > config.max_error_rate
    return summary


def _orphans(resume: Resume, ledger: Ledger) -> bool:
    """Part files at shard positions this run neither listed nor found complete (the inputs list fewer shards now):
    their rows are in no shard record, so the totals are counted from the files."""
    return any(pos not in resume.records and pos >= ledger.positions for pos in resume.files)


def _label(config: RunConfig, info: dict[str, Any], output: Output, ledger: Ledger, lister: Lister,
           commit: CommitSpec, job_id: str, labeler_class: type | None = None) -> Labelled:
    """Run the Ray Data graph over the listing into part files, following its commit records in the ledger (a lost
    node, actor or object: `_graphs`), with Ray up for as long as it runs and a progress line."""
    result = Labelled()
    settings = config.decode_settings(info["image_size"], config.frames or info["default_frames"], info["pinpoints"],
                                      info["dynamic"])
    # Ray starts while the inputs are listed (seconds each); a rerun with nothing left to label shuts it down unused
    started = time.monotonic()
    owned = connect_ray(config.address, config.verbose)
    result.ray_start_s = time.monotonic() - started
    progress = ticker = None
    try:
        if not ledger.wait_written(lister.done):  # everything is committed already: no graph
            _raise_listing_error(lister)
            return result
        progress = Progress(every_s=config.progress_seconds,
                            listed=lambda: (ledger.to_label, not ledger.listing_done))
        ticker = Ticker(progress, f"lavi-rows-{job_id}-{uuid.uuid4().hex[:8]}")
        labeler = _labeler_spec(config, settings, job_id, ticker.name)
        spec = graph.GraphSpec(config, settings, labeler, commit, output.uri_of(output.path(LISTING_DIR)),
                               labeler_class=labeler_class)
        check_resources(config)
        _graphs(spec, output, ledger, lister, progress, lambda: ticker.busy() or lister.active(), result)
        _raise_listing_error(lister)
        ticker, last = None, ticker
        last.stop()  # its last count is in the end's line
        result.work = dict(last.state.get("work") or {})
        result.labeler_ready_s = last.ready_at - started if last.ready_at is not None else None
        _show(progress, ledger, force=True)
        if not ledger.complete():  # every listed item yields its rows, error rows included
            raise RuntimeError(f"{ledger.to_label} items were listed but {ledger.items_finished()} came out of the "
                               "pipeline; the finished ones are committed: rerun into the same --out to label the rest")
    finally:
        if ticker is not None:
            ticker.stop()
        if progress is not None:
            progress.close()
        if owned:
            import ray

            ray.shutdown()
    return result


def _graphs(spec: graph.GraphSpec, output: Output, ledger: Ledger, lister: Lister, progress: Progress,
            busy: Callable[[], bool], result: Labelled) -> None:
    """Build the graph and follow its commit records into the ledger (a unit cut between blocks committed here, by
    the sink). A lost node, actor or object ends that graph: it is rebuilt over what is not committed (up to
    config.max_rebuilds times, each in `result.rebuilds`; a stall the job got over is in its `stalls`). The cluster
    is checked every few seconds to still hold the labeler pool (pipeline.recovery.cluster_check)."""
    config, sink, dataset = spec.config, ParquetSink(spec.commit), None
    cluster = cluster_check(config)

    def checks() -> None:  # every few seconds while the graph runs: the cluster, the listing thread
        cluster()
        _raise_listing_error(lister)

    try:
        while True:
            try:
                # config.model, not the resolved default: None lets each actor find the bundled model on its node
                dataset = graph.build_dataset(spec)
                for batch in stream(dataset, config.stall_timeout, check=checks, stalls=result.stalls, busy=busy):
                    for record, leftover in zip(batch.column("record").to_pylist(),
                                                batch.column("leftover").to_pylist()):
                        for r in [json.loads(record)] if record is not None else sink.add(leftover):
                            ledger.commit(r)
                    _show(progress, ledger)
                if config.verbose:  # Ray Data's account of each operator: tasks, blocks, wall and CPU time
                    log.info("Ray Data stats:\n%s", dataset.stats())
                break
            except Exception as err:  # noqa: BLE001 - only a lost node, actor or object is retried
                lost = lost_cluster_part(err)
                if lost is None or len(result.rebuilds) >= config.max_rebuilds:
                    raise
                dataset = None
                gc.collect()
                spec = _rebuilt(spec, lost, output, ledger, sink, result)
                if ledger.complete():
                    break
                cluster_check(config)()  # what is left must still hold the pool, or the rebuild would wait forever
    finally:
        # the dataset (and the pyarrow readers it holds) goes while Ray and Arrow's thread pools are up,
        # not in the interpreter's teardown, where Arrow can abort (apache/arrow#39862)
        del dataset
        gc.collect()
    sink.close()


def _rebuilt(spec: graph.GraphSpec, lost: str, output: Output, ledger: Ledger, sink: ParquetSink,
             result: Labelled) -> graph.GraphSpec:
    """The spec of the graph rebuilt after `lost` over what is not committed (the rebuild recorded in `result`)."""
    redone = sink.drop_partial()
    skip, state = ledger.rescan()
    left = ledger.to_label - ledger.items_finished()
    result.rebuilds.append({"error": lost, "items_left": left, "partial_items_redone": redone,
                            "items_done": ledger.items_finished(), "listing_done": ledger.listing_done})
    log.warning("the pipeline lost part of the cluster (%s): rebuilding it over what is not committed "
                "(%d items listed and not committed, %d of them half labelled, redone whole); rebuild %d of "
                "at most %d", lost, left, redone, len(result.rebuilds), spec.config.max_rebuilds)
    return dataclasses.replace(spec, skip=skip, state=tuple(sorted(state.items())))


def _labeler_spec(config: RunConfig, settings, job_id: str, progress: str | None) -> LabelerSpec:
    return LabelerSpec(
        model=config.model, job_id=job_id, storage_options=config.storage, device=config.device,
        max_batch=config.labeler_batch, compile=config.use_compile, memory_share=min(1.0, config.gpus_per_worker),
        frames=settings.frames_per_clip, inflight=config.inflight, quantize=config.quantize,
        dtype=config.dtype, visual_compress=config.visual_compress, progress=progress, workers=config.workers,
        cpus_per_worker=config.cpus_per_worker,
        generation={"max_new_tokens": config.max_new_tokens, "seed": config.seed, "temperature": config.temperature,
                    "top_p": config.top_p})


def _show(progress: Progress, ledger: Ledger, force: bool = False) -> None:
    progress.update(ledger.items_finished(), ledger.run["rows"], ledger.run["errors"], force=force)


def _raise_listing_error(lister: Lister) -> None:
    if lister.error is not None:
        raise lister.error


def _default_model() -> str:
    from lavi.bundled import DEFAULT_MODEL

    return DEFAULT_MODEL
