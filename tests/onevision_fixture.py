"""A tiny random LLaVA-OneVision saved the way a user downloads one: transformers' `save_pretrained` of
`LlavaOnevisionForConditionalGeneration`, a byte-level BPE tokenizer trained by `tokenizers` with Qwen2's
special tokens, a Qwen2-style chat template and LlavaOnevisionImageProcessor's preprocessor_config.json.

SigLIP 35 px / 7 px patches (a 5 x 5 grid: odd, so video pooling rounds up), anyres pinpoints of 35 px tiles up
to 105 x 70 and anyres_max_2 (so large images are shrunk, small ones are not).
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.hf_checkpoint import CORPUS, QWEN2_TEMPLATE, SPECIALS, write_tokenizer  # noqa: F401 (the tests' names)

PINPOINTS = [[35, 35], [35, 70], [70, 35], [70, 70], [35, 105], [105, 35], [70, 105], [105, 70]]


def make_onevision(directory: str | Path, seed: int = 0, feature_layer: int | list[int] = -1,
                   strategy: str = "full", tie: bool = False, max_tiles: int = 2) -> Path:
    """Write the tiny checkpoint to `directory` and return it."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(d)
    vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    text = dict(model_type="qwen2", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_theta=10000.0, tie_word_embeddings=tie, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    vision = dict(model_type="siglip_vision_model", image_size=35, patch_size=7, hidden_size=24, intermediate_size=48,
                  num_hidden_layers=3, num_attention_heads=2, vision_use_head=False)
    config = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                                  video_token_index=ids["<video>"], vision_feature_layer=feature_layer,
                                  vision_feature_select_strategy=strategy, image_grid_pinpoints=PINPOINTS,
                                  vision_aspect_ratio=f"anyres_max_{max_tiles}", tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():  # random init is near-degenerate at these sizes: widen it so tokens differ
        for name, p in model.named_parameters():
            if "norm" not in name and p.ndim >= 1:
                p.normal_(0, 0.15 if p.ndim > 1 else 0.05)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(d)
    LlavaOnevisionImageProcessorPil(size={"height": 35, "width": 35}, image_grid_pinpoints=PINPOINTS).save_pretrained(d)
    return d
