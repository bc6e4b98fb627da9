"""How many torch threads a CPU labeler computes on: its share of its node's cores (workers.labeler)."""
from __future__ import annotations


BIG_MODEL = 100_000_000  # weights: a model whose ops are large enough to gain from every core of its share


def cpu_threads(node_cpus: float, workers: int, cpus_per_worker: float, weights: int) -> int:
    """torch threads of a CPU labeler. Ray sets OMP_NUM_THREADS to a worker's whole CPUs (1 under one), so a
    0.5-CPU labeler would compute on one core of an idle node (seen: a 0.5B model at 99.5% of one core of two, for
    minutes). Its share: the node's CPUs over the labelers that fit on it. A large model takes all of it (its
    matmuls are long; the decode tasks, Ray and the driver beside it cost it little); a small one leaves a core to
    them: its ops last microseconds, and OpenMP's threads wait at every op for the one the OS took away (on two
    cores, tiny-shapes labelled 38 rows/s with two threads beside the pipeline and 62 with one). weights: the model's
    (lavi.serving.cpu_pack.weight_count: packed ones too)."""
    share = cpu_share(node_cpus, workers, cpus_per_worker)
    return share if weights >= BIG_MODEL else max(1, share - 1)


def cpu_share(node_cpus: float, workers: int, cpus_per_worker: float) -> int:
    """A CPU labeler's share of its node's cores: the node's CPUs over the labelers that fit on it (what it loads its
    model on, and what `cpu_threads` gives a large model)."""
    on_node = max(1, min(workers, int(node_cpus // cpus_per_worker) if cpus_per_worker > 0 else workers))
    return max(1, int(node_cpus // on_node))


def node_cpus() -> float:
    """This Ray node's CPUs (as Ray counts them: what the node was started with), else the machine's (outside Ray:
    a labeler made in a plain process, where asking Ray's runtime context would start a Ray of its own)."""
    import sys

    machine = machine_cpus()
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return machine
    try:
        here = ray.get_runtime_context().get_node_id()
        return next(n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == here)
    except Exception:  # noqa: BLE001 - a node Ray no longer lists: the machine
        return machine


def machine_cpus() -> float:
    """The CPUs this process may run on."""
    import os

    return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
