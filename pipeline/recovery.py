"""What the driver does when the cluster fails it: a lost node, actor or object (`lost_cluster_part`: the graph
is rebuilt, pipeline.graph) and a pipeline that stops producing rows (`stream`'s watchdog: `PipelineStalled`)."""
from __future__ import annotations

import logging

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


def stream(dataset, stall_s: float, describe=describe_cluster):
    """The dataset's output batches, pulled on a thread so that the driver notices a stall: after `stall_s` with no
    batch it logs what the cluster has and waits on; after a second such period it raises PipelineStalled. 0: wait
    forever. Errors of the dataset are raised here."""
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
    while True:
        try:
            kind, value = q.get(timeout=stall_s or None)
        except queue.Empty:
            what = describe()
            if not warned:
                log.warning("no rows for %.0f s: the pipeline may be stalled; %s", stall_s, what)
                warned = True
                continue
            raise PipelineStalled(f"no rows for {2 * stall_s:.0f} s: the pipeline is stalled ({what}); every committed "
                                  "item is kept: free or add resources and rerun into the same --out to label the rest")
        warned = False
        if kind == "end":
            return
        if kind == "error":
            raise value
        yield value


# what a node, actor or object lost under a running pipeline raises (Ray's names: ray.exceptions)
LOST_ERRORS = ("NodeDiedError", "ActorDiedError", "ActorUnavailableError", "RayActorError", "ObjectLostError",
               "ObjectFetchTimedOutError", "OwnerDiedError", "ObjectReconstructionFailedError",
               "ObjectReconstructionFailedMaxAttemptsExceededError", "ObjectReconstructionFailedLineageEvictedError",
               "ReferenceCountingAssertionError", "WorkerCrashedError", "LocalRayletDiedError")


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
