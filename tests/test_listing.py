"""The driver's bookkeeping without Ray: the streamed listing (pipeline.listing), its reader (workers.shards), the
ledger of shards (pipeline.ledger), resume per shard (pipeline.resume) and the bounded de-duplication
(pipeline.seen)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig
from pipeline.ledger import Ledger
from pipeline.listing import Lister
from pipeline.output import Output
from pipeline.resume import CONFLICT, Resume
from pipeline.seen import FileRun, Seen, merged
from schemas.clips import BYTES_READ, GROUP, GROUPS, ITEM_ROWS, READ_RETRIES
from schemas.manifest import DONE_GROUPS, SHARD
from schemas.rows import table_from_rows
from workers.commit import CommitSpec, commit_rows
from workers.shards import read_listing

pytestmark = pytest.mark.timeout(120)


def _images(root, n: int, start: int = 0) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (root / f"{i:04d}.png").write_bytes(b"x")


def _listed(config: RunConfig, output: Output, shard_size: int = 3) -> tuple[Lister, Ledger, list[dict]]:
    """A listing run to its end, with its items as the pipeline's reader gets them."""
    resume = Resume.scan(output)
    output.clear_scratch()
    ledger = Ledger(output, resume.complete_totals())
    lister = Lister(config, output, resume, ledger, shard_size=shard_size)
    ledger.on_complete = lister.empty
    lister.start()
    items = [r for t in read_listing(pa.table({"reader": [0]}), output.uri_of(output.listing), poll_s=0.01)
             for r in t.to_pylist()]
    lister.join()
    assert lister.error is None, lister.error
    return lister, ledger, items


def _label(items: list[dict], output: Output, ledger: Ledger) -> None:
    """Commit one ok row per item (as the commit stage would) and tell the ledger."""
    rows = [{"row_id": i["item_id"] + "r", "item_id": i["item_id"], "uri": i["uri"], "media_type": "image",
             "clip_index": None, "clip_start_s": None, "clip_end_s": None, "frame_timestamps_s": None, "width": 1,
             "height": 1, "task": "caption", "prompt": "p", "text": "t", "status": "ok", "error_stage": None,
             "error": None, "num_prompt_tokens": 1, "num_generated_tokens": 1, "model": "m", "job_id": "j",
             "created_at": None} for i in items]
    import datetime as dt

    for r in rows:
        r["created_at"] = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    n = len(rows)
    table = table_from_rows(rows).append_column(ITEM_ROWS, pa.array([1] * n, pa.int32())).append_column(
        GROUP, pa.array([None] * n, pa.int32())).append_column(GROUPS, pa.array([None] * n, pa.int32())).append_column(
        BYTES_READ, pa.array([0] * n, pa.int64())).append_column(READ_RETRIES, pa.array([0] * n, pa.int32())).append_column(
        SHARD, pa.array([i[SHARD] for i in items], pa.string()))
    records, rest = commit_rows(table, CommitSpec(out=output.uri_of(output.base), rows_per_file=2))
    assert rest.num_rows == 0
    for r in records:
        ledger.commit(r)


def test_the_listing_streams_shards_that_the_reader_follows(tmp_path):
    """Guards against a listing that must finish before any item is labelled (a 100M-item prefix listed for half an
    hour first), against a reader that misses or repeats a shard while they are still being written, and against
    items that do not say their shard (their rows would be committed where a resume never looks)."""
    _images(tmp_path / "in", 7)
    output = Output(str(tmp_path / "out"))
    config = RunConfig(inputs=(str(tmp_path / "in"),), out=output.uri)
    lister, ledger, items = _listed(config, output)
    assert [i["uri"].rsplit("/", 1)[1] for i in items] == [f"{i:04d}.png" for i in range(7)]
    assert [i[SHARD][:6] for i in items] == ["000000"] * 3 + ["000001"] * 3 + ["000002"]
    assert json.loads((tmp_path / "out" / "_listing" / "_done.json").read_text()) == {"shards": 3}
    assert ledger.to_label == 7 and ledger.written == 3 and lister.stats["listed"] == 7 and not ledger.complete()
    _label(items, output, ledger)
    assert ledger.complete() and ledger.shards == {} and ledger.run["items"] == 7 and ledger.totals["rows"] == 7
    assert sorted(p.name for p in (tmp_path / "out" / "_shards").iterdir()) == ["000000.json", "000001.json",
                                                                                "000002.json"]
    assert pq.read_table(tmp_path / "out" / "_listing" / "shard-000000.parquet").num_rows == 0  # emptied


def test_a_resume_decides_per_shard(tmp_path, monkeypatch):
    """Guards against a resume that reads every committed row to learn what is done (2M items: +309 MB and
    seconds before the first item), that labels a finished item again, or that skips an unfinished one: a
    complete shard is skipped without reading any of its files, a shard in flight reads only its own."""
    _images(tmp_path / "in", 8)
    output = Output(str(tmp_path / "out"))
    config = RunConfig(inputs=(str(tmp_path / "in"),), out=output.uri)
    _, ledger, items = _listed(config, output)
    _label(items[:4], output, ledger)  # shard 0 complete, shard 1 in flight (one item of three)
    assert sorted(ledger.shards) == [1, 2]
    read = []
    real = __import__("pipeline.resume", fromlist=["read_committed"]).read_committed
    monkeypatch.setattr("pipeline.listing.read_committed", lambda o, pos, key: read.append(pos) or real(o, pos, key))
    lister, ledger, again = _listed(config, output)
    assert read == [1] and lister.stats["skipped"] == 4 and lister.index is None
    assert [i["uri"] for i in again] == [i["uri"] for i in items[4:]]
    _label(again, output, ledger)
    assert ledger.complete() and ledger.totals["rows"] == 8 and ledger.totals["items"] == 8
    assert pq.read_table(tmp_path / "out").num_rows == 8
    _, ledger, none = _listed(config, output)
    assert none == [] and ledger.to_label == 0 and ledger.complete() and ledger.totals["items"] == 8


def test_inputs_that_list_otherwise_are_resumed_through_an_index(tmp_path):
    """Guards against duplicated rows when a resumed run's inputs changed (files added before the ones done): the
    shards move, a shard's key no longer matches its traces, and the listing then asks an index of every committed
    item instead of trusting positions; the run's totals are then counted from the files."""
    _images(tmp_path / "in", 6, start=10)
    output = Output(str(tmp_path / "out"))
    config = RunConfig(inputs=(str(tmp_path / "in"),), out=output.uri)
    _, ledger, items = _listed(config, output)
    _label(items[:4], output, ledger)
    _images(tmp_path / "in", 2, start=0)  # sorted before the others: every shard shifts
    assert Resume.scan(output).decide(0, "00000000") == CONFLICT
    lister, ledger, again = _listed(config, output)
    assert lister.index is not None and lister.recount
    assert sorted(i["uri"].rsplit("/", 1)[1] for i in again) == ["0000.png", "0001.png", "0014.png", "0015.png"]


def test_a_video_half_done_keeps_its_committed_groups(tmp_path):
    """Guards against a resumed video labelled again from its first clip group: the listing gives the split stage
    the groups that its shard's files hold (DONE_GROUPS), and the ledger finishes the video with the rest."""
    from test_pipeline_sink import _rows

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "v.mp4").write_bytes(b"x")
    output = Output(str(tmp_path / "out"))
    config = RunConfig(inputs=(str(tmp_path / "in"),), out=output.uri)
    _, ledger, [item] = _listed(config, output)
    spec = CommitSpec(out=output.uri_of(output.base))
    uri = item["uri"]
    [record], _ = commit_rows(_rows(uri, 2, ["q?"], group=(1, 3), shard=item[SHARD], first_clip=2), spec)
    ledger.commit(record)
    assert not ledger.complete()
    _, ledger, [again] = _listed(config, output)
    assert again[DONE_GROUPS] == [1] and ledger.resumed_groups == 1
    for g in (0, 2):
        [record], _ = commit_rows(_rows(uri, 2, ["q?"], group=(g, 3), shard=item[SHARD], first_clip=2 * g), spec)
        ledger.commit(record)
    assert ledger.complete() and ledger.totals["items"] == 1 and ledger.totals["clips"] == 6


def test_seen_is_exact_and_spills(tmp_path):
    """Guards against the listing's de-duplication dropping a new uri or passing a repeated one, and against it
    holding every uri in memory: fingerprints in sorted runs, the large ones on disk."""
    seen = Seen(spill_entries=1000, spill_dir=str(tmp_path))
    rng = np.random.default_rng(0)
    values = rng.integers(0, 20_000, size=60_000).astype(np.uint64)
    known: set[int] = set()
    for i in range(0, len(values), 777):
        batch = values[i:i + 777]
        want = []
        for v in batch.tolist():
            want.append(v not in known)
            known.add(v)
        assert seen.add(batch).tolist() == want
    assert len(seen) == len(known) and any(isinstance(r, FileRun) for r in seen.runs)
    assert len(seen.runs) <= 12
    seen.close()
    assert not list(tmp_path.iterdir())


def test_seen_holds_no_more_memory_for_a_larger_corpus():
    """Guards against the de-duplication's memory growing with the corpus (8 bytes a uri held, and a merge of two
    large runs concatenating both in memory: +22 MB of the driver's peak at 1M uris, +230 MB at 10M): the peak
    of what Python and numpy allocate is about the same at 100k and 800k fingerprints (a merge chunk), a few MB."""
    import tracemalloc

    rng = np.random.default_rng(1)
    peaks = []
    for n in (100_000, 800_000):
        seen = Seen(spill_entries=1 << 14)
        tracemalloc.start()
        try:
            for _ in range(0, n, 4096):
                seen.add(rng.integers(0, 2**63, 4096, dtype=np.uint64))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert len(seen) >= n and sum(isinstance(r, FileRun) for r in seen.runs) >= 1
        seen.close()
    assert peaks[1] < 1.5 * peaks[0] and peaks[1] < 5 * 2**20, peaks  # the old runs in memory: 1.6 MB and 13 MB


def test_a_merge_of_sorted_runs_is_their_sorted_union():
    """The streaming merge, fed chunks of different sizes that end at different places, yields every entry once, in
    order (a chunk boundary mishandled drops or repeats entries, or writes one out of order)."""
    rng = np.random.default_rng(2)
    values = np.unique(rng.integers(0, 10**9, 20_000).astype(np.uint64))
    pick = rng.random(len(values)) < 0.3
    a, b = values[pick], values[~pick]

    def chunks(x: np.ndarray, sizes: list[int]):
        start = 0
        for n in sizes * len(x):
            if start >= len(x):
                return
            yield x[start:start + n]
            start += n

    out = np.concatenate(list(merged(chunks(a, [7, 500, 33]), chunks(b, [1000, 3]))))
    assert np.array_equal(out, values)
    assert np.array_equal(np.concatenate(list(merged(chunks(a, [9]), iter([])))), a)


def test_the_reader_waits_for_shards_still_being_written(tmp_path):
    """Guards against a reader that ends before the listing does (items lost) or waits forever after it ends."""
    from pipeline.listing import Lister as _  # noqa: F401 - the writer of these files

    listing = tmp_path / "_listing"
    listing.mkdir()
    got: list[int] = []

    def read() -> None:
        for t in read_listing(pa.table({"reader": [0]}), str(listing), poll_s=0.01):
            got.extend(t.column("uri").to_pylist())

    thread = threading.Thread(target=read)
    thread.start()
    from schemas.manifest import ITEM_SCHEMA, make_item

    for seq in range(3):
        items = [make_item(f"/x/{seq}-{i}.png", [{"task": "caption", "prompt": None}]) for i in range(2)]
        pq.write_table(pa.Table.from_pylist(items, schema=ITEM_SCHEMA), listing / "tmp")
        (listing / "tmp").rename(listing / f"shard-{seq:06d}.parquet")  # moved into place whole, as the listing does
        deadline = time.monotonic() + 10
        while len(got) < 2 * (seq + 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert thread.is_alive() and len(got) == 2 * (seq + 1)
    (listing / "_done.json").write_text(json.dumps({"shards": 3}))
    thread.join(5)
    assert not thread.is_alive() and len(got) == 6


def test_the_listing_waits_for_room_by_bytes_and_never_below_what_a_labeler_gathers(tmp_path):
    """Guards against a listing that runs unboundedly ahead of the labelling (its scratch files and the items in
    flight grow with the corpus), and against one held back while the pipeline still waits for items to fill a block,
    a labeler's or the reader's (each would wait on the other forever)."""
    from pipeline.ledger import ShardState

    ledger, stop = Ledger(Output(str(tmp_path / "out"))), threading.Event()

    def waits(max_bytes: int, min_items: int) -> bool:
        done = threading.Thread(target=ledger.wait_room, args=(max_bytes, min_items, stop), daemon=True)
        done.start()
        done.join(0.3)
        return done.is_alive()

    for seq in range(3):
        ledger.listed(ShardState(pos=seq, key=f"k{seq}", items=4, to_label=4, seq=seq, bytes=1000))
    # the bound is max_bytes plus two of the largest shards (the reader may hold items of two shards besides a block)
    assert not waits(1001, 12)  # 3000 bytes ahead: under 1001 + 2 * 1000
    assert not waits(1000, 13)  # at the bound, but fewer items than a block gathers: listed on
    assert waits(1000, 12)
    stop.set()
