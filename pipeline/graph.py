"""The Ray Data graph of one labeling run, and `run(config)`, its driver.

    listing shards (pipeline.sources) -> from_items(shard URIs) -> map_batches(read_shards)   CPU tasks
      -> map_batches(split_batch)             CPU tasks: an image is one unit; a video is probed (range reads)
                                              and cut into clip groups, one unit each (workers.split)
      -> repartition(1 unit per block)        so one long video's groups decode in many tasks at once
      -> map_batches(decode_units)            CPU tasks: one unit each, one row per clip (workers.units)
      -> map_batches(Labeler, actor pool)     one engine per actor (GPU, or a CPU fraction)
      -> iter_batches on the driver -> ParquetSink (whole units per file) -> _summary.json

The local default Ray binds every listener to 127.0.0.1; `address` joins a running cluster.
CPU actors take a fraction of a CPU so read/decode tasks can always be scheduled (on two
cores, two actors at num_cpus=1 starve the reader and Ray Data waits forever).
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import secrets
import sys
import time
import uuid
from typing import Any

from pipeline.config import DECODE_CPUS, RunConfig
from pipeline.output import Output
from pipeline.recovery import check_resources, cluster_check, lost_cluster_part, stream
from pipeline.sink import ParquetSink
from pipeline.sources import PromptSpec, iter_items, remaining_shards, write_shards
from pipeline.storage import filesystem
from pipeline.summary import Progress, Ticker, build_summary
from schemas.rows import ERROR, metadata
from workers.fetch import OWN_BUDGET_S, OWN_RETRIES, retrying
from workers.labeler import Labeler, StreamingLabeler
from workers.settings import DecodeSettings
from workers.shards import SHARD, read_shards
from workers.split import split_batch
from workers.units import decode_units

log = logging.getLogger(__name__)


def model_info(model: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """name, input contract (image_size, anyres pinpoints) and frames of a checkpoint, from its config files only:
    a LaVi, or a Hugging Face LLaVA-OneVision (model_type llava_onevision). Anything else is refused by name."""
    from lavi.config import LaViConfig
    from lavi.onevision_config import DEFAULT_PROMPTS, MODEL_TYPE, OneVisionConfig

    fs, path = filesystem(model, storage_options)
    base = path.rstrip("/")
    if not fs.exists(f"{base}/config.json"):
        raise ValueError(f"--model {model!r} is not a checkpoint directory (no config.json)")
    hf = json.loads(fs.cat_file(f"{base}/config.json"))
    kind = hf.get("model_type")
    if kind == MODEL_TYPE:
        pre = json.loads(fs.cat_file(f"{base}/preprocessor_config.json")) if fs.exists(
            f"{base}/preprocessor_config.json") else {}
        ov = OneVisionConfig.from_hf(hf, pre, name=base.rsplit("/", 1)[-1])
        return {"name": ov.name, "fusion": "llava-ov", "image_size": ov.tile_size, "pinpoints": ov.pinpoints,
                "default_frames": ov.default_frames, "max_frames": ov.max_frames,
                "default_prompts": dict(ov.default_prompts or DEFAULT_PROMPTS)}
    if kind is not None or "decoder" not in hf:
        raise ValueError(f"--model {model!r} is a {kind!r} checkpoint; supported: a LaVi checkpoint or a "
                         f"LLaVA-OneVision ({MODEL_TYPE!r})")
    config = LaViConfig.from_dict(hf)
    return {"name": config.name, "fusion": config.fusion, "image_size": config.vision.image_size, "pinpoints": None,
            "default_frames": config.default_frames, "max_frames": config.max_frames,
            "default_prompts": dict(config.default_prompts)}


def connect_ray(address: str | None, verbose: bool = False) -> bool:
    """Start (address None) or join a Ray cluster unless one is connected; True if we must shut it down.

    $RAY_ADDRESS (set for a Ray Jobs entrypoint) counts as `address`."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        # keep the node IP (and so every listener) on loopback: see shared/SERVICES.md
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # a per-run token, so ~/.ray/auth_token stays untouched; ray reads these when imported, so
        # only before that (a token given to a cluster but not to this driver would lock us out)
        if "RAY_AUTH_TOKEN" not in os.environ and "ray" not in sys.modules:
            os.environ.setdefault("RAY_AUTH_MODE", "token")
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    import ray

    if ray.is_initialized():
        return False
    if address:
        context = ray.init(address=address, log_to_driver=False,
                           logging_level=logging.INFO if verbose else logging.WARNING)
        log.info("Ray: joined the cluster at %s", context.address_info["gcs_address"])
        return True
    context = ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                       logging_level=logging.INFO if verbose else logging.WARNING)
    log.info("Ray: started a local cluster at %s", context.address_info["gcs_address"])
    return True


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's log lines (the execution plan, tips) go to its log file in the Ray session's logs directory, not
    the terminal, unless `verbose`."""
    importlib.import_module("ray.data")  # its import sets up its handlers: its log file and the console
    for handler in logging.getLogger("ray.data").handlers:
        if handler.__class__.__name__ == "PlainRayHandler":  # the console one; the file handler stays
            handler.setLevel(logging.INFO if verbose else logging.CRITICAL + 1)


def build_dataset(shards: list[str], config: RunConfig, settings: DecodeSettings,
                  model: str | None, job_id: str, progress: str | None = None,
                  done_groups: dict[str, list[int]] | None = None):
    """The lazy Ray Data dataset of labeler output batches (LABEL_SCHEMA + the bookkeeping columns).
    `done_groups`: item_id -> clip groups already committed, left out by the split stage."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows its own progress
    quiet_ray_data(config.verbose)
    # the shards are read by plain tasks, not read_parquet's footer-reading actors: a node lost while listing costs
    # a task rerun (workers.shards); they are in the output, read with the run's storage options
    ds = ray.data.from_items([{SHARD: s} for s in shards])
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow", num_cpus=DECODE_CPUS,
                        fn_kwargs={"storage_options": config.storage})
    # a shard is one block: split it (streaming) so decode tasks run in parallel and results
    # reach the sink as they finish rather than one whole shard at a time
    ds = ds.repartition(target_num_rows_per_block=config.decode_batch_size)
    ds = ds.map_batches(split_batch, batch_size=config.decode_batch_size, batch_format="pyarrow",
                        fn_kwargs={"settings": settings, "done": done_groups or {}}, num_cpus=DECODE_CPUS)
    ds = ds.repartition(target_num_rows_per_block=1)  # a unit per decode task: a video's groups run in parallel
    pool = ray.data.TaskPoolStrategy(size=config.decode_workers) if config.decode_workers else None
    # max_calls=0 (no limit) is Ray's own default for CPU tasks, given here to keep the decode stage its own tasks:
    # Ray Data fuses a task map into the actor map after it when their remote arguments are equal (CPU labelers take
    # DECODE_CPUS too), and every clip group would then be decoded inside the labeler actors, between their batches
    ds = ds.map_batches(decode_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"settings": settings},
                        num_cpus=DECODE_CPUS, compute=pool, max_calls=0)
    gpu = config.gpus_per_worker > 0
    # in-flight: an async labeler whose calls for two blocks overlap, so the next block's requests take the rows
    # the current one frees (workers.labeler.StreamingLabeler)
    return ds.map_batches(
        StreamingLabeler if config.inflight else Labeler, batch_size=config.block_rows, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.workers,
                                           max_concurrent_calls_per_actor=2 if config.inflight else None),
        num_gpus=config.gpus_per_worker if gpu else None, num_cpus=None if gpu else config.cpus_per_worker,
        fn_constructor_kwargs={"model": model, "job_id": job_id, "storage_options": config.storage,
                               "device": config.device, "max_batch": config.labeler_batch,
                               "compile": config.use_compile, "memory_share": min(1.0, config.gpus_per_worker),
                               "frames": settings.frames_per_clip, "inflight": config.inflight,
                               "quantize": config.quantize, "visual_compress": config.visual_compress,
                               "progress": progress,
                               "generation": {"max_new_tokens": config.max_new_tokens, "seed": config.seed,
                                              "temperature": config.temperature, "top_p": config.top_p}})


def run(config: RunConfig) -> dict:
    """Label every input item into Parquet at config.out; returns the `_summary.json` document.

    Resumes: items already committed in config.out are skipped (unless config.overwrite).
    Raises ValueError on unusable inputs, model or an output written with other settings.
    """
    start = time.monotonic()
    options = config.storage
    info = model_info(config.model or _default_model(), options)
    if config.frames is not None and config.frames > info["max_frames"]:
        raise ValueError(f"--frames {config.frames} is over the model's max_frames {info['max_frames']}: lower it")
    if config.visual_compress and info["fusion"] in ("viln", "vlora"):
        raise ValueError(f"--visual-compress thins the visual tokens in a concat model's context; {info['name']} is "
                         f"a {info['fusion']} model, with none there")
    generation = config.generation_settings()
    output = Output(config.out, options)
    if config.overwrite:
        log.info("--overwrite: removed %d files from %s", output.clear(), config.out)
    state = output.scan()
    if state.metadata and (state.metadata.get("model") != info["name"] or state.metadata.get("generation") != generation):
        raise ValueError(f"{config.out} holds labels from model {state.metadata.get('model')!r} with settings "
                         f"{state.metadata.get('generation')}; this run uses {info['name']!r} with {generation}: "
                         "pass --overwrite to replace them, or choose another --out")
    job_id = config.job_id or state.metadata.get("job_id") or f"lavi-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    output.clear_summary()  # the completion marker goes until this run completes
    output.clear_scratch()
    spec = PromptSpec(task=config.task, prompt=config.prompt, questions=config.questions,
                      constraint=config.constraint)
    listed: dict[str, int] = {}
    shards, n_items = write_shards(iter_items(config.inputs, spec, options, skip=state.done_items, stats=listed),
                                   output.fs, output.listing)
    log.info("job %s: %d items to label (%d of them videos half done: %d clip groups done), %d already done in %s",
             job_id, n_items, len(state.done_groups), sum(map(len, state.done_groups.values())), listed["skipped"],
             config.out)
    sink = ParquetSink(output, metadata(info["name"], generation, job_id), config.rows_per_file,
                       done_groups=state.done_groups)
    rebuilds: list[dict] = []
    stalls: list[dict] = []
    tokens = _label(config, info, shards, n_items, output, sink, job_id, rebuilds, stalls) if n_items else 0
    output.clear_scratch()
    summary = build_summary(
        output, job_id=job_id, model=info["name"], generation=generation,
        wall_s=time.monotonic() - start, items_listed=listed["listed"],
        items_skipped=listed["skipped"], rows_written=sink.rows_written, items_written=sink.items_written,
        generated_tokens=tokens, files_written=len(sink.files))
    summary["non_media_files"] = dict(sorted(listed.get("non_media", {}).items()))  # left out of walks, by extension
    summary["pipeline_rebuilds"] = rebuilds  # a lost node, actor or object: the graph rebuilt over what was left
    summary["stalls"] = stalls  # periods of --stall-timeout with no row that the job got over
    summary["model_dir"] = config.model  # None: the bundled model; `retry` labels with it again
    summary["items_with_own_constraints"] = listed["own_constraints"]  # a manifest's per-question choices or schema
    summary["this_run"].update(units=sink.units_written, bytes_read=sink.bytes_read,  # units: items and clip groups
                               reads_failed_after_retries=sink.reads_failed,  # units: `lavi-label retry` redoes them
                               read_retries=sink.read_retries,  # fetches retried after a transient storage error
                               reads_recovered_by_retries=sink.reads_recovered,  # units read whole after a retry
                               clip_groups_resumed=sum(map(len, state.done_groups.values())))
    summary["max_error_rate"] = config.max_error_rate
    summary["error_rate_exceeded"] = summary["error_rate"] > config.max_error_rate
    # the completion marker, retried like a commit (an output store unreachable for a while)
    retrying(lambda: output.write_summary(summary), "summary write", OWN_RETRIES, budget_s=OWN_BUDGET_S)
    return summary


def _label(config: RunConfig, info: dict[str, Any], shards: list[str], n_items: int, output: Output,
           sink: ParquetSink, job_id: str, rebuilds: list[dict], stalls: list[dict]) -> int:
    """Run the Ray Data graph over the listing shards into the sink; returns the tokens generated. A lost node,
    actor or object ends that graph: it is rebuilt over the items not yet done (up to config.max_rebuilds times,
    each appended to `rebuilds`; a stall the job got over is appended to `stalls`); the sink forgets the rows of
    items left half done, so rows stay exactly once. The cluster is checked every few seconds to still hold the
    labeler pool (pipeline.recovery.cluster_check)."""
    settings = config.decode_settings(info["image_size"], config.frames or info["default_frames"], info["pinpoints"])
    tokens = rows_seen = errors = 0
    dataset = None
    owned = connect_ray(config.address, config.verbose)
    progress = Progress(n_items, config.progress_seconds)
    ticker = None
    try:
        ticker = Ticker(progress, f"lavi-rows-{job_id}-{uuid.uuid4().hex[:8]}")
        check_resources(config)
        while True:
            try:
                # config.model, not the resolved default: None lets each actor find the bundled model on its node
                dataset = build_dataset(shards, config, settings, config.model, job_id, ticker.name,
                                        sink.done_groups())
                for batch in stream(dataset, config.stall_timeout, check=cluster_check(config), stalls=stalls):
                    sink.add(batch)
                    rows_seen += batch.num_rows
                    tokens += sum(t or 0 for t in batch.column("num_generated_tokens").to_pylist())
                    errors += batch.column("status").to_pylist().count(ERROR)
                    progress.update(sink.items_written, rows_seen, errors)
                break
            except Exception as err:  # noqa: BLE001 - only a lost node, actor or object is retried
                lost = lost_cluster_part(err)
                if lost is None or len(rebuilds) >= config.max_rebuilds:
                    raise
                dataset = None
                gc.collect()
                redone = sink.drop_partial()
                shards, left = remaining_shards(shards, output.fs, output.listing + f"/rebuild-{len(rebuilds) + 1}",
                                                frozenset(sink.finished))
                rebuilds.append({"error": lost, "items_left": left, "partial_items_redone": redone,
                                 "items_done": sink.items_written})
                log.warning("the pipeline lost part of the cluster (%s): rebuilding it over the %d items not done "
                            "(%d of them half labelled, redone whole); rebuild %d of at most %d", lost, left, redone,
                            len(rebuilds), config.max_rebuilds)
                if not left:
                    break
                cluster_check(config)()  # what is left must still hold the pool, or the rebuild would wait forever
        sink.close()
        ticker, last = None, ticker
        last.stop()  # its last count is in the end's line
        progress.update(sink.items_written, rows_seen, errors, force=True)
        if sink.items_written != n_items:  # every listed item yields its rows, error rows included
            raise RuntimeError(f"{n_items} items were listed but {sink.items_written} came out of the pipeline; "
                               "the finished ones are committed: rerun into the same --out to label the rest")
    finally:
        if ticker is not None:
            ticker.stop()
        progress.close()
        # the dataset (and the pyarrow readers it holds) goes while Ray and Arrow's thread pools are up,
        # not in the interpreter's teardown, where Arrow can abort (apache/arrow#39862)
        del dataset
        gc.collect()
        if owned:
            import ray

            ray.shutdown()
    return tokens


def _default_model() -> str:
    from lavi.bundled import DEFAULT_MODEL

    return DEFAULT_MODEL
