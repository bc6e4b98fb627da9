"""Long videos streamed: probe by range reads, clip groups decoded by seeking, shot boundaries, errors per group."""

from __future__ import annotations

import media
import numpy as np
import pyarrow as pa
import pytest

from schemas.clips import BYTES_READ, CLIPS, FAILED, GROUP, GROUPS, ITEM_ROWS, SHOTS, TASK_SCHEMA
from schemas.manifest import DONE_GROUPS, ITEM_SCHEMA, make_item
from workers.decode import DecodeSettings
from workers.probe import probe_uri
from workers.seek import decode_group
from workers.shots import shot_clips
from workers.split import split_batch, split_item, split_units
from workers.units import decode_batch, decode_units
from workers.video import decode_video, plan_clips

pytestmark = pytest.mark.timeout(120)
S = 32
PROMPTS = [{"task": "caption", "prompt": "describe the video."}]


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """60 s at 4 fps, a keyframe every 2 s, and 100 kB/s of interleaved audio noise: ~6 MB, index at the end."""
    path = tmp_path_factory.mktemp("v") / "padded.mp4"
    return path, media.long_mp4(path, 60, pad_bytes_per_s=100_000)


@pytest.fixture(scope="module")
def video10(tmp_path_factory):
    """10 s, 8 fps, 64x64; frame i has grey level 2*i (+- noise)."""
    path = tmp_path_factory.mktemp("v") / "ten.mp4"
    media.mp4(path, seconds=10, fps=8)
    return path


def _units(uri: str, settings: DecodeSettings, done: list[int] | None = None) -> list[dict]:
    item = {**make_item(uri, PROMPTS), DONE_GROUPS: done}
    return split_units(pa.Table.from_pylist([item], schema=ITEM_SCHEMA), settings)


def _tasks(units: list[dict]) -> pa.Table:
    """Each unit a decode task of its own (as the split stage sends a video's clip groups)."""
    return pa.Table.from_pylist([{"units": [u]} for u in units], schema=TASK_SCHEMA)


def test_probe_reads_the_header_not_the_file(padded):
    """Guards against a probe that reads the whole file (a 5 GB archive file read to learn its duration), also when
    the index is at the end of the file."""
    path, size = padded
    probe = probe_uri(str(path), None)
    assert (probe.kind, probe.duration_s, probe.width, probe.height, probe.size) == ("video", 60.0, 64, 64, size)
    assert probe.bytes_read < size / 20, (probe.bytes_read, size)


def test_groups_decode_what_the_whole_file_decoder_does(video10):
    """Guards against the streamed path sampling other frames, times or clips than the in-memory decoder (decord)
    that it replaces for the pipeline's videos."""
    settings = DecodeSettings(image_size=S, clip_seconds=1.0, clips_per_group=3, isolate=False)
    units = _units(str(video10), settings)
    assert [u["unit"] for u in units] == [CLIPS] * 4 and [len(u["clips"]) for u in units] == [3, 3, 3, 1]
    streamed = [c for u in units for c in decode_group(str(video10), None, u["t0"],
                [(c["index"], c["start_s"], c["end_s"]) for c in u["clips"]], 8, S)[0]]
    whole = decode_video(video10.read_bytes(), S, 8, 1.0, None)
    assert whole.decoder == "decord" and len(streamed) == len(whole.clips) == 10
    for a, b in zip(streamed, whole.clips):
        assert (a.index, a.start_s, a.end_s, a.timestamps_s) == (b.index, b.start_s, b.end_s, b.timestamps_s)
        assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 2


def test_groups_read_the_file_about_once(padded):
    """Guards against clip groups that each read from the start of the file, re-read their neighbours' bytes or
    fetch far past their end: the probe and all the groups of a video together read it about once."""
    path, size = padded
    settings = DecodeSettings(image_size=S, clip_seconds=5.0, clips_per_group=3, isolate=False)
    units = _units(str(path), settings)
    assert len(units) == 4 and units[0][GROUPS] == 4
    rows = pa.concat_tables(decode_units(_tasks(units), settings)).to_pylist()
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    read = sum(r[BYTES_READ] for r in rows)
    assert 0.9 * size < read < 1.15 * size, (read, size)


def test_sparse_frames_are_reached_by_seeking(padded, tmp_path):
    """Guards against decoding through a whole video for one clip's 8 frames (a 2-hour film as one clip), and
    against seeks that land on the same far keyframe again and again (a long GOP re-read for every frame)."""
    path, size = padded
    clips, read = decode_group(str(path), None, 0.0, [(0, 0.0, 60.0)], 8, S)
    assert clips[0].timestamps_s == [3.75, 11.25, 18.75, 26.25, 33.75, 41.25, 48.75, 56.25]
    for t, frame in zip(clips[0].timestamps_s, clips[0].frames):
        assert abs(frame.mean() - (2 * round(t * 4)) % 256) < 3  # the frame on screen at t
    assert read.bytes < size / 2 and read.retries == 0, (read, size)
    one_gop = tmp_path / "one_gop.mp4"
    size = media.long_mp4(one_gop, 60, gop=1000, pad_bytes_per_s=100_000)  # one keyframe, at 0
    assert decode_group(str(one_gop), None, 0.0, [(0, 0.0, 60.0)], 8, S)[1].bytes < 1.3 * size


def test_shot_boundaries_are_found_within_a_frame(tmp_path):
    """Guards against clips that span a cut, boundaries off the true cuts, rows != clips, or a window's clips
    leaving a decode task all at once (more than clips_per_group clips' frames in one table)."""
    cuts, fps = [2.3, 5.0, 7.7, 11.2], 10
    path = tmp_path / "scenes.mp4"
    media.scenes_mp4(path, cuts, 14.0, fps)
    settings = DecodeSettings(image_size=S, clips="shots", min_clip_seconds=1.0, max_clip_seconds=10.0,
                              clips_per_group=2, isolate=False)
    units = _units(str(path), settings)
    assert [u["unit"] for u in units] == [SHOTS] and units[0]["clips"][0]["end_s"] == 14.0
    tables = list(decode_units(_tasks(units), settings))
    assert [t.num_rows for t in tables] == [2, 2, 1]
    rows = pa.concat_tables(tables).to_pylist()
    assert all(r["status"] == "ok" and r[ITEM_ROWS] == 5 for r in rows)
    starts = [r["clip_start_s"] for r in rows]
    assert [r["clip_index"] for r in rows] == [0, 1, 2, 3, 4] and starts[0] == 0.0 and rows[-1]["clip_end_s"] == 14.0
    assert np.abs(np.array(starts[1:]) - cuts).max() <= 1 / fps + 1e-6, starts
    for r in rows:
        assert not [c for c in cuts if r["clip_start_s"] + 1 / fps < c < r["clip_end_s"] - 1 / fps], r
        frames = np.frombuffer(r["frames"], np.uint8).reshape(r["frame_shape"])
        scene = media.SCENE_COLOURS[sum(r["clip_start_s"] >= c - 0.15 for c in cuts)]
        assert np.abs(np.median(frames.reshape(-1, 3), axis=0) - scene).max() < 25  # one scene's frames only


def test_shot_bounds_merge_short_and_split_long():
    """Guards against the --min/--max-clip-seconds rules: a short shot must join its shorter neighbour, a long one
    split into equal parts, and the clips must still tile the window."""
    assert shot_clips([3.0, 3.2, 8.0], 0.0, 12.0, 1.0, 4.0) == [(0.0, 3.2), (3.2, 5.6), (5.6, 8.0), (8.0, 12.0)]
    assert shot_clips([], 0.0, 25.0, 2.0, 10.0) == [(0.0, 25 / 3), (25 / 3, 50 / 3), (50 / 3, 25.0)]
    assert shot_clips([0.5], 0.0, 1.5, 2.0, 10.0) == [(0.0, 1.5)]  # one piece left, however short


def _spanned(clips: list[tuple[float, float]], cuts: list[float], slack: float = 1e-6) -> list:
    return [(a, b, c) for a, b in clips for c in cuts if a + slack < c < b - slack]


def test_a_shot_cut_short_by_a_window_edge_never_merges_over_a_cut():
    """Guards against issue #34: `--clips shots` on a 10-minute video with a cut every 37 s gave a clip 480.0-489.5 s
    over the cut at 481 s (the 1 s piece between the 480 s window edge and the cut, under --min-clip-seconds,
    merged into the next shot). A piece at a window edge inside the video stays its own clip, on either side of
    the edge; every second is still in exactly one clip, in index order."""
    settings = DecodeSettings(image_size=S, clips="shots")  # 2-10 s clips, 160 s windows
    duration, min_s, max_s = 600.0, settings.min_clip_seconds, settings.max_clip_seconds
    windows = plan_clips(duration, settings.shot_window_s, None)
    assert [a for a, _ in windows] == [0.0, 160.0, 320.0, 480.0]
    for cuts in ([37.0 * k for k in range(1, 17)],  # 481 s: a cut 1 s after an edge
                 [37.0 * k for k in range(1, 17)] + [159.0, 161.5, 319.5]):  # and before one, and on both sides
        clips = []
        for w, (a, b) in enumerate(windows):
            got = shot_clips([c for c in cuts if a < c < b], a, b, min_s, max_s,
                             open_start=w > 0, open_end=w < len(windows) - 1)
            assert len(got) < settings.max_shot_clips
            clips += got
        assert not _spanned(clips, cuts), _spanned(clips, cuts)
        assert clips[0][0] == 0.0 and clips[-1][1] == duration
        assert all(prev[1] == nxt[0] for prev, nxt in zip(clips, clips[1:]))  # each second once, in order
        assert all(b - a <= max_s + 1e-9 for a, b in clips)
        edges = {a for a, _ in windows[1:]}
        assert all(a in edges or b in edges for a, b in clips if b - a < min_s - 1e-9), clips  # short: at an edge
    assert (480.0, 481.0) in clips and (159.0, 160.0) in clips and (160.0, 161.5) in clips
    # a real shot under the minimum still merges (into its shorter neighbour), beside an edge piece too
    assert shot_clips([1.0, 4.0, 4.5, 9.0], 0.0, 12.0, 2.0, 10.0, open_start=True, open_end=True) == [
        (0.0, 1.0), (1.0, 4.5), (4.5, 9.0), (9.0, 12.0)]
    assert shot_clips([0.5], 0.0, 1.5, 2.0, 10.0, open_start=True) == [(0.0, 0.5), (0.5, 1.5)]
    assert shot_clips([0.5], 0.0, 1.5, 2.0, 10.0) == [(0.0, 1.5)]  # a video's own start is no window edge


def test_shot_windows_keep_their_edge_pieces_through_the_decode_stage(tmp_path):
    """Guards against the decode stage not telling shot_clips which of a window's edges are inside the video: a real
    video with cuts 1 s after and 1 s before a window edge, decoded window by window, gives no clip over a cut."""
    cuts, fps = [4.0, 11.0, 15.0, 19.0, 24.5], 10
    path = tmp_path / "scenes.mp4"
    media.scenes_mp4(path, cuts, 30.0, fps)
    settings = DecodeSettings(image_size=S, clips="shots", min_clip_seconds=2.0, max_clip_seconds=2.5,
                              clips_per_group=4, isolate=False)  # windows of 10 s: edges at 10 and 20 s
    units = _units(str(path), settings)
    assert [u["clips"][0]["start_s"] for u in units] == [0.0, 10.0, 20.0]
    rows = pa.concat_tables(list(decode_units(_tasks(units), settings))).to_pylist()
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert [r["clip_index"] for r in rows] == sorted(r["clip_index"] for r in rows)
    clips = [(r["clip_start_s"], r["clip_end_s"]) for r in rows]
    assert clips[0][0] == 0.0 and clips[-1][1] == 30.0 and all(p[1] == n[0] for p, n in zip(clips, clips[1:]))
    assert not _spanned(clips, cuts, 1 / fps + 1e-6), _spanned(clips, cuts, 1 / fps + 1e-6)
    assert any(abs(a - 10.0) < 1e-6 and abs(b - 11.0) <= 1 / fps + 1e-6 for a, b in clips), clips
    assert any(abs(a - 19.0) <= 1 / fps + 1e-6 and abs(b - 20.0) < 1e-6 for a, b in clips), clips


def test_a_broken_group_gives_error_rows_for_its_clips(padded, tmp_path):
    """Guards against a failed clip group failing the task, losing its clips' rows, or failing its neighbours: a
    group that times out in its isolated child, or whose file went away, is error rows for exactly its clips."""
    path, _ = padded
    settings = DecodeSettings(image_size=S, clip_seconds=5.0, clips_per_group=5)
    units = _tasks(_units(str(path), settings))
    rushed = DecodeSettings(image_size=S, clip_seconds=5.0, clips_per_group=5, timeout_s=0.001)
    rows = pa.concat_tables(decode_units(units.slice(1, 1), rushed)).to_pylist()
    assert [r["clip_index"] for r in rows] == [5, 6, 7, 8, 9] and {r[GROUP] for r in rows} == {1}
    assert all(r["status"] == "error" and r["error_stage"] == "decode" and "timed out" in r["error"] for r in rows)
    assert all(r[ITEM_ROWS] == 5 and r["clip_start_s"] is not None for r in rows)
    ok = pa.concat_tables(decode_units(units.slice(0, 1), settings)).to_pylist()
    assert [r["status"] for r in ok] == ["ok"] * 5
    gone = tmp_path / "gone.mp4"
    gone.write_bytes(path.read_bytes())
    later = _tasks(_units(str(gone), settings))
    gone.unlink()
    rows = pa.concat_tables(decode_units(later.slice(0, 1), settings)).to_pylist()
    assert len(rows) == 5 and all((r["status"], r["error_stage"], r["error"]) == ("error", "read", "not found")
                                  for r in rows)


def test_split_leaves_out_committed_groups_and_refuses_by_size(padded, tmp_path):
    """Guards against a resumed video labelling its committed groups again, and against the user's byte limit
    being lost with the whole-file limit (a video over --max-bytes is a read error row, never read)."""
    path, size = padded
    settings = DecodeSettings(image_size=S, clip_seconds=5.0, clips_per_group=3, isolate=False)
    item = make_item(str(path), PROMPTS)
    assert [u[GROUP] for u in split_item(item, settings, frozenset({0, 2}))] == [1, 3]
    assert [u[GROUP] for u in _units(str(path), settings, done=[0, 2])] == [1, 3]  # the listing's DONE_GROUPS
    assert sum(len(c["clips"]) for c in [u for u in split_item(item, settings)]) == len(plan_clips(60.0, 5.0, None))
    small = DecodeSettings(image_size=S, max_bytes=size - 1, isolate=False)
    [refused] = split_item(item, small)
    assert (refused["unit"], refused["error_stage"]) == (FAILED, "read") and "file too large" in refused["error"]
    rows = decode_batch(pa.Table.from_pylist([item], schema=ITEM_SCHEMA), small).to_pylist()
    assert len(rows) == 1 and rows[0]["error"].startswith("file too large")


class _Flaky:
    """A file object whose first `fails` reads raise a dropped connection."""

    def __init__(self, f, fails: int) -> None:
        self.f, self.fails = f, fails

    def seek(self, pos: int) -> int:
        return self.f.seek(pos)

    def read(self, n: int) -> bytes:
        if self.fails:
            self.fails -= 1
            raise ConnectionResetError("connection reset by peer")
        return self.f.read(n)


def test_a_range_read_is_retried_and_counted_and_a_lost_one_fails_as_a_read(tmp_path):
    """Guards against a video's streamed reads failing at the first dropped connection (whole-file reads retry; a
    clip group's range reads must too), against retries that go uncounted (the summary's read_retries), and
    against a read that stays down being anything but a read error that says it was retried."""
    from workers.fetch import FetchError
    from workers.stream import InputFile

    path = tmp_path / "data.bin"
    data = bytes(range(256)) * 1000
    path.write_bytes(data)
    with open(path, "rb") as raw:
        f = InputFile(_Flaky(raw, 2), len(data), retries=3, budget_s=1.0)
        f.seek(1000)
        assert f.read(5000) == data[1000:6000]
        assert f.reads.retries == 2 and f.error is None
    with open(path, "rb") as raw:
        f = InputFile(_Flaky(raw, 10), len(data), retries=2, budget_s=1.0)
        with pytest.raises(FetchError, match="range read failed after 3 attempts"):
            f.read(100)
        assert f.reads.retries == 2 and isinstance(f.error, FetchError)


def test_a_split_batch_packs_what_decodes_fast_into_one_task(padded, video10, tmp_path, monkeypatch):
    """Guards against a Ray task per image (each costs more than its decode: the pipeline ran the model at a tenth
    of its speed), against a long video's groups losing their parallel tasks, and against an image paying a process
    hop when PIL's own guards suffice, while a file named .jpg whose bytes are a video still decodes in the isolated
    child."""
    import workers.decode

    path, _ = padded
    png = tmp_path / "a.png"
    png.write_bytes(media.png())
    disguised = tmp_path / "clip.jpg"
    disguised.write_bytes(video10.read_bytes())
    settings = DecodeSettings(image_size=S, clip_seconds=5.0, clips_per_group=3)
    items = [make_item(str(p), PROMPTS) for p in (png, path, disguised, video10)]
    tasks = split_batch(pa.Table.from_pylist(items, schema=ITEM_SCHEMA), settings).column("units").to_pylist()
    assert [[u["uri"].rsplit("/", 1)[1] for u in t] for t in tasks] == [
        ["a.png", "clip.jpg", "ten.mp4"], ["padded.mp4"], ["padded.mp4"], ["padded.mp4"], ["padded.mp4"]]
    assert [u["unit"] for u in tasks[0]] == ["item", "item", CLIPS] and tasks[0][2][GROUPS] == 1
    isolated = []
    real = workers.decode.run_isolated
    monkeypatch.setattr(workers.decode, "run_isolated", lambda fn, it, *a, **k: isolated.append(it["uri"]) or
                        real(fn, it, *a, **k))
    rows = pa.concat_tables(decode_units(pa.Table.from_pylist([{"units": tasks[0]}], schema=TASK_SCHEMA),
                                         settings)).to_pylist()
    assert [(r["uri"].rsplit("/", 1)[1], r["media_type"]) for r in rows if r["clip_index"] in (None, 0)] == [
        ("a.png", "image"), ("clip.jpg", "video"), ("ten.mp4", "video")]
    assert {r["status"] for r in rows} == {"ok"} and isolated == [str(disguised)]


def test_a_clip_group_fits_a_block():
    """Guards against a clip group whose frames pass Ray Data's block size (32 frames of 384 px, 16 clips: 226 MB):
    its decode task's output would be cut between blocks, and the labelers would get the group apart (its rows then
    assembled and committed by the driver, not the cluster). Fewer clips a group there; the user's count where they
    fit."""
    assert DecodeSettings(image_size=384, frames_per_clip=32).group_clips == 9
    assert DecodeSettings(image_size=128, frames_per_clip=8).group_clips == 16
    assert DecodeSettings(image_size=128, frames_per_clip=8, clips_per_group=3).group_clips == 3
