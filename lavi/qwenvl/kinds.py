"""The Qwen-VL line's model types (config.json's `model_type`), spelled once for the family, and the visual
compressions it takes. Torch-free; imports only the compression methods' names.

MODEL_TYPES are those this package implements (the config, the tower, the processors' defaults key on them);
REFUSED are the line's siblings it claims only to refuse them by name, with what each lacks here (lavi.families
registers the family by both, so that such a checkpoint is not mistaken for an unknown one).
"""
from __future__ import annotations

from lavi.visual_tokens.methods import FASTV

QWEN2_VL, QWEN2_5_VL, QWEN3_VL = "qwen2_vl", "qwen2_5_vl", "qwen3_vl"
MODEL_TYPES = (QWEN2_VL, QWEN2_5_VL, QWEN3_VL)
REFUSED = {"qwen3_vl_moe": "its mixture-of-experts decoder", "qwen3_5": "its linear-attention (Gated DeltaNet) layers",
           "qwen3_5_moe": "its linear-attention layers and mixture-of-experts decoder",
           "qwen2_5_omni": "its audio and speech parts", "qwen3_omni_moe": "its audio parts and mixture-of-experts"}
# `--visual-compress`: FastV only. dct low-passes each item's grid of visual tokens to a square R x R one, made for a
# fixed-resolution tower's square tiles; a Qwen's grids are each item's own h x w, which its M-RoPE positions follow
COMPRESS_METHODS = (FASTV,)
