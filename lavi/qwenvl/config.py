"""A Hugging Face Qwen2-VL, Qwen2.5-VL or Qwen3-VL directory's configuration, read without torch (the driver reads
it too).

config.json comes in two layouts: nested (`text_config`, `vision_config`: what transformers 5 writes, and every
Qwen3-VL) and flat (Qwen2-VL's and Qwen2.5-VL's hub checkpoints: the text fields at the top level, M-RoPE under
`rope_scaling: {"type": "mrope", "mrope_section": ...}`). Both map onto one `QwenVLConfig`; the vision tower's
own fields stay as config.json has them (`vision`), for `lavi.qwenvl.vision_config`. Anything this project does not
implement is refused here, in one line that names it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lavi.core.config import DecoderConfig
from lavi.families import CheckpointError
from lavi.qwenvl.kinds import MODEL_TYPES, QWEN2_5_VL, QWEN2_VL, QWEN3_VL, REFUSED

DEFAULT_PROMPTS = {"image": "Describe the image.", "video": "Describe the video."}
IMAGE, VIDEO = 1, 2  # a visual item's kind, as transformers' mm_token_type_ids spell it
# transformers' defaults, where config.json leaves a field out
_THETA = {QWEN2_VL: 1000000.0, QWEN2_5_VL: 1000000.0, QWEN3_VL: 5000000.0}
_SECTION = {QWEN2_VL: (16, 24, 24), QWEN2_5_VL: (16, 24, 24), QWEN3_VL: (24, 20, 20)}
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
              "use_sliding_window", "layer_types", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
              "tie_word_embeddings", "eos_token_id", "pad_token_id", "bos_token_id")


class UnsupportedCheckpoint(CheckpointError):
    """A checkpoint that uses something the loader does not implement; the message names it."""


@dataclass(frozen=True)
class QwenVLConfig:
    """A Qwen-VL: a dynamic-resolution ViT whose merged patches are spliced into the prompt of a Qwen2 (Qwen2-VL,
    Qwen2.5-VL) or Qwen3 (Qwen3-VL: q/k norms, interleaved M-RoPE, deepstack) decoder with M-RoPE positions."""

    kind: str  # the model_type: qwen2_vl, qwen2_5_vl or qwen3_vl
    decoder: DecoderConfig
    vision: dict[str, Any] = field(hash=False, compare=False)  # config.json's vision_config, as it is
    patch_size: int = 14
    merge_size: int = 2  # merged patches per side: an LLM token is merge_size^2 patches
    temporal_patch_size: int = 2  # frames per temporal patch
    tokens_per_second: float = 0.0  # Qwen2.5-VL: temporal positions per second of video (0: one per patch)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_ids: tuple[int, ...] = (151645,)
    pad_token_id: int = 151643
    name: str = "qwen-vl"
    default_frames: int = 8
    max_frames: int = 64
    default_prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS), hash=False)

    @property
    def fusion(self) -> str:
        return "concat"

    @property
    def eos_token_id(self) -> int:
        return self.eos_token_ids[0]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.eos_token_ids

    @property
    def factor(self) -> int:
        """An image side, in pixels, is a multiple of this (one merged patch)."""
        return self.patch_size * self.merge_size

    @property
    def stamped(self) -> bool:
        """Whether a video's temporal patches each come with their time in the prompt (Qwen3-VL's "<t seconds>")."""
        return self.kind == QWEN3_VL

    @classmethod
    def from_dir(cls, directory: str | Path, name: str | None = None) -> "QwenVLConfig":
        d = Path(directory)
        if not (d / "config.json").exists():
            raise UnsupportedCheckpoint(f"checkpoint file missing: {d / 'config.json'}")
        generation = d / "generation_config.json"
        return cls.from_hf(json.loads((d / "config.json").read_text()),
                           json.loads(generation.read_text()) if generation.exists() else {}, name or d.name)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], generation: dict[str, Any] | None = None,
                name: str = "qwen-vl") -> "QwenVLConfig":
        """Map config.json (+ generation_config.json) onto ours; refuse what we do not implement."""
        kind = hf.get("model_type")
        if kind in REFUSED:
            raise UnsupportedCheckpoint(f"model_type {kind!r} is not supported ({REFUSED[kind]}): "
                                        f"use a {', '.join(MODEL_TYPES)} checkpoint")
        if kind not in MODEL_TYPES:
            raise UnsupportedCheckpoint(f"model_type {kind!r} is not a Qwen-VL ({', '.join(MODEL_TYPES)})")
        text = _text(hf)
        vision = dict(hf.get("vision_config") or {})
        tps = float(vision.get("tokens_per_second", 4)) if kind == QWEN2_5_VL else 0.0
        return cls(kind=kind, decoder=_decoder(kind, text), vision=vision,
                   patch_size=int(vision.get("patch_size", 16 if kind == QWEN3_VL else 14)),
                   merge_size=int(vision.get("spatial_merge_size", 2)),
                   temporal_patch_size=int(vision.get("temporal_patch_size", 2)), tokens_per_second=tps,
                   image_token_id=int(hf.get("image_token_id", 151655)),
                   video_token_id=int(hf.get("video_token_id", 151656)),
                   vision_start_token_id=int(hf.get("vision_start_token_id", 151652)),
                   vision_end_token_id=int(hf.get("vision_end_token_id", 151653)),
                   **_special_ids(hf, text, generation or {}), name=name)


def _text(hf: dict[str, Any]) -> dict[str, Any]:
    """The decoder's fields: text_config (nested), or the top level (flat), the top level filling what it lacks."""
    text = dict(hf.get("text_config") or {})
    for key in _TEXT_KEYS:
        if key in hf and key not in text:
            text[key] = hf[key]
    text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    return text


def _rope(kind: str, text: dict[str, Any]) -> tuple[float, tuple[int, ...]]:
    """(theta, mrope_section); scaled RoPE of any kind is refused ("mrope" and "default" are plain M-RoPE)."""
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope", None):
        raise UnsupportedCheckpoint(f"rope scaling {rope_type!r} is not supported (only plain M-RoPE)")
    theta = rope.get("rope_theta", text.get("rope_theta", _THETA[kind]))
    return float(theta), tuple(int(s) for s in rope.get("mrope_section") or _SECTION[kind])


def _decoder(kind: str, text: dict[str, Any]) -> DecoderConfig:
    if text.get("use_sliding_window") or any(t != "full_attention" for t in text.get("layer_types") or ()):
        raise UnsupportedCheckpoint("use_sliding_window=true is not supported (full attention only)")
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedCheckpoint(f"hidden_act {act!r} is not supported (silu)")
    theta, section = _rope(kind, text)
    heads = text["num_attention_heads"]
    qwen3 = kind == QWEN3_VL
    bias = bool(text.get("attention_bias", False))
    try:
        return DecoderConfig(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"], num_layers=text["num_hidden_layers"], num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads") or heads,
            # Qwen2-VL's attention takes hidden_size / heads whatever head_dim says; Qwen3's reads head_dim
            head_dim=int(text.get("head_dim", 128)) if qwen3 else 0,
            rope_theta=theta, rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            max_position_embeddings=text.get("max_position_embeddings", 32768),
            qkv_bias=bias if qwen3 else True, o_bias=bias if qwen3 else False,
            tie_word_embeddings=text["tie_word_embeddings"], qk_norm=qwen3, mrope_section=section,
            mrope_interleaved=qwen3)
    except ValueError as err:
        raise UnsupportedCheckpoint(f"text config: {err}") from err


def _special_ids(hf: dict[str, Any], text: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """EOS ids as transformers' generate() takes them: generation_config.json first, then the configs."""
    eos = generation.get("eos_token_id", text.get("eos_token_id", hf.get("eos_token_id")))
    if eos is None:
        raise UnsupportedCheckpoint("no eos_token_id in generation_config.json or config.json")
    eos = (eos,) if isinstance(eos, int) else tuple(eos)
    pad = generation.get("pad_token_id", text.get("pad_token_id", hf.get("pad_token_id")))
    return {"eos_token_ids": tuple(int(e) for e in eos), "pad_token_id": int(pad if pad is not None else eos[0])}
