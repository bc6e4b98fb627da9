"""Long videos through the whole pipeline: split into clip groups, labelled once, resumed a group at a time."""

from __future__ import annotations

import json

import media
import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig
from pipeline.graph import run
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
        """The run dies (as a killed driver would) after its first three labelled blocks."""

        def __init__(self, ds):
            self.ds = ds

        def iter_batches(self, **kwargs):
            for i, batch in enumerate(self.ds.iter_batches(**kwargs)):
                if i == 3:
                    raise KeyboardInterrupt
                yield batch

    out = tmp_path / "out"
    config = RunConfig(inputs=(str(path),), out=str(out), task="vqa", questions=Q, model=tiny_model,
                       max_new_tokens=2, batch_size=2, clip_seconds=1.0, clips_per_group=2, rows_per_file=1)
    monkeypatch.setattr(graph, "build_dataset", lambda *a, **k: Killed(real(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        run(config)
    monkeypatch.setattr(graph, "build_dataset", real)
    state = Output(str(out)).scan()
    [(item, done)] = state.done_groups.items()
    assert not state.done_items and 1 <= len(done) < 12 and state.rows == len(done) * 2 * len(Q)
    summary = run(config)
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len({r["row_id"] for r in rows}) == 24 * len(Q) == summary["rows"]
    assert summary["this_run"]["clip_groups_resumed"] == len(done) and summary["this_run"]["units"] == 12 - len(done)
    assert summary["this_run"]["rows"] == (24 - 2 * len(done)) * len(Q) and summary["items"] == 1
    assert Output(str(out)).scan().done_items == {item}


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
    and a long video by as many workers as there are labelers."""
    import fsspec

    from pipeline.graph import build_dataset, model_info
    from pipeline.sources import PromptSpec, iter_items, write_shards

    path, _ = long_video
    fs = fsspec.filesystem("file")
    shards, _ = write_shards(iter_items([str(path)], PromptSpec()), fs, str(tmp_path / "listing"))
    config = RunConfig(inputs=(str(path),), out=str(tmp_path / "out"), model=tiny_model, max_new_tokens=1,
                       clip_seconds=4.0)
    info = model_info(tiny_model)
    ds = build_dataset(shards, config, config.decode_settings(info["image_size"], info["default_frames"]),
                       tiny_model, "job").materialize()
    assert ds.count() == 6
    stats = ds.stats()
    assert "MapBatches(decode_units)" in stats and "MapBatches(decode_units)->MapBatches(Labeler)" not in stats
