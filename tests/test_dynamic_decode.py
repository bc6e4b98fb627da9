"""The decode workers under a dynamic-resolution contract (lavi.resolution, workers.dynamic): images at their own
size, a video's frames at one size per clip, through the whole-file and the streamed paths, into blocks and out at
the labeler intact; hostile sizes as error rows; the contract carried from ModelInfo to DecodeSettings. (The
pixels' parity with transformers is tests/test_qwenvl_pixels.py.)"""

from __future__ import annotations

import pickle

import media
import numpy as np
import pyarrow as pa
import pytest

from lavi.families import ModelInfo
from lavi.resolution import DynamicResolution, Sizing
from pipeline.config import RunConfig
from schemas.manifest import ITEM_SCHEMA, make_item
from workers.decode import DecodeSettings, decode_item
from workers.labeler import Labeler
from workers.units import decode_batch, decode_units
from workers.split import split_batch

PROMPTS = [{"task": "caption", "prompt": None}]
IMAGE = Sizing(3136, 50176, 28, temporal_factor=2)
PER_CLIP = DynamicResolution(IMAGE, Sizing(4096, 16384, 32, per_clip=True, temporal_factor=2))  # Qwen3-VL-like
PER_FRAME = DynamicResolution(IMAGE, Sizing(3136, 3136 * 2, 28, temporal_factor=2))  # Qwen2-VL-like
W, H, FRAMES = 96, 64, 4


def settings(dynamic: DynamicResolution = PER_CLIP, **kw) -> DecodeSettings:
    return DecodeSettings(image_size=28, isolate=False, dynamic=dynamic, **{"frames_per_clip": FRAMES, **kw})


@pytest.fixture(scope="module")
def wide_video(tmp_path_factory):
    """2 s at 8 fps, 96 wide and 64 high."""
    path = tmp_path_factory.mktemp("v") / "wide.mp4"
    media.mp4(path, seconds=2, fps=8, size=W, height=H)
    return path


def test_images_decode_at_their_own_resolution(tmp_path):
    """Guards against an image squashed to a square (or to the wrong side) under a dynamic-resolution model, and
    against EXIF orientation applied after the size was chosen (a portrait photo sized as a landscape)."""
    for data, (w, h) in [(media.png(333, 517), (333, 517)), (media.jpeg(1200, 90), (1200, 90)),
                         (media.exif_rotated_jpeg(80, 40, 6), (40, 80))]:
        (row,) = decode_item(make_item("s3://b/x.img", PROMPTS, "image"), settings(), data)
        assert row["status"] == "ok" and (row["width"], row["height"]) == (w, h), row["error"]
        assert row["frames"].shape == (1, *IMAGE.size(h, w), 3) and row["frames"].dtype == np.uint8


def test_an_aspect_ratio_the_processor_refuses_is_an_error_row():
    """Guards against a 201:1 banner crashing a decode task (transformers raises ValueError on it) instead of giving
    its item one error row that says why."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    with pytest.raises(ValueError):
        smart_resize(10, 2010)
    (row,) = decode_item(make_item("s3://b/banner.png", PROMPTS), settings(), media.png(2010, 10))
    assert (row["status"], row["error_stage"]) == ("error", "decode") and "aspect ratio 201:1" in row["error"]
    (row,) = decode_item(make_item("s3://b/banner.png", PROMPTS), settings(dynamic=None), media.png(2010, 10))
    assert row["status"] == "ok"  # a square model takes it


@pytest.mark.parametrize("dynamic", [PER_CLIP, PER_FRAME], ids=["per-clip", "per-frame"])
def test_video_frames_share_one_size_on_both_paths_and_reach_the_labeler_intact(dynamic, wide_video):
    """Guards against a clip's frames at different sizes (they would not stack), a size that ignores the clip's
    frame count (Qwen3-VL bounds T * h * w), the streamed path (split + seek) sizing otherwise than the whole-file
    decoder, blocks that lose or reshape frames of different sizes on their way to the labeler, and a clip's frame
    times lost on the way to the engine."""
    s = settings(dynamic, clip_seconds=1.0)
    h, w = dynamic.video.size(H, W, FRAMES)
    whole = decode_item(make_item(str(wide_video), PROMPTS), s, wide_video.read_bytes())
    assert [r["clip_index"] for r in whole] == [0, 1] and {r["status"] for r in whole} == {"ok"}
    assert all(r["frames"].shape == (FRAMES, h, w, 3) for r in whole)
    image = media.png(333, 517)
    path = wide_video.parent / "tall.png"
    path.write_bytes(image)
    items = pa.Table.from_pylist([make_item(str(wide_video), PROMPTS), make_item(str(path), PROMPTS)],
                                 schema=ITEM_SCHEMA)
    table = decode_batch(items, s)
    clips = table.to_pylist()
    assert [(c["media_type"], c["status"]) for c in clips] == [("image", "ok"), ("video", "ok"), ("video", "ok")]
    visuals, media_of, _ = Labeler._inputs(clips, [(k, k, "describe") for k in range(len(clips))])
    assert visuals[0].shape == (1, *IMAGE.size(517, 333), 3)
    assert np.array_equal(visuals[0], decode_item(make_item(str(path), PROMPTS), s, image)[0]["frames"])
    for streamed, mem in zip(visuals[1:], whole):
        assert streamed.shape == mem["frames"].shape == (FRAMES, h, w, 3)
        assert np.abs(streamed.astype(int) - mem["frames"].astype(int)).max() <= 2  # decord vs seeking, as square
    # the engine gets each clip's own frame times (Qwen2.5-VL's time positions, Qwen3-VL's prompt timestamps)
    assert media_of[1] == ("video", (H, W), tuple(clips[1]["frame_timestamps_s"]))
    assert len(media_of[1][2]) == FRAMES and media_of[1][2] != media_of[2][2] and media_of[0] == ("image", (517, 333))


def test_a_video_of_a_refused_aspect_ratio_is_one_error_row(tmp_path):
    """Guards against a 202:1 video giving an error row per clip group, or a crash, instead of one row naming why
    (the split stage refuses it from the probe; the whole-file decoder refuses it too)."""
    path = tmp_path / "thin.mp4"
    data = media.mp4(path, seconds=2, fps=4, size=404, height=2)
    items = pa.Table.from_pylist([make_item(str(path), PROMPTS)], schema=ITEM_SCHEMA)
    (row,) = decode_batch(items, settings(clip_seconds=0.5)).to_pylist()
    assert (row["status"], row["error_stage"]) == ("error", "decode") and "aspect ratio 202:1" in row["error"]
    (row,) = decode_item(make_item(str(path), PROMPTS), settings(), data)
    assert row["status"] == "error" and "aspect ratio 202:1" in row["error"]


def test_the_contract_travels_from_model_info_to_the_decode_settings():
    """Guards against the driver's contract getting lost or changed on its way (ModelInfo.as_dict as the driver
    reads it, RunConfig.decode_settings, DecodeSettings pickled to Ray's workers), and against other families'
    info changing shape."""
    info = ModelInfo(name="q", family="test", fusion="test", vision_in_context=True, image_size=28, dynamic=PER_CLIP)
    d = info.as_dict()
    assert d["dynamic"]["video"]["per_clip"] is True and d["pinpoints"] is None
    config = RunConfig(inputs=("x.jpg",), out="out")
    s = config.decode_settings(d["image_size"], FRAMES, d["pinpoints"], d["dynamic"])
    assert s.dynamic == PER_CLIP and pickle.loads(pickle.dumps(s)) == s
    square = ModelInfo(name="s", family="lavi", fusion="viln", vision_in_context=False, image_size=32).as_dict()
    assert square["dynamic"] is None and config.decode_settings(32, 8, None, square["dynamic"]).dynamic is None


def test_settings_refuse_what_the_contract_cannot_take():
    """Guards against a run whose every video would fail (Qwen3-VL's video resize refuses a clip shorter than its
    temporal patch) and against a contract of both anyres tiles and dynamic resolution."""
    with pytest.raises(ValueError, match="--frames must be at least 2"):
        settings(frames_per_clip=1)
    settings(PER_FRAME, frames_per_clip=1)  # Qwen2-VL's per-frame resize takes one frame (completed later)
    with pytest.raises(ValueError, match="not both"):
        settings(pinpoints=((56, 56),))


def test_clip_groups_are_sized_by_the_contracts_largest_clip():
    """Guards against group_clips estimating a dynamic model's clips at a square of image_size (28 px): a group of
    16 clips of 12.8 MP frames would be gigabytes in one block."""
    big = DynamicResolution(IMAGE, Sizing(3136, 12845056, 28, temporal_factor=2))
    assert DecodeSettings(image_size=28, frames_per_clip=8, dynamic=big).group_clips == 1
    small = DecodeSettings(image_size=28, frames_per_clip=8, dynamic=PER_FRAME, clips_per_group=16)
    assert small.group_clips == 16
    budget = DynamicResolution(IMAGE, Sizing(4096, 25165824, 32, per_clip=True, temporal_factor=2))  # 75 MB a clip
    assert DecodeSettings(image_size=28, frames_per_clip=8, dynamic=budget).group_clips == 1
    assert budget.video.max_clip_pixels(5) == 25165824 * 5 // 4  # 5 frames are counted as 4 by the resize


def test_a_task_of_many_images_leaves_in_blocks(monkeypatch, tmp_path):
    """Guards against a decode task holding all its images' frames in one table: 32 images at a dynamic model's
    12.8 MP are over a GB. Tables are cut between items once their frames pass BLOCK_BYTES, and every item still
    leaves exactly once."""
    import workers.units

    monkeypatch.setattr(workers.units, "BLOCK_BYTES", 100_000)
    paths = []
    for k in range(6):
        paths.append(tmp_path / f"{k}.png")
        paths[-1].write_bytes(media.png(300, 200, seed=k))  # 252 x 168 at this contract: 127 kB of frames each
    items = pa.Table.from_pylist([make_item(str(p), PROMPTS) for p in paths], schema=ITEM_SCHEMA)
    tables = list(decode_units(split_batch(items, settings()), settings()))
    assert len(tables) == 6 and [t.num_rows for t in tables] == [1] * 6
    assert sorted(r["uri"] for t in tables for r in t.to_pylist()) == sorted(map(str, paths))
