"""`convert`: a LaVi from a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint.

The LaVi keeps the Qwen-VL's decoder (its M-RoPE sections in its DecoderConfig: with a text-only context the
positions are equal on all axes, the plain rotary), tokenizer, chat template (prompts are one user turn with no image
in it), EOS ids, and its ViT with the image and video processors' arithmetic (frames at their own resolution:
`LaViConfig.processor`, the processor files copied beside). Its ViLN conditioner is new (lavi.qwenvl.lavi_model):
stages tapped from the tower's blocks (evenly spaced, the deepest last), output heads zero-initialised, so at step 0 it
is exactly the Qwen-VL's decoder on the text alone. The merger (and Qwen3-VL's deepstack mergers) are left behind: no
visual token enters a LaVi's context. Training makes the vision count: `lavi-label train --init LAVI_DIR ...` or
`lavi-label distill ... --teacher QWEN_DIR --student LAVI_DIR`.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from lavi.core import checkpoint
from lavi.core.config import VILN, LaViConfig
from lavi.qwenvl import checkpoint as qwen_checkpoint
from lavi.qwenvl.config import QwenVLConfig
from lavi.qwenvl.lavi_model import QwenLaVi
from lavi.qwenvl.processor_config import ProcessorConfig
from lavi.qwenvl.vision_config import QwenVisionConfig
from lavi.serving.chat_template import find_template, special_tokens

COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
          "video_preprocessor_config.json", "processor_config.json", "generation_config.json", "chat_template.jinja")


def convert(source: str | Path, out: str | Path, num_stages: int = 4, cond_dim: int = 256, cond_heads: int = 4,
            sites: str = "both", layer_stride: int = 1, seed: int = 0, name: str | None = None) -> QwenLaVi:
    """Write a LaVi checkpoint built from the Qwen-VL at `source` to `out`; returns the model."""
    src, dst = Path(source), Path(out)
    c = QwenVLConfig.from_dir(src)
    qwen = qwen_checkpoint.load(src, dtype=torch.float32, config=c)
    template = find_template(src)
    if template is None:
        raise checkpoint.CheckpointError(f"{src} has no chat template: a converted LaVi prompts through it")

    def read(file: str) -> dict | None:
        return json.loads((src / file).read_text()) if (src / file).exists() else None

    tok_cfg = read("tokenizer_config.json") or {}
    processor = ProcessorConfig.read(c.kind, read)
    vision = QwenVisionConfig.from_hf(c.vision, c.kind)
    config = LaViConfig(decoder=c.decoder, vision=vision, fusion=VILN, sites=sites, layer_stride=layer_stride,
                        num_stages=min(num_stages, vision.depth), cond_dim=cond_dim, cond_heads=cond_heads,
                        max_frames=c.max_frames, default_frames=c.default_frames,
                        image_mean=processor.image.image_mean, image_std=processor.image.image_std,
                        chat_template=template, chat_tokens=special_tokens(tok_cfg), eos_token_id=c.eos_token_id,
                        eos_token_ids=c.eos_token_ids, pad_token_id=c.pad_token_id,
                        default_prompts=dict(c.default_prompts), processor=dataclasses.asdict(processor),
                        name=name or f"lavi-{c.name}")
    torch.manual_seed(seed)
    model = QwenLaVi(config)
    model.decoder.load_state_dict(qwen.decoder.state_dict())
    tower = model.vision.state_dict()  # the Qwen-VL's blocks and patch embedding; its mergers are left behind
    model.vision.load_state_dict({k: v for k, v in qwen.vision.state_dict().items() if k in tower})
    dst.mkdir(parents=True, exist_ok=True)
    checkpoint.save(model.eval(), dst)
    for f in COPIED:
        if (src / f).exists() and (src / f).resolve() != (dst / f).resolve():
            shutil.copy(src / f, dst / f)
    (dst / "converted_from.json").write_text(json.dumps({"source": str(src), "model_type": c.kind,
                                                         "name": c.name}, indent=2))
    return model
