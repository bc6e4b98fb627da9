"""The Ray Data graph of one labeling run (the only place that builds one; pipeline.driver runs it).

    from_items([one reader])
      -> map_batches(read_listing)   one long-lived task: the listing's shards as the driver writes them, their items
                                     out a block (workers.settings.READER_BLOCK_BYTES, its own) at a time, cut into
                                     blocks of a split batch (workers.shards)
      -> map_batches(split_batch)    CPU tasks: images together, a video probed and cut into clip groups; out in
                                     blocks of one decode task each (workers.split)
      -> map_batches(decode_units)   CPU tasks: a split batch's images, or one clip group (workers.units)
      -> map_batches(Labeler)        actor pool: one engine per actor (GPU, or a CPU fraction) (workers.labeler)
      -> map_batches(commit_block)   CPU tasks: a labeler block's whole units -> part files; out, small commit
                                     records, and the rows of units cut between blocks (workers.commit)

Every operator asks for its resources explicitly, each under what a 1-CPU node beside a 0.5-CPU labeler has left,
so that whatever part of a cluster survives can run every stage: READ_CPUS for the reader (it mostly waits),
DECODE_CPUS for split and decode, COMMIT_CPUS for commits. A block's rows are set by a streaming repartition fused
into the operator before it (`_shaped`); a repartition of its own would be a separate operator asking for a whole
CPU (its remote arguments are Ray Data's defaults), which a 1-CPU node with a labeler never has.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

from pipeline.cluster import quiet_ray_data
from pipeline.config import COMMIT_CPUS, DECODE_CPUS, READ_CPUS, RunConfig
from workers.commit import CommitSpec, commit_block
from workers.labeler import Labeler, LabelerSpec, StreamingLabeler
from workers import settings as settings_module
from workers.settings import DecodeSettings
from workers.shards import SOURCE, read_listing
from workers.split import split_batch
from workers.units import decode_units

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphSpec:
    """One graph's inputs: the run's config, the decode settings of the model's input contract, the labelers' spec,
    the commits', and the listing directory with what a rebuilt graph leaves out (workers.shards.read_listing)."""

    config: RunConfig
    settings: DecodeSettings
    labeler: LabelerSpec
    commit: CommitSpec
    listing: str
    skip: frozenset[int] = frozenset()
    state: tuple[tuple[int, dict], ...] = ()  # (seq, {"done": [...], "groups": {...}}) of the shards in flight
    labeler_class: type | None = None  # None: the run's (in-flight or static); bench.fixed_labeler's for the bench

    @property
    def labelers(self) -> type:
        if self.labeler_class is not None:
            return self.labeler_class
        return StreamingLabeler if self.config.inflight else Labeler


def build_dataset(spec: GraphSpec):
    """The lazy Ray Data dataset of the run's commit records (schemas.clips.COMMIT_SCHEMA)."""
    import ray.data

    config = spec.config
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows its own progress
    ctx.target_max_block_size = settings_module.BLOCK_BYTES  # what a clip group is sized by
    _plan_rules()
    quiet_ray_data(config.verbose)
    ds = ray.data.from_items([{SOURCE: 0}])
    ds = ds.map_batches(read_listing, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
                        fn_kwargs={"listing": spec.listing, "storage_options": config.storage, "skip": spec.skip,
                                   "state": dict(spec.state)})
    ds = _shaped(ds, config.decode_batch_size, READ_CPUS)
    ds = ds.map_batches(split_batch, batch_size=config.decode_batch_size, batch_format="pyarrow",
                        fn_kwargs={"settings": spec.settings}, num_cpus=DECODE_CPUS)
    ds = _shaped(ds, 1, DECODE_CPUS)  # a decode task per block: a long video's groups decode in parallel
    pool = ray.data.TaskPoolStrategy(size=config.decode_workers) if config.decode_workers else None
    # max_calls=0 (no limit, Ray's default for tasks) keeps the decode stage its own tasks: Ray Data fuses a map into
    # the one before it when their remote arguments are equal (split, or CPU labelers asking DECODE_CPUS)
    ds = ds.map_batches(decode_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"settings": spec.settings},
                        num_cpus=DECODE_CPUS, compute=pool, max_calls=0)
    gpu = config.gpus_per_worker > 0
    # in-flight: an async labeler whose calls for two blocks overlap, so the next block's requests take the rows
    # the current one frees (workers.labeler.StreamingLabeler)
    ds = ds.map_batches(
        spec.labelers, batch_size=config.block_rows, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.workers, max_concurrent_calls_per_actor=2 if spec.labelers is
                                           StreamingLabeler else None),
        num_gpus=config.gpus_per_worker if gpu else None, num_cpus=None if gpu else config.cpus_per_worker,
        fn_constructor_kwargs={"spec": spec.labeler})
    return ds.map_batches(commit_block, batch_size=None, batch_format="pyarrow", fn_kwargs={"spec": spec.commit},
                          num_cpus=COMMIT_CPUS)


def _shaped(ds, rows: int, num_cpus: float):
    """`ds` with its last operator's output cut into blocks of `rows` rows: a streaming repartition, given that
    operator's resources so that Ray Data fuses the two (it fuses a map and the repartition after it only when
    their remote arguments are equal; the repartition's are Ray Data's defaults, a whole CPU, otherwise)."""
    ds = ds.repartition(target_num_rows_per_block=rows)
    op = ds._logical_plan.dag  # Ray Data's StreamingRepartition (2.5x): a dataclass with its tasks' remote args
    if hasattr(op, "ray_remote_args"):
        object.__setattr__(op, "ray_remote_args", {"num_cpus": num_cpus})
    return ds


READER_OP = f"MapBatches({read_listing.__name__})"
STATS_BLOCKS = 256  # the BlockStats each of Ray Data's map operators keeps (BoundedStats)


def _plan_rules() -> None:
    """Two physical-plan rules: the listing reader's operator gets its own output block size
    (workers.settings.READER_BLOCK_BYTES), and no operator keeps per-block stats without bound (BoundedStats).

    Ray Data holds a task's output until it passes the context's block size (BLOCK_BYTES, 128 MiB) or the task ends;
    the reader is one task for the whole run, so it would pass items on half a million at a time, all of them in flight
    as blocks the driver keeps track of, and the driver's memory would grow with the corpus. Ray Data has no public
    per-operator block size: a physical-plan rule (its optimizer's DeveloperAPI ruleset), run before operators are
    fused, sets it on the reader's transform alone (a block size on the operator itself would pass up to nothing and
    clash, once fused, with the row count of the repartition after it)."""
    from ray.data._internal.logical.interfaces import Rule
    from ray.data._internal.logical.optimizers import get_physical_ruleset
    from ray.data._internal.logical.rules import FuseOperators

    class ReaderBlocks(Rule):
        @classmethod
        def dependents(cls):
            return [FuseOperators]

        def apply(self, plan):
            for op in _operators(plan.dag):
                if op.name == READER_OP:
                    for fn in op._map_transformer.get_transform_fns():
                        fn.override_target_max_block_size(settings_module.READER_BLOCK_BYTES)
            return plan

    class BoundedStats(Rule):
        """Ray Data's map operators keep a BlockStats of every block they ever passed on (for `Dataset.stats()`, which
        only --verbose asks for): about 2 KB a block in the driver, 14,000 blocks at a million items. Each
        operator keeps its last STATS_BLOCKS instead (a deque: the list's extend, iteration and len), so the driver's
        memory does not grow with the corpus (--verbose's stats then cover those blocks). After fusion: a fused
        operator is a new one."""

        @classmethod
        def dependencies(cls):
            return [FuseOperators]

        def apply(self, plan):
            for op in _operators(plan.dag):
                if isinstance(getattr(op, "_output_blocks_stats", None), list):
                    op._output_blocks_stats = collections.deque(op._output_blocks_stats, maxlen=STATS_BLOCKS)
            return plan

    rules = get_physical_ruleset()
    for rule in (ReaderBlocks, BoundedStats):
        if not any(r.__name__ == rule.__name__ for r in rules):  # once a process
            rules.add(rule)


def _operators(dag) -> list:
    """Every operator of a plan, from its last one up."""
    ops, seen, out = [dag], set(), []
    while ops:
        op = ops.pop()
        if id(op) not in seen:
            seen.add(id(op))
            out.append(op)
            ops.extend(op.input_dependencies)
    return out
