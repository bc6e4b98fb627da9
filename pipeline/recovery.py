"""What the driver does when the cluster fails it: a lost node, actor or object (`lost_cluster_part`: the graph
is rebuilt, pipeline.driver), a pipeline that stops producing rows (`stream`'s watchdog: `PipelineStalled`) and a
cluster that shrank below what the job needs (`stream`'s periodic check: `ClusterTooSmall`)."""
from __future__ import annotations

import logging
import time

from pipeline.config import STAGE_CPUS, RunConfig

log = logging.getLogger(__name__)


class PipelineStalled(RuntimeError):
    """No row reached the driver for two stall periods; the message says what the cluster has and what waits."""


def describe_cluster() -> str:
    """What a stalled pipeline waits on: the cluster's resources, what is free, and (where Ray's autoscaler state
    answers) the resource demands no node can meet."""
    import ray

    parts = [f"cluster {_resources(ray.cluster_resources())}", f"free {_resources(ray.available_resources())}"]
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        pending = [f"{b.count} x {_resources(b.bundle)}" for d in status.resource_demands.ray_task_actor_demand
                   for b in d.bundles_by_count]
        if pending:
            parts.append("pending demands " + "; ".join(pending))
    except Exception as err:  # noqa: BLE001 - best effort: the autoscaler's state API differs across Ray versions
        log.debug("no autoscaler state: %s", err)
    return ", ".join(parts)


def _resources(r: dict) -> str:
    keep = {k: v for k, v in r.items() if not k.startswith("node:") and k not in ("object_store_memory", "memory")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"


class ClusterTooSmall(PipelineStalled):
    """The cluster shrank under a running job until what is left cannot hold the labeler pool (it would wait for
    resources no node has); the message names what the pool needs and what the cluster has."""


def check_resources(config: RunConfig) -> None:
    """Refuse an actor pool the cluster cannot hold next to the read/decode tasks (it would hang): too few GPUs or
    CPUs in all, or no alive node with what one replica asks for. Called at the start, before a rebuild, and every
    few seconds while rows stream (a node lost under the job: `stream`'s check)."""
    import ray

    have = ray.cluster_resources()
    gpu = config.gpus_per_worker > 0
    kind, per = ("GPU", config.gpus_per_worker) if gpu else ("CPU", config.cpus_per_worker)
    biggest = max((n["Resources"].get(kind, 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if biggest < per:
        flag = "--gpus-per-worker" if gpu else "--cpus-per-worker"
        raise ValueError(f"a labeler replica asks for {per:g} {kind}s ({flag}); the largest alive node has "
                         f"{biggest:g}: lower {flag}, or add a node that has them")
    if gpu:
        need, total = config.workers * config.gpus_per_worker, have.get("GPU", 0)
        if need > total:
            raise ValueError(f"--workers {config.workers} x --gpus-per-worker {config.gpus_per_worker} needs {need} "
                             f"GPUs; the cluster has {total}: lower them, or use --gpus-per-worker 0 for CPU")
    else:
        need, total = config.workers * config.cpus_per_worker, have.get("CPU", 0)
        if need > total - STAGE_CPUS:
            raise ValueError(f"--workers {config.workers} CPU actors need {need:g} CPUs and the read, decode and "
                             f"commit tasks {STAGE_CPUS:g} more; the cluster has {total:g}: lower --workers")


def cluster_check(config: RunConfig):
    """`stream`'s periodic check: check_resources, raising ClusterTooSmall (with what the cluster has and waits on)
    once what is left of the cluster cannot hold the pool."""
    def check() -> None:
        try:
            check_resources(config)
        except ValueError as err:
            raise ClusterTooSmall(f"the cluster shrank under the job: {err} ({describe_cluster()}); every "
                                  "committed item is kept: add resources and rerun into the same --out to label the "
                                  "rest") from None

    return check


def stream(dataset, stall_s: float, describe=describe_cluster, check=None, check_s: float = 5.0,
           stalls: list[dict] | None = None, busy=None):
    """The dataset's output batches, pulled on a thread so that the driver notices a stall: after `stall_s` with no
    batch and no labeler at work it logs what the cluster has and waits on (and appends {"after_s", "cluster"} to
    `stalls`); after a second such period it raises PipelineStalled. 0: wait forever. `busy()`, when given, says
    whether a labeler is computing right now (its heartbeat: workers.progress): a batch that takes minutes (a large
    model's prefill, a first compile) is work, not a stall. `check`, called every `check_s` seconds whether rows
    come or not, raises when the cluster changed so that the job cannot go on (ClusterTooSmall): a node lost under
    it is noticed within seconds, not at the next stall. Errors of the dataset are raised here."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=4)

    def pump() -> None:
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                q.put(("batch", batch))
            q.put(("end", None))
        except BaseException as err:  # noqa: BLE001 - handed to the driver's thread
            q.put(("error", err))

    threading.Thread(target=pump, name="lavi-pipeline-pump", daemon=True).start()
    warned = False
    last_row = last_check = time.monotonic()
    waits = [w for w in (stall_s, check_s if check is not None else 0) if w > 0]
    while True:
        try:
            kind, value = q.get(timeout=min(waits) if waits else None)
        except queue.Empty:
            kind = None
        now = time.monotonic()
        if check is not None and now - last_check >= check_s:
            check()
            last_check = now
        if kind is None and busy is not None and busy():
            last_row, warned = now, False  # a labeler computes: the pipeline is not waiting
            continue
        if kind is None:
            idle = now - last_row
            if not stall_s or idle < stall_s * (2 if warned else 1):
                continue
            what = describe()
            if not warned:
                log.warning("no rows for %.0f s: the pipeline may be stalled; %s", idle, what)
                if stalls is not None:
                    stalls.append({"after_s": round(idle, 1), "cluster": what})
                warned = True
                continue
            raise PipelineStalled(f"no rows for {2 * stall_s:.0f} s: the pipeline is stalled ({what}); every committed "
                                  "item is kept: free or add resources and rerun into the same --out to label the rest")
        last_row, warned = now, False
        if kind == "end":
            return
        if kind == "error":
            raise value
        yield value


# what a node, actor or object lost under a running pipeline raises (Ray's names: ray.exceptions)
LOST_ERRORS = ("NodeDiedError", "ActorDiedError", "ActorUnavailableError", "RayActorError", "ObjectLostError",
               "ObjectFetchTimedOutError", "OwnerDiedError", "ObjectReconstructionFailedError",
               "ObjectReconstructionFailedMaxAttemptsExceededError", "ObjectReconstructionFailedLineageEvictedError",
               "ReferenceCountingAssertionError", "WorkerCrashedError", "LocalRayletDiedError",
               # a streaming generator's task re-run after its node died that yielded otherwise than before (the
               # listing's reader, after complete shards' listing files were emptied): the graph is rebuilt
               "StreamingGeneratorReplayInconsistentError")


def lost_cluster_part(err: BaseException) -> str | None:
    """`Name: message` of the lost-node, -actor or -object error in err's chain (causes, Ray's wrapped causes), or
    None when the error is anything else."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if any(c.__name__ in LOST_ERRORS for c in type(e).__mro__):
            return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None
