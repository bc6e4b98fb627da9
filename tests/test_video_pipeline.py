"""Long videos through the whole pipeline: split into clip groups, labelled once, resumed a group at a time."""

from __future__ import annotations

import json

import media
import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig
from pipeline.driver import run
from pipeline.output import GROUPS_KEY, Output

pytestmark = pytest.mark.timeout(300)
Q = ("what is it?", "is it moving?")


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """24 s at 4 fps, a keyframe every 2 s, 100 kB/s of audio padding (2.4 MB)."""
    path = tmp_path_factory.mktemp("videos") / "long.mp4"
    return path, media.long_mp4(path, 24, pad_bytes_per_s=100_000)


def test_a_long_video_is_labelled_once_a_group_at_a_time(ray_local, tiny_model, long_video, tmp_path):
    """Guards against a video's clip groups losing, duplicating or mislabelling clips on their way through separate
    tasks, a part file that does not record its groups, and a summary that reads the video more than about once."""
    path, size = long_video
    out = tmp_path / "out"
    summary = run(RunConfig(inputs=(str(path),), out=str(out), task="vqa", questions=Q, model=tiny_model,
                            max_new_tokens=2, batch_size=8, clip_seconds=2.0, clips_per_group=3, rows_per_file=6,
                            decode_workers=2))
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == summary["rows"] == 12 * len(Q) and summary["clips"] == 12 and summary["items"] == 1
    assert len({r["row_id"] for r in rows}) == len(rows) and {r["status"] for r in rows} <= {"ok", "truncated"}
    assert sorted({(r["clip_index"], r["clip_start_s"], r["clip_end_s"]) for r in rows}) == [
        (k, 2.0 * k, 2.0 * k + 2) for k in range(12)]
    held = [json.loads(pq.read_schema(p).metadata[GROUPS_KEY]) for p in sorted(out.glob("part-*.parquet"))]
    assert sorted(g for h in held for g in h[rows[0]["item_id"]]["groups"]) == [0, 1, 2, 3]
    assert summary["this_run"]["units"] == 4 and 0.9 * size < summary["this_run"]["bytes_read"] < 1.3 * size


def test_a_video_killed_half_done_resumes_with_its_other_groups(ray_local, tiny_model, long_video, tmp_path,
                                                               monkeypatch):
    """Guards against the whole item being the unit of commit (a half-done 2-hour video labelled again from its
    first clip) and against a resume that duplicates or drops a clip's rows: the rerun labels exactly the groups
    that were not committed, and the output ends with every row once."""
    import pipeline.graph as graph

    path, _ = long_video
    real = graph.build_dataset

    class Killed:
        """The driver dies (as a killed one would) when the first commit record reaches it, before it keeps any."""

        def __init__(self, ds):
            self.ds = ds

        def iter_batches(self, **kwargs):
            for _ in self.ds.iter_batches(**kwargs):
                raise KeyboardInterrupt

    out = tmp_path / "out"
    config = RunConfig(inputs=(str(path),), out=str(out), task="vqa", questions=Q, model=tiny_model,
                       max_new_tokens=2, batch_size=2, clip_seconds=1.0, clips_per_group=2, rows_per_file=1)
    monkeypatch.setattr(graph, "build_dataset", lambda spec: Killed(real(spec)))
    with pytest.raises(KeyboardInterrupt):
        run(config)
    monkeypatch.setattr(graph, "build_dataset", real)
    # the cluster commits on its own: how many groups it wrote before the graph went depends on timing, so the
    # groups after the first half of those written are taken as not committed (their files removed)
    parts = _settled_parts(out)
    held = {p: json.loads(pq.read_schema(p).metadata[GROUPS_KEY]) for p in parts}
    [item] = {i for h in held.values() for i in h}
    order = sorted(parts, key=lambda p: min(held[p][item]["groups"]))
    for p in order[max(1, len(order) // 2):]:
        p.unlink()
    state = Output(str(out)).scan()
    assert list(state.done_groups) == [item] and not state.done_items
    done = state.done_groups[item]
    assert 1 <= len(done) < 12 and state.rows == len(done) * 2 * len(Q)
    summary = run(config)
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len({r["row_id"] for r in rows}) == 24 * len(Q) == summary["rows"]
    assert summary["this_run"]["clip_groups_resumed"] == len(done) and summary["this_run"]["units"] == 12 - len(done)
    assert summary["this_run"]["rows"] == (24 - 2 * len(done)) * len(Q) and summary["items"] == 1
    assert Output(str(out)).scan().done_items == {item}


def _settled_parts(out, quiet_s: float = 3.0, limit_s: float = 60.0) -> list:
    """The part files once none has come for `quiet_s` (commit tasks in flight finish after their driver went)."""
    import time

    seen, since, end = None, time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < end:
        now = sorted(out.glob("part-*.parquet"))
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
        time.sleep(0.5)
    raise AssertionError(f"part files still coming after {limit_s} s")


def test_shots_through_the_pipeline(ray_local, tiny_model, tmp_path):
    """Guards against --clips shots losing its boundaries on the way to the rows, or its rows not matching its
    clips (a window's clip count is only known in its decode task)."""
    cuts = [2.3, 5.0, 7.7, 11.2]
    media.scenes_mp4(tmp_path / "scenes.mp4", cuts, 14.0)
    out = tmp_path / "out"
    summary = run(RunConfig(inputs=(str(tmp_path / "scenes.mp4"),), out=str(out), task="vqa", questions=Q,
                            model=tiny_model, max_new_tokens=2, clips="shots", min_clip_seconds=1.0))
    rows = pq.read_table(out).to_pylist()
    spans = sorted({(r["clip_index"], r["clip_start_s"], r["clip_end_s"]) for r in rows})
    assert len(rows) == summary["rows"] == len(spans) * len(Q) == 5 * len(Q)
    assert all(abs(a - c) <= 0.1 + 1e-6 for (_, a, _), c in zip(spans[1:], cuts))
    assert summary["generation"]["clips"] == "shots"


def test_decode_tasks_are_not_fused_into_the_labelers(ray_local, tiny_model, long_video, tmp_path):
    """Guards against Ray Data fusing the decode tasks into the labeler actors (it does when their remote arguments
    are equal, as with CPU labelers): every clip group would then be decoded inside a labeler, between its batches,
    and a long video by as many workers as there are labelers; and against a block-shaping repartition running as
    an operator of its own, whose tasks ask for a whole CPU (Ray Data's default), which a 1-CPU node beside a
    labeler never has (a shrinking cluster then stalls)."""
    from pipeline.graph import GraphSpec, build_dataset
    from pipeline.ledger import Ledger
    from pipeline.listing import Lister
    from pipeline.models import model_info
    from pipeline.resume import Resume
    from workers.commit import CommitSpec
    from workers.labeler import LabelerSpec

    path, _ = long_video
    config = RunConfig(inputs=(str(path),), out=str(tmp_path / "out"), model=tiny_model, max_new_tokens=1,
                       clip_seconds=4.0)
    output = Output(config.out)
    lister = Lister(config, output, Resume.scan(output), Ledger(output)).start()
    lister.join()
    info = model_info(tiny_model)
    spec = GraphSpec(config, config.decode_settings(info["image_size"], info["default_frames"]),
                     LabelerSpec(tiny_model, "job", {"max_new_tokens": 1}), CommitSpec(out=config.out),
                     output.uri_of(output.listing))
    ds = build_dataset(spec).materialize()
    records = [json.loads(r) for r in ds.to_pandas()["record"] if r]
    assert sum(r["totals"]["rows"] for r in records) == 6
    stats = ds.stats()
    assert "MapBatches(decode_units)" in stats and "MapBatches(decode_units)->MapBatches(Labeler)" not in stats
    assert "MapBatches(read_listing)->StreamingRepartition" in stats
    assert "MapBatches(split_batch)->StreamingRepartition" in stats
    assert "Operator 2 StreamingRepartition" not in stats and "] StreamingRepartition" not in stats
