"""The image and video processors of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint, read from its config files. Torch-free.

`ProcessorConfig.read(model_type, read)` reads what transformers' AutoImageProcessor / AutoVideoProcessor would, in
their order: processor_config.json's nested `image_processor` / `video_processor` (transformers 5 saves), else
preprocessor_config.json for images and video_preprocessor_config.json for video, falling back to
preprocessor_config.json (a Qwen2-VL on the hub has no video file: its video processor takes the image file's keys).
A key left out takes the transformers default of that model type's processor class:

    images, all three      Qwen2VLImageProcessor: 56*56..28*28*1280 px, patch 14, merge 2, temporal 2, CLIP mean/std
    video, Qwen2(.5)-VL    Qwen2VLVideoProcessor: 128*28*28..28*28*768 px per frame, patch 14, CLIP mean/std
    video, Qwen3-VL        Qwen3VLVideoProcessor: 128*32*32..32*32*768 px over a clip's T*h*w, patch 16, mean/std 0.5

Both size layouts are read: `min_pixels`/`max_pixels` (the hub's Qwen2(.5)-VL files; they win, as in transformers)
or `size: {shortest_edge, longest_edge}` (transformers 5 and the Qwen3-VL files: pixels, not edges). An option this
reader does not know, or one whose value changes the arithmetic in a way the decode workers and lavi.qwenvl.pixels do
not implement (no resize, a center crop, the per-frame cap), is refused in one line naming it. `contract` is the
input contract the driver hands the decode workers (lavi.resolution.DynamicResolution).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from lavi.qwenvl.kinds import QWEN2_5_VL, QWEN2_VL, QWEN3_VL
from lavi.resolution import BICUBIC, DynamicResolution, Sizing

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN and _STD

# options read into the config (`size` and the pixel bounds are read apart)
_READ = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor",
         "do_rescale", "do_normalize", "resample")
# options with no effect here: provenance, what the decode workers do anyway (RGB), the reference's own frame
# sampling (this project samples frames_per_clip frames per clip), tensor layouts
_IGNORED = frozenset({
    "image_processor_type", "video_processor_type", "processor_class", "auto_map", "feature_extractor_type",
    "do_convert_rgb", "default_to_square", "data_format", "input_data_format", "device", "return_tensors",
    "disable_grouping", "return_metadata", "video_metadata", "do_sample_frames", "fps", "num_frames", "min_frames",
    "max_frames", "max_duration", "max_image_size", "max_video_tokens", "crop_size", "pad_size",
})
# options refused unless off: they change the pixels in a way not implemented here
_OFF = ("do_center_crop", "do_pad", "cap_pixels_per_frame")
_SIZE_KEYS = {"shortest_edge": "min_pixels", "longest_edge": "max_pixels", "min_pixels": "min_pixels",
              "max_pixels": "max_pixels"}
_RESAMPLE = range(6)  # PIL's filters: NEAREST 0, LANCZOS 1, BILINEAR 2, BICUBIC 3, BOX 4, HAMMING 5


@dataclass(frozen=True)
class MediaProcessor:
    """One processor's arithmetic (the image processor's, or the video processor's)."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = BICUBIC
    per_clip: bool = False  # the pixel bounds hold over a clip's T * h * w (Qwen3-VL's video), else per frame
    # rescale and normalise in one step, (x - mean / scale) / (std / scale) in float32, as transformers' torchvision
    # backend (its video processors) computes; False: x * scale in float64, to float32, then (x - mean) / std, as its
    # PIL image processor does (lavi.qwenvl.pixels follows either to the bit)
    fused: bool = False

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise ValueError(f"image_mean and image_std must be 3 numbers each (std non-zero), got "
                             f"{list(self.image_mean)} and {list(self.image_std)}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be a PIL filter code 0..5, got {self.resample!r}")
        Sizing(self.min_pixels, self.max_pixels, self.factor)  # the bounds' own checks

    @property
    def factor(self) -> int:
        """Both sides of a resized frame are multiples of this: a patch times the spatial merge."""
        return self.patch_size * self.merge_size

    @property
    def square_side(self) -> int:
        """The square side a caller with no frames of its own (a memory probe) takes: 448 px rounded to the factor."""
        return self.factor * max(1, round(448 / self.factor))

    @property
    def sizing(self) -> Sizing:
        return Sizing(self.min_pixels, self.max_pixels, self.factor, per_clip=self.per_clip,
                      temporal_factor=self.temporal_patch_size, resample=self.resample)


_IMAGE = MediaProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14, temporal_patch_size=2,
                        merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD)
_QWEN2_VIDEO = replace(_IMAGE, min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768, fused=True)
_QWEN3_VIDEO = MediaProcessor(min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768, patch_size=16,
                              temporal_patch_size=2, merge_size=2, image_mean=HALF, image_std=HALF, per_clip=True,
                              fused=True)
DEFAULTS = {QWEN2_VL: (_IMAGE, _QWEN2_VIDEO), QWEN2_5_VL: (_IMAGE, _QWEN2_VIDEO), QWEN3_VL: (_IMAGE, _QWEN3_VIDEO)}


@dataclass(frozen=True)
class ProcessorConfig:
    model_type: str
    image: MediaProcessor
    video: MediaProcessor

    @classmethod
    def read(cls, model_type: str, read: Callable[[str], dict | None]) -> "ProcessorConfig":
        """From a checkpoint's files, `read(name)` -> its JSON or None (see the module doc)."""
        nested = read("processor_config.json") or {}
        image_file = read("preprocessor_config.json")
        image = nested.get("image_processor") or image_file
        video = nested.get("video_processor") or read("video_preprocessor_config.json") or image_file
        return cls.from_dicts(model_type, image, video)

    @classmethod
    def from_dicts(cls, model_type: str, image: dict[str, Any] | None,
                   video: dict[str, Any] | None) -> "ProcessorConfig":
        """From the image and video processors' dicts (None: all defaults) over the model type's defaults."""
        if model_type not in DEFAULTS:
            raise ValueError(f"no processor defaults for model_type {model_type!r}; known: {', '.join(DEFAULTS)}")
        image_default, video_default = DEFAULTS[model_type]
        return cls(model_type, _parse(image or {}, image_default, "the image processor"),
                   _parse(video or {}, video_default, "the video processor"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProcessorConfig":
        """`dataclasses.asdict` of one, back (a converted LaVi keeps its processors so: LaViConfig.processor)."""
        def media(m: dict[str, Any]) -> MediaProcessor:
            return MediaProcessor(**{**m, "image_mean": tuple(m["image_mean"]), "image_std": tuple(m["image_std"])})

        return cls(d["model_type"], media(d["image"]), media(d["video"]))

    @property
    def contract(self) -> DynamicResolution:
        """The input contract the decode workers resize to (lavi.families.ModelInfo.dynamic)."""
        return DynamicResolution(image=self.image.sizing, video=self.video.sizing)


def _parse(d: dict[str, Any], default: MediaProcessor, what: str) -> MediaProcessor:
    """One processor's dict over its defaults; refuses (ValueError, one line) what it cannot honour."""
    unknown = sorted(k for k in d if k not in {*_READ, *_IGNORED, *_OFF, "size", "min_pixels", "max_pixels",
                                               "do_resize"} and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{what}'s config has option(s) {', '.join(map(repr, unknown))} that lavi does not "
                         f"implement; known: {', '.join(sorted({*_READ, *_OFF, 'size', 'do_resize'}))}")
    on = [k for k in _OFF if d.get(k)]
    if d.get("do_resize") is False:
        on.append("do_resize=false")
    if on:
        raise ValueError(f"{what}'s config sets {', '.join(on)}, which lavi does not implement: remove it")
    fields: dict[str, Any] = {k: d[k] for k in _READ if d.get(k) is not None}
    for k in ("image_mean", "image_std"):
        if k in fields:
            fields[k] = tuple(float(v) for v in fields[k]) if isinstance(fields[k], (list, tuple)) else (
                (float(fields[k]),) * 3)
    size = d.get("size") or {}
    bad = sorted(set(size) - set(_SIZE_KEYS)) if isinstance(size, dict) else [size]
    if bad:
        raise ValueError(f"{what}'s size has {', '.join(map(repr, bad))}; a dynamic-resolution processor's size is "
                         "{shortest_edge, longest_edge} in pixels (or min_pixels/max_pixels)")
    for key, name in _SIZE_KEYS.items():  # size's edges first, then its min/max_pixels, then the top-level keys
        if size.get(key) is not None:
            fields.setdefault(name, int(size[key]))
    for name in ("min_pixels", "max_pixels"):
        if d.get(name) is not None:
            fields[name] = int(d[name])
    try:
        return replace(default, **fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}'s config: {err}") from None
