"""Qwen-VL checkpoints as published, in. Safetensors only (one file, or shards listed by
model.safetensors.index.json).

Key layouts seen: the hub's (`model.layers.`, `model.embed_tokens.`, `model.norm.`, `visual.`, `lm_head.`: what
Qwen's checkpoints hold and what transformers 5's save_pretrained still writes) and transformers 5's in-memory names
(`model.language_model.`, `model.visual.`, `lm_head.`). Both load; tied embeddings (no `lm_head` stored) too.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lavi.core.checkpoint import CheckpointError, empty_storage, fill, load_weights, no_init
from lavi.core.decoder import Decoder
from lavi.qwenvl.config import QwenVLConfig
from lavi.qwenvl.model import QwenVL

# (HF prefix, ours), most specific first
_PREFIXES = (("model.language_model.", "decoder."), ("model.visual.", "vision."), ("visual.", "vision."),
             ("lm_head.", "decoder.lm_head."), ("model.", "decoder."))


def ours(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF names (either layout) -> this module's names."""
    out = {}
    for key, value in weights.items():
        for hf, mine in _PREFIXES:
            if key.startswith(hf):
                out[mine + key[len(hf):]] = value
                break
        else:
            raise CheckpointError(f"Qwen-VL weight {key!r} is not part of the architecture this loader knows")
    return out


def load(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         config: QwenVLConfig | None = None) -> QwenVL:
    """A Qwen-VL directory -> QwenVL in eval mode. dtype None keeps the stored dtype."""
    d = Path(directory)
    config = config or QwenVLConfig.from_dir(d)
    weights = ours(load_weights(d))
    with no_init():  # every weight is loaded: none initialised
        with torch.device("meta"):
            decoder = Decoder(config.decoder)
        # the tower is made for real: its non-persistent buffers (rotary tables) are computed at construction (in
        # float32, then cast to the decoder's dtype, as the load always did); its weights' storage untouched till then
        model = QwenVL(config, decoder=empty_storage(decoder, weights, dtype))
    model.to(dtype=model.dtype)
    return fill(model, weights, config.decoder.tie_word_embeddings, f"Qwen-VL {d}", device, dtype)

