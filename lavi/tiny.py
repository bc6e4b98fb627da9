"""Tiny models for tests and the bundled tiny-shapes: a word-level tokenizer and small configs."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from . import checkpoint
from .config import DecoderConfig, LaViConfig, VisionConfig
from .model import LaVi

SPECIAL = ("<pad>", "<eos>", "<sep>", "<unk>")  # ids 0..3
TINY_WORDS = ("describe the image video . a small large red green blue yellow circle square triangle "
              "what color shape is there how many objects ? at top bottom left right center on in "
              "moves stays still and , one two three zero yes no").split()


def word_tokenizer(words: list[str]) -> HFTokenizer:
    """A word-level tokenizer: whitespace/punctuation split, one id per word, specials first."""
    vocab = {w: i for i, w in enumerate(SPECIAL)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, "left ," -> "left,"
    tok.add_special_tokens(list(SPECIAL))
    return tok


def save_word_tokenizer(words: list[str], directory: str | Path) -> HFTokenizer:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(words)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "sep_token": "<sep>"}, indent=2))
    return tok


def tiny_config(vocab_size: int, fusion: str = "viln", **options) -> LaViConfig:
    """A LaVi of a few hundred thousand parameters: seconds on CPU."""
    decoder = DecoderConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=4, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
                            max_position_embeddings=512)
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=2)
    base = dict(fusion=fusion, num_stages=2, cond_dim=32, cond_heads=2, max_frames=8, default_frames=4,
                prompt_template="{prompt} <sep>", eos_token_id=SPECIAL.index("<eos>"),
                pad_token_id=SPECIAL.index("<pad>"), name="tiny-random")
    base.update(options)
    return LaViConfig(decoder=decoder, vision=vision, **base)


def make_tiny_checkpoint(path: str | Path, seed: int = 0, fusion: str = "viln", **options) -> str:
    """Save a tiny random LaVi (with non-zero ViLN outputs, so images matter) for tests."""
    torch.manual_seed(seed)
    tok = save_word_tokenizer(list(TINY_WORDS), path)
    model = LaVi(tiny_config(tok.get_vocab_size(), fusion, **options))
    if model.viln is not None:
        for head in model.viln.heads.values():
            torch.nn.init.normal_(head.o_proj.weight, std=0.05)
    checkpoint.save(model, path)
    return str(path)


def tiny_shapes_config(vocab_size: int, fusion: str = "viln", default_frames: int = 4,
                       max_frames: int = 16) -> LaViConfig:
    """The bundled model's shape: ~1.9M parameters; 128x128 input in 21 px patches, a 6 x 6 grid of tokens a
    frame, 2 x 2 patches to a shapes-v1 cell. The earlier 42 px patch (one token a cell) lines up with the
    cells of an image, but a video's objects lie anywhere: a small object at a random offset inside a 42 px
    patch, seen through one linear patch embedding, had its shape named right 70% of the time
    (tests/test_tiny_shapes.py), which held video caption F1 at ~0.92. The last 2 px row and column fall
    outside the grid, as with SigLIP at 384/14."""
    decoder = DecoderConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_layers=4,
                            num_heads=4, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
                            max_position_embeddings=1024)
    vision = VisionConfig(image_size=128, patch_size=21, hidden_size=128, intermediate_size=384, num_layers=4,
                          num_heads=4)
    return LaViConfig(decoder=decoder, vision=vision, fusion=fusion, sites="both", num_stages=2, cond_dim=64,
                      cond_heads=4, max_frames=max_frames, default_frames=default_frames, prompt_template="{prompt} <sep>",
                      eos_token_id=SPECIAL.index("<eos>"), pad_token_id=SPECIAL.index("<pad>"),
                      name="tiny-shapes" if fusion == "viln" else "tiny-shapes-concat")
