"""Parity of our backbones with the transformers reference implementations, on tiny random configs."""
from __future__ import annotations

import pytest
import torch
import transformers
from torch.testing import assert_close

from lavi.core.checkpoint import load_decoder, load_vision
from lavi.core.model import attention_mask

TOL = dict(atol=2e-5, rtol=1e-4)


def _decoder_logits(decoder, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    b, t = ids.shape
    valid = torch.ones(b, t, dtype=torch.bool)
    slots = torch.arange(t)
    positions = slots[None].expand(b, t)
    return decoder(decoder.embed_tokens(ids), positions, attention_mask(valid, slots, valid),
                   output_hidden_states=True)


DECODERS = {
    "qwen2-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   dict(tie_word_embeddings=True)),
    "qwen2-untied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                     dict(tie_word_embeddings=False, rope_theta=1e6)),
    "llama-bias-headdim": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                           dict(attention_bias=True, mlp_bias=True, head_dim=24, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_matches_transformers(tmp_path, name):
    """Guards against a mis-mapped weight, a wrong RoPE layout, GQA grouping or bias handling."""
    cfg_cls, model_cls, extra = DECODERS[name]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra)
    ref = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so a dropped one shows
        for n, p in ref.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_decoder(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        logits, hidden = _decoder_logits(ours, ids)
    assert_close(logits, want.logits, **TOL)
    assert len(hidden) == len(want.hidden_states)
    for a, b in zip(hidden, want.hidden_states):
        assert_close(a, b, **TOL)


@pytest.mark.parametrize("image_size", [32, 36])
def test_vision_matches_transformers(tmp_path, image_size):
    """Guards against a mis-mapped ViT weight, wrong patch order, GELU variant or post-norm placement,
    and against refusing sizes the patch does not divide (SigLIP-so400m is 384 px in 14 px patches)."""
    torch.manual_seed(0)
    cfg = transformers.SiglipVisionConfig(image_size=image_size, patch_size=8, hidden_size=48, intermediate_size=96,
                                          num_hidden_layers=3, num_attention_heads=4)
    ref = transformers.SiglipVisionModel(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_vision(tmp_path).eval()
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True)
        last, taps = ours(pixels, taps=[0, 1, 2])
    assert_close(last, want.last_hidden_state, **TOL)
    for i, tap in enumerate(taps):
        assert_close(tap, want.hidden_states[i + 1], **TOL)
