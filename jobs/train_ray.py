"""`lavi-label train --workers N`: data-parallel training on Ray Train's TorchTrainer, with the same setup, loop and
summary as the in-process path (jobs.train, through jobs.train_run)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from jobs.train_run import prepare, progress, summarise


def _latest_checkpoint(storage: str, storage_options: dict | None = None):
    """The Ray Train checkpoint of the highest step under `storage` (any earlier session's run), or None."""
    from pipeline.storage import arrow_filesystem, filesystem

    fs, base = filesystem(storage, storage_options)
    best = None
    for marker in fs.glob(f"{base.rstrip('/')}/*/checkpoint_*/train_state.json"):
        step = json.loads(fs.cat_file(marker))["step"]
        if best is None or step > best[0]:
            best = (step, marker.rsplit("/", 1)[0])
    if best is None:
        return None
    import ray.train

    return ray.train.Checkpoint(best[1], filesystem=arrow_filesystem(fs))


def train_on_ray(o: dict, outp: Path, workers: int, gpus: float, address: str | None, storage: str | None) -> dict:
    """Data-parallel training on Ray Train's TorchTrainer (`lavi.training.train.DataParallel` over its process group: gloo on
    CPU, NCCL on GPU). Each worker reads its shard of every step's batch; rank 0's checkpoints are reported to Ray
    Train, which keeps them in `storage` (default `OUT/ray_train`, local or object storage); a worker lost
    mid-run restarts the group from the last of them (up to 3 times), a rerun continues from the latest one in
    `storage`. Rank 0's log records reach this driver as they happen (the progress lines, OUT/train_log.jsonl), and
    the final checkpoint is copied to OUT."""
    import threading

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import connect_ray

    storage = storage or str(outp.resolve() / "ray_train")
    owned = connect_ray(address)
    try:
        resume = None if o["no_resume"] else _latest_checkpoint(storage)
        sink = ray.remote(num_cpus=0)(LogSink).remote()
        trainer = TorchTrainer(
            _ray_worker, train_loop_config={"options": o, "sink": sink, "resume": resume},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                                   resources_per_worker={"GPU": gpus} if gpus > 0 else {"CPU": 1}),
            run_config=ray.train.RunConfig(storage_path=storage, name=f"lavi-train-{time.strftime('%Y%m%d-%H%M%S')}",
                                           failure_config=ray.train.FailureConfig(max_failures=3)))
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(fit=_fit(trainer)), daemon=True)
        t0 = time.time()
        thread.start()
        starts, on_log, last, data = [], None, {}, None
        while True:
            alive = thread.is_alive()
            for rec in ray.get(sink.take.remote()):
                if "start" in rec:  # the worker group started (again): the steps after its checkpoint are redone
                    starts.append(rec["start"])
                    on_log = progress(outp / "train_log.jsonl", rec["start"], o["steps"], t0)
                    if len(starts) > 1:
                        click.echo(f"a worker was lost: the run restarts from its checkpoint at step {rec['start']}")
                elif "data" in rec:
                    data = rec["data"]
                else:
                    last = rec
                    on_log(rec)
            if not alive:
                break
            time.sleep(0.5)
        fit = result.get("fit")
        if isinstance(fit, BaseException) or fit is None:
            raise click.ClickException(f"Ray Train failed: {fit}")
        if fit.checkpoint is None:
            raise click.ClickException("Ray Train finished without a checkpoint")
        fit.checkpoint.to_directory(str(outp))
    finally:
        if owned:
            ray.shutdown()
    return summarise(outp, o, last, starts[0] if starts else 0, time.time() - t0,
                     "cuda" if gpus > 0 else "cpu", data, workers=workers, restarts=starts[1:],
                     checkpoint_storage=storage)


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as err:  # noqa: BLE001 - handed to the driver's thread
        return err


def _ray_worker(config: dict) -> None:
    """One Ray Train worker: this rank's shard, the group's gradients averaged, rank 0 checkpointing."""
    import shutil
    import tempfile

    import ray.train

    from lavi.training.train import DataParallel

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local = Path(tempfile.mkdtemp(prefix=f"lavi-train-r{rank}-"))
    checkpoint = ray.train.get_checkpoint() or config["resume"]
    if checkpoint is not None:
        checkpoint.to_directory(str(local))
    o = dict(config["options"], no_resume=False)
    setup = prepare(o, local, rank, world)
    sink = config["sink"]
    start = json.loads((local / "train_state.json").read_text())["step"] if (local / "train_state.json").exists() else 0
    if rank == 0:
        ray.get(sink.put.remote({"start": start}))

    def on_checkpoint(step: int, last: dict) -> None:
        metrics = {"step": step, **{k: v for k, v in last.items() if isinstance(v, (int, float))}}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local)) if rank == 0 else None)

    def on_log(rec: dict) -> None:
        ray.get(sink.put.remote(rec))

    try:
        setup.run(local, resume=True, on_log=on_log if rank == 0 else None, parallel=DataParallel(on_checkpoint))
        if rank == 0:
            ray.get(sink.put.remote({"data": setup.source.summary()}))
    finally:  # what is kept is in Ray Train's storage
        shutil.rmtree(local, ignore_errors=True)


class LogSink:
    """Rank 0's log records, taken by the driver as they come (a Ray actor of no CPU)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def put(self, record: dict) -> None:
        self.records.append(record)

    def take(self) -> list[dict]:
        out, self.records = self.records, []
        return out
