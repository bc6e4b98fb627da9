"""`convert`: a LaVi from a LLaVA-OneVision checkpoint. Where a real LaVi starts.

The LaVi keeps the LLaVA-OneVision's SigLIP tower, Qwen2 decoder, tokenizer, chat template (stored in its
config: prompts are one user turn with no image in it), EOS ids and image normalisation. Its ViLN conditioner
is new: stages tapped from the tower's layers (evenly spaced, the deepest last), output heads zero-initialised,
so at step 0 it is exactly the LLaVA-OneVision's decoder on the text alone. The projector and image_newline
are left behind (no visual token enters a LaVi's context). Training makes the vision count:
`lavi-label train --init LAVI_DIR ...`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lavi.core import checkpoint
from lavi.onevision import checkpoint as onevision_checkpoint
from lavi.serving.chat_template import find_template, special_tokens
from lavi.core.config import VILN, LaViConfig
from lavi.core.model import LaVi
from lavi.onevision.config import DEFAULT_PROMPTS, MODEL_TYPE

COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
          "generation_config.json")


def convert(source: str | Path, out: str | Path, num_stages: int = 4, cond_dim: int = 256, cond_heads: int = 4,
            sites: str = "both", layer_stride: int = 1, seed: int = 0, name: str | None = None) -> LaVi:
    """Write a LaVi checkpoint built from the LLaVA-OneVision at `source` to `out`; returns the model."""
    src, dst = Path(source), Path(out)
    ov = onevision_checkpoint.load(src, dtype=torch.float32)
    c = ov.config
    template = find_template(src)
    if template is None:
        raise checkpoint.CheckpointError(f"{src} has no chat template: a converted LaVi prompts through it")
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").exists() else {}
    config = LaViConfig(decoder=c.decoder, vision=c.vision, fusion=VILN, sites=sites, layer_stride=layer_stride,
                        num_stages=min(num_stages, c.vision.num_layers), cond_dim=cond_dim, cond_heads=cond_heads,
                        max_frames=c.max_frames, default_frames=c.default_frames, image_mean=c.image_mean,
                        image_std=c.image_std, chat_template=template, chat_tokens=special_tokens(tok_cfg),
                        eos_token_id=c.eos_token_ids[0], eos_token_ids=c.eos_token_ids, pad_token_id=c.pad_token_id,
                        default_prompts=dict(c.default_prompts or DEFAULT_PROMPTS),
                        name=name or f"lavi-{c.name}")
    torch.manual_seed(seed)
    model = LaVi(config)
    model.decoder.load_state_dict(ov.decoder.state_dict())
    model.vision.load_state_dict(ov.vision.state_dict())
    dst.mkdir(parents=True, exist_ok=True)
    checkpoint.save(model.eval(), dst)
    for f in COPIED:
        if (src / f).exists() and (src / f).resolve() != (dst / f).resolve():
            shutil.copy(src / f, dst / f)
    (dst / "converted_from.json").write_text(json.dumps({"source": str(src), "model_type": MODEL_TYPE,
                                                         "name": c.name}, indent=2))
    return model
