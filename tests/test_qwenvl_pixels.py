"""Qwen-VL preprocessing (issue #35, the input half): the processor configs (lavi.qwenvl.processor_config), the
dynamic-resolution resize (lavi.resolution, workers.dynamic) and the patches (lavi.qwenvl.pixels), against
transformers' own code: Qwen2VLImageProcessorPil run end to end, its smart_resize functions, Qwen3-VL's video
patchify. Exact equality throughout (the values are computed with transformers' float operations, to the bit)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import media
from lavi.qwenvl.pixels import patch_timestamps, pixel_values, value_table
from lavi.qwenvl.processor_config import CLIP_MEAN, CLIP_STD, ProcessorConfig
from lavi.resolution import Sizing
from workers.dynamic import image_input

QWEN2_HUB = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
             "merge_size": 2, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
             "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
QWEN3_HUB = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
             "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "processor_class": "Qwen3VLProcessor",
             "image_processor_type": "Qwen2VLImageProcessorFast"}
QWEN3_VIDEO_HUB = {**QWEN3_HUB, "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "fps": 2,
                   "video_processor_type": "Qwen3VLVideoProcessor"}
SMALL = {"size": {"shortest_edge": 3136, "longest_edge": 200704}}  # a user's budget: most images shrink
LAYOUTS = {"qwen2-hub": ("qwen2_vl", QWEN2_HUB), "qwen3-hub": ("qwen3_vl", QWEN3_HUB),
           "small-size-dict": ("qwen2_5_vl", SMALL)}
SIZES = [(10, 10), (28, 28), (333, 517), (1024, 200), (33, 200), (2000, 11), (517, 333), (1, 150), (1500, 1100)]
HUGE = (4000, 3000)  # 12 MP: under the hub budgets it stays 12 MP (~20 s in transformers here: the slow test)


def files(**named: dict):
    """A checkpoint's `read`: file name -> its JSON, None for a file it lacks."""
    return lambda name: named.get(name.replace(".json", ""))


def hf_image_processor(layout: dict, tmp_path):
    """transformers' PIL image processor, loaded from a preprocessor_config.json as a checkpoint holds it."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(layout))
    return Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))


def check_parity(layout: str, sizes: list[tuple[int, int]], tmp_path) -> None:
    """Our patches and grids equal transformers' Qwen2VLImageProcessorPil's for noise images of `sizes` (w, h)."""
    model_type, d = LAYOUTS[layout]
    hf = hf_image_processor(d, tmp_path)
    config = ProcessorConfig.read(model_type, files(preprocessor_config=d))
    assert (config.image.min_pixels, config.image.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge)
    for k, (w, h) in enumerate(sizes):
        im = Image.fromarray(media.noise_rgb(w, h, seed=k))
        theirs = hf(images=im, return_tensors="np")
        frames = image_input(im, config.image.sizing)
        ours, grid = pixel_values(frames, config.image)
        assert list(grid) == theirs["image_grid_thw"][0].tolist(), (w, h)
        assert ours.dtype == torch.float32 and torch.equal(ours, torch.from_numpy(theirs["pixel_values"])), (w, h)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_resize_and_patches_equal_transformers_pil_image_processor(layout, tmp_path):
    """Guards against an image whose patches differ from the reference processor's (a size off by one factor, a
    filter other than its bicubic, a rounding in rescale or normalise, patches in another order, a wrong grid): the
    vision tower would see other pixels than it was trained on. Tiny, odd, extreme-aspect and (under a small budget)
    huge sizes, both key layouts; our half is the decode workers' uint8 resize, then lavi.qwenvl.pixels."""
    check_parity(layout, SIZES + ([HUGE] if layout == "small-size-dict" else []), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["qwen2-hub", "qwen3-hub"])
def test_a_huge_image_at_the_hub_budgets_equals_transformers(layout, tmp_path):
    """Guards against a large photo going wrong where the budget keeps it near full size (12 MP of patches: an
    index or a table overflowing, a size rounded otherwise at that scale)."""
    check_parity(layout, [HUGE], tmp_path)


def test_sizes_equal_transformers_smart_resize():
    """Guards against our size arithmetic drifting from transformers' (Python's round-half-even, the floor when over
    max_pixels, the ceil when under min_pixels, the per-clip bound of Qwen3-VL's video, its upscale of a side under
    one factor) on thousands of sizes; and against accepting what it refuses (an aspect ratio over 200)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as frame_resize
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as clip_resize

    rng = np.random.default_rng(0)
    for factor, lo, hi in [(28, 3136, 12845056), (32, 65536, 16777216), (28, 200_000, 300_000), (32, 4096, 25165824)]:
        frame, clip = Sizing(lo, hi, factor), Sizing(lo, hi, factor, per_clip=True, temporal_factor=2)
        for h, w, t in zip(rng.integers(1, 5000, 1500), rng.integers(1, 5000, 1500), rng.integers(2, 70, 1500)):
            h, w, t = (int(v) for v in (h, w, t))
            try:
                want = frame_resize(h, w, factor, lo, hi)
            except ValueError:
                with pytest.raises(ValueError, match="aspect ratio"):
                    frame.size(h, w)
            else:
                assert frame.size(h, w) == want, (h, w)
            try:
                want = clip_resize(t, h, w, 2, factor, lo, hi)
            except ValueError:
                with pytest.raises(ValueError, match="aspect ratio"):
                    clip.size(h, w, t)
            else:
                assert clip.size(h, w, t) == want, (t, h, w)
    with pytest.raises(ValueError, match="temporal patch"):
        Sizing(4096, 25165824, 32, per_clip=True, temporal_factor=2).size(100, 100, 1)


def test_video_patches_equal_transformers_qwen3_video_patchify():
    """Guards against a video's patches in another order than the reference (frames of one temporal patch
    interleaved per pixel, merge blocks contiguous), an odd clip completed otherwise than with its last frame, or
    the video processors' fused rescale-and-normalise computed in other float steps. transformers' own patchify;
    its normalise needs torchvision (missing here), so it is transcribed: torchvision's normalize is
    x.sub_(mean).div_(std) in float32 with mean and std scaled by 1 / rescale_factor."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    config = ProcessorConfig.read("qwen3_vl", files(preprocessor_config=QWEN3_HUB,
                                                    video_preprocessor_config=QWEN3_VIDEO_HUB))
    video = config.video
    assert (video.patch_size, video.per_clip, video.fused, video.max_pixels) == (16, True, True, 25165824)
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (5, 64, 96, 3), dtype=np.uint8)  # 5 frames: completed to 6
    ours, grid = pixel_values(frames, video)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).to(torch.float32)  # (T, C, H, W)
    mean = (torch.tensor(video.image_mean) * (1.0 / video.rescale_factor)).view(-1, 1, 1)
    std = (torch.tensor(video.image_std) * (1.0 / video.rescale_factor)).view(-1, 1, 1)
    theirs, *their_grid = Qwen3VLVideoProcessor().patchify(((x - mean) / std)[None], 16, 2, 2)
    assert grid == tuple(their_grid) == (3, 4, 6)
    assert torch.equal(ours, theirs[0])


def test_an_image_is_its_frame_repeated_and_a_clip_is_completed_with_its_last_frame():
    """Guards against an image or an odd clip filled otherwise than the reference does (zeros, or the first
    frame): the tower's temporal patch would mix in a frame the model never saw."""
    config = ProcessorConfig.from_dicts("qwen2_vl", None, None)
    rng = np.random.default_rng(2)
    one = rng.integers(0, 256, (1, 56, 84, 3), dtype=np.uint8)
    assert torch.equal(pixel_values(one, config.image)[0], pixel_values(np.repeat(one, 2, 0), config.image)[0])
    three = rng.integers(0, 256, (3, 56, 84, 3), dtype=np.uint8)
    values, grid = pixel_values(three, config.video)
    assert grid == (2, 4, 6) and values.shape == (2 * 4 * 6, 3 * 2 * 14 * 14)
    assert torch.equal(values, pixel_values(np.concatenate([three, three[-1:]]), config.video)[0])
    with pytest.raises(ValueError, match="multiples of patch"):
        pixel_values(rng.integers(0, 256, (1, 50, 84, 3), dtype=np.uint8), config.image)


def test_value_table_is_each_backends_arithmetic():
    """Guards against the lookup table computing other values than the processors' own steps: the PIL backend
    rescales in float64 then casts (numpy, as transformers' rescale), the torchvision backend fuses the scale into
    mean and std."""
    config = ProcessorConfig.from_dicts("qwen2_vl", None, None)
    v = np.arange(256, dtype=np.uint8)
    x = (v.astype(np.float64) * config.image.rescale_factor).astype(np.float32)
    pil = (x[None] - np.array(CLIP_MEAN, np.float32)[:, None]) / np.array(CLIP_STD, np.float32)[:, None]
    assert np.array_equal(value_table(config.image).numpy(), pil)
    assert not config.image.fused and config.video.fused
    assert not torch.equal(value_table(config.image), value_table(config.video))  # they do round differently
    assert torch.allclose(value_table(config.image), value_table(config.video), atol=1e-5)


def test_processor_configs_read_like_transformers(tmp_path):
    """Guards against reading a checkpoint's processor otherwise than transformers: its defaults per model type, the
    top-level min/max_pixels winning over size, the video processor falling back to the image file (a Qwen2-VL on
    the hub has no video file), processor_config.json's nested dicts first."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    hf, hf3 = Qwen2VLImageProcessorPil(), Qwen3VLVideoProcessor()
    for kind in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        image = ProcessorConfig.from_dicts(kind, None, None).image
        assert (image.min_pixels, image.max_pixels, image.patch_size, image.merge_size, image.temporal_patch_size,
                image.image_mean, image.image_std, image.resample, image.rescale_factor) == (
            hf.size.shortest_edge, hf.size.longest_edge, hf.patch_size, hf.merge_size, hf.temporal_patch_size,
            tuple(hf.image_mean), tuple(hf.image_std), hf.resample, hf.rescale_factor)
    video = ProcessorConfig.from_dicts("qwen3_vl", None, None).video
    assert (video.min_pixels, video.max_pixels, video.patch_size, video.image_mean) == (
        hf3.size["shortest_edge"], hf3.size["longest_edge"], hf3.patch_size, tuple(hf3.image_mean))
    both = {**QWEN2_HUB, "size": {"shortest_edge": 1000, "longest_edge": 2000}}
    theirs = hf_image_processor(both, tmp_path).size
    ours = ProcessorConfig.read("qwen2_vl", files(preprocessor_config=both))
    assert (ours.image.min_pixels, ours.image.max_pixels) == (theirs.shortest_edge, theirs.longest_edge) == (
        3136, 12845056)
    assert (ours.video.min_pixels, ours.video.max_pixels, ours.video.per_clip) == (3136, 12845056, False)
    assert ProcessorConfig.read("qwen2_vl", files()).video.max_pixels == 28 * 28 * 768  # no files: the defaults
    nested = {"image_processor": {**QWEN2_HUB, "max_pixels": 40000}, "video_processor": {"max_pixels": 30000}}
    ours = ProcessorConfig.read("qwen2_vl", files(preprocessor_config=QWEN2_HUB, processor_config=nested))
    assert (ours.image.max_pixels, ours.video.max_pixels) == (40000, 30000)
    contract = ProcessorConfig.read("qwen3_vl", files(preprocessor_config=QWEN3_HUB,
                                                      video_preprocessor_config=QWEN3_VIDEO_HUB)).contract
    assert contract.image == Sizing(65536, 16777216, 32, temporal_factor=2)
    assert contract.video == Sizing(4096, 25165824, 32, per_clip=True, temporal_factor=2)


@pytest.mark.parametrize("options, message", [
    ({"do_reduce_labels": True}, "'do_reduce_labels'"),
    ({"do_center_crop": True}, "do_center_crop"),
    ({"do_resize": False}, "do_resize=false"),
    ({"cap_pixels_per_frame": True}, "cap_pixels_per_frame"),
    ({"size": {"height": 224, "width": 224}}, "'height', 'width'"),
    ({"size": 224}, "size has 224"),
    ({"image_mean": [0.5, 0.5]}, "3 numbers"),
    ({"resample": 7}, "resample"),
])
def test_options_not_implemented_are_refused_in_one_line(options, message):
    """Guards against a checkpoint whose processor does something lavi does not (a crop, no resize, the per-frame
    cap, a fixed size) being labelled with other pixels than its own, silently."""
    with pytest.raises(ValueError, match=message) as err:
        ProcessorConfig.from_dicts("qwen2_vl", {**QWEN2_HUB, **options}, None)
    assert "\n" not in str(err.value) and "image processor" in str(err.value)
    with pytest.raises(ValueError, match="model_type"):
        ProcessorConfig.from_dicts("llava_onevision", None, None)


def test_patch_timestamps_are_qwen3_processors():
    """Guards against the times Qwen3-VL's prompt gives its temporal patches differing from transformers' (a patch
    the mean of its first and last frame, an odd clip completed with its last frame)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    fps = 4.0
    for indices in ([0, 3, 7, 12], [1, 5, 9], [6]):
        theirs = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)
        assert patch_timestamps([i / fps for i in indices], 2) == pytest.approx(theirs, abs=0)


def test_decoded_jpeg_equals_the_reference_on_the_same_file():
    """Guards against the decode workers reading a JPEG otherwise than the reference (DCT-scaled decoding at a
    smaller size, as square models' decode does): the whole path, bytes -> decode_item -> pixel_values, equals
    transformers on the same bytes opened by PIL."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from schemas.manifest import make_item
    from workers.decode import DecodeSettings, decode_item

    config = ProcessorConfig.read("qwen2_vl", files(preprocessor_config=SMALL))
    data = media.jpeg(1200, 900, seed=3)
    settings = DecodeSettings(image_size=28, isolate=False, dynamic=config.contract)
    (row,) = decode_item(make_item("s3://b/x.jpg", [{"task": "caption", "prompt": None}]), settings, data)
    assert row["status"] == "ok" and (row["width"], row["height"]) == (1200, 900)
    ours, grid = pixel_values(row["frames"], config.image)
    theirs = Qwen2VLImageProcessorPil(**SMALL)(images=Image.open(io.BytesIO(data)), return_tensors="np")
    assert list(grid) == theirs["image_grid_thw"][0].tolist()
    assert torch.equal(ours, torch.from_numpy(theirs["pixel_values"]))
