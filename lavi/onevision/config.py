"""A Hugging Face LLaVA-OneVision directory's configuration, read without torch (the driver reads it too).

Three files say what the model is and how it sees: config.json (the tower, the projector, the decoder,
anyres), preprocessor_config.json (resize, rescale, normalise, the tile size and grid) and the tokenizer's
special ids. Anything this project does not implement is refused here, with a message that names it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lavi.core.config import DecoderConfig, VisionConfig

MODEL_TYPE = "llava_onevision"
PROJECTOR_ACTS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "relu", "silu", "quick_gelu")
BICUBIC = 3  # PIL's code; preprocessor_config.json stores `resample` as that int


class UnsupportedCheckpoint(ValueError):
    """A checkpoint that uses something the loader does not implement; the message names it."""


@dataclass(frozen=True)
class OneVisionConfig:
    """A LLaVA-OneVision: SigLIP tower -> 2-layer projector -> visual tokens spliced into a Qwen2 prompt."""

    decoder: DecoderConfig
    vision: VisionConfig
    feature_layers: tuple[int, ...]  # hidden_states indices (0 = embeddings), concatenated along features
    select_strategy: str  # "full" (the only one a SigLIP tower admits)
    projector_act: str
    projector_bias: bool
    pinpoints: tuple[tuple[int, int], ...]  # anyres grid resolutions (height, width)
    max_tiles: int  # anyres_max_N
    image_token_id: int
    video_token_id: int
    tile_size: int  # preprocessor size: the base view and every crop are tile_size x tile_size
    resample: int  # PIL resampling code
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    name: str = "llava-onevision"
    default_frames: int = 8  # frames per video clip when the caller does not say
    max_frames: int = 64
    default_prompts: dict[str, str] | None = None  # caption prompt per media type (None: the engine's defaults)

    @property
    def side(self) -> int:
        """Feature grid side of one tile (27 for SigLIP 384/14)."""
        return self.vision.image_size // self.vision.patch_size

    @property
    def fusion(self) -> str:
        return "concat"

    @property
    def eos_token_id(self) -> int:
        return self.eos_token_ids[0]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.eos_token_ids

    @classmethod
    def from_dir(cls, directory: str | Path, name: str | None = None) -> "OneVisionConfig":
        d = Path(directory)
        hf = _read(d / "config.json")
        pre = _read(d / "preprocessor_config.json") if (d / "preprocessor_config.json").exists() else {}
        generation = _read(d / "generation_config.json") if (d / "generation_config.json").exists() else {}
        return cls.from_hf(hf, pre, generation, name or d.name)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], pre: dict[str, Any], generation: dict[str, Any] | None = None,
                name: str = "llava-onevision") -> "OneVisionConfig":
        """Map config.json (+ preprocessor_config.json, generation_config.json) onto ours; refuse the rest."""
        if hf.get("model_type") != MODEL_TYPE:
            raise UnsupportedCheckpoint(f"model_type {hf.get('model_type')!r} is not {MODEL_TYPE!r}")
        text = dict(hf.get("text_config") or {})
        text.setdefault("model_type", "qwen2")
        if text.get("use_sliding_window") or any(t != "full_attention" for t in text.get("layer_types") or ()):
            raise UnsupportedCheckpoint("text_config.use_sliding_window=true is not supported (full attention only)")
        text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
        text["tie_word_embeddings"] = bool(text["tie_word_embeddings"] or hf.get("tie_word_embeddings", False))
        decoder = DecoderConfig.from_hf(text)
        vis = dict(hf.get("vision_config") or {})
        vis.setdefault("model_type", "siglip_vision_model")
        vision = VisionConfig.from_hf(vis)
        layers = hf.get("vision_feature_layer", -1)
        layers = [layers] if isinstance(layers, int) else list(layers)
        n = vision.num_layers + 1  # hidden_states: the embeddings, then every block
        if any(not -n <= i < n for i in layers):
            raise UnsupportedCheckpoint(f"vision_feature_layer {layers} is outside the tower's {n} hidden states")
        strategy = hf.get("vision_feature_select_strategy", "full")
        if strategy != "full":  # "default" drops a CLIP tower's CLS token; SigLIP has none, so no grid is left
            raise UnsupportedCheckpoint(f"vision_feature_select_strategy {strategy!r} is not supported with a SigLIP "
                                        "tower (it has no CLS token to drop): only 'full'")
        act = hf.get("projector_hidden_act", "gelu")
        if act not in PROJECTOR_ACTS:
            raise UnsupportedCheckpoint(f"projector_hidden_act {act!r} is not supported ({', '.join(PROJECTOR_ACTS)})")
        aspect = hf.get("vision_aspect_ratio", "anyres_max_9")
        if not (isinstance(aspect, str) and aspect.startswith("anyres_max_") and aspect[11:].isdigit()):
            raise UnsupportedCheckpoint(f"vision_aspect_ratio {aspect!r} is not supported (anyres_max_N)")
        pinpoints = hf.get("image_grid_pinpoints") or pre.get("image_grid_pinpoints")
        if not pinpoints:
            raise UnsupportedCheckpoint("config.json has no image_grid_pinpoints")
        return cls(decoder=decoder, vision=vision, feature_layers=tuple(i % n for i in layers),
                   select_strategy=strategy, projector_act=act,
                   projector_bias=bool(hf.get("multimodal_projector_bias", True)),
                   pinpoints=tuple((int(h), int(w)) for h, w in pinpoints), max_tiles=int(aspect[11:]),
                   image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 151646))),
                   video_token_id=int(hf.get("video_token_index", hf.get("video_token_id", 151647))),
                   **_preprocessing(pre, vision), **_special_ids(hf, text, generation or {}), name=name,
                   **_ours(hf.get(OURS) or {}))


# a LLaVA-OneVision's caption prompts, unless its checkpoint carries its own (config.json's OURS)
DEFAULT_PROMPTS = {"image": "Describe the image.", "video": "Describe the video."}
OURS = "lavi"  # config.json's key for what a checkpoint trained here knows of itself (transformers keeps, ignores it)


def _ours(saved: dict[str, Any]) -> dict[str, Any]:
    """default_frames, max_frames and default_prompts, where a checkpoint trained by this project saved them."""
    out = {k: int(saved[k]) for k in ("default_frames", "max_frames") if k in saved}
    if isinstance(saved.get("default_prompts"), dict):
        out["default_prompts"] = {str(k): str(v) for k, v in saved["default_prompts"].items()}
    return out


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UnsupportedCheckpoint(f"checkpoint file missing: {path}")
    return json.loads(path.read_text())


def _preprocessing(pre: dict[str, Any], vision: VisionConfig) -> dict[str, Any]:
    """preprocessor_config.json -> the fields our decode and normalisation reproduce; the rest is refused."""
    for flag, want in (("do_resize", True), ("do_rescale", True), ("do_normalize", True), ("do_pad", True)):
        if pre.get(flag, want) is not want:
            raise UnsupportedCheckpoint(f"preprocessor_config.json {flag}={pre[flag]} is not supported")
    if pre.get("do_center_crop"):
        raise UnsupportedCheckpoint("preprocessor_config.json do_center_crop=true is not supported")
    size = pre.get("size", {"height": vision.image_size, "width": vision.image_size})
    side = size.get("height", size.get("shortest_edge"))
    if side is None or size.get("width", side) != side:
        raise UnsupportedCheckpoint(f"preprocessor size {size} is not supported (a square: height == width)")
    if side != vision.image_size:
        raise UnsupportedCheckpoint(f"preprocessor size {side} differs from the tower's image_size {vision.image_size}")
    mean = tuple(pre.get("image_mean", (0.48145466, 0.4578275, 0.40821073)))
    std = tuple(pre.get("image_std", (0.26862954, 0.26130258, 0.27577711)))
    return {"tile_size": int(side), "resample": int(pre.get("resample", BICUBIC)),
            "rescale_factor": float(pre.get("rescale_factor", 1 / 255)), "image_mean": mean, "image_std": std}


def _special_ids(hf: dict[str, Any], text: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """EOS ids as transformers' generate() takes them: generation_config.json first, then the configs."""
    eos = generation.get("eos_token_id", text.get("eos_token_id", hf.get("eos_token_id")))
    if eos is None:
        raise UnsupportedCheckpoint("no eos_token_id in generation_config.json or config.json")
    eos = (eos,) if isinstance(eos, int) else tuple(eos)
    pad = generation.get("pad_token_id", text.get("pad_token_id", hf.get("pad_token_id")))
    return {"eos_token_ids": tuple(int(e) for e in eos), "pad_token_id": int(pad if pad is not None else eos[0])}
