"""Tiny models for tests and the bundled tiny-shapes (and its LLaVA-OneVision counterpart): a word-level tokenizer
and small configs."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from lavi.core import checkpoint
from lavi.core.config import VILN, DecoderConfig, LaViConfig, VisionConfig
from lavi.core.model import LaVi
from lavi.onevision.model import OneVision

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


def tiny_config(vocab_size: int, fusion: str = VILN, **options) -> LaViConfig:
    """A LaVi of a few hundred thousand parameters: seconds on CPU."""
    decoder = DecoderConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=4, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
                            max_position_embeddings=512)
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=2)
    base = dict(fusion=fusion, num_stages=2, cond_dim=32, cond_heads=2, gen_dim=32, gen_heads=2, lora_rank=4,
                lora_alpha=4.0, max_frames=8, default_frames=4,
                prompt_template="{prompt} <sep>", eos_token_id=SPECIAL.index("<eos>"),
                pad_token_id=SPECIAL.index("<pad>"), name="tiny-random")
    base.update(options)
    return LaViConfig(decoder=decoder, vision=vision, **base)


def make_tiny_checkpoint(path: str | Path, seed: int = 0, fusion: str = VILN, **options) -> str:
    """Save a tiny random LaVi (with non-zero ViLN outputs or VLoRA B, so images matter) for tests."""
    torch.manual_seed(seed)
    tok = save_word_tokenizer(list(TINY_WORDS), path)
    model = LaVi(tiny_config(tok.get_vocab_size(), fusion, **options))
    if model.viln is not None:
        for head in model.viln.heads.values():
            torch.nn.init.normal_(head.o_proj.weight, std=0.05)
    if model.vlora is not None:
        for b in model.vlora.B.values():
            torch.nn.init.normal_(b, std=0.05)
    checkpoint.save(model, path)
    return str(path)


def tiny_shapes_config(vocab_size: int, fusion: str = VILN, default_frames: int = 4,
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
                      cond_heads=4, gen_dim=64, gen_heads=4, gen_layers=2, lora_rank=8, lora_alpha=16.0,
                      max_frames=max_frames, default_frames=default_frames, prompt_template="{prompt} <sep>",
                      eos_token_id=SPECIAL.index("<eos>"), pad_token_id=SPECIAL.index("<pad>"),
                      name="tiny-shapes" if fusion == VILN else f"tiny-shapes-{fusion}")


# tiny-shapes' prompt format as a chat template: the image or video, then the prompt, then `<sep>`
SHAPES_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>' }}{% elif content['type'] == 'text' %}"
    "{{ ' ' + content['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' <sep>' }}{% endif %}"
)
MEDIA_TOKENS = ("<image>", "<video>")


def save_onevision_assets(words: list[str], directory: str | Path, size: int) -> dict[str, int]:
    """What a LLaVA-OneVision directory holds beside its weights, for a word-level tiny-shapes one: tokenizer.json
    (the word tokenizer plus `<image>` and `<video>`), tokenizer_config.json with the chat template, and
    LlavaOnevisionImageProcessor's preprocessor_config.json (one size x size pinpoint). Returns the special ids."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(words)
    tok.add_special_tokens(list(MEDIA_TOKENS))
    tok.save(str(d / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in (*SPECIAL, *MEDIA_TOKENS)}
    added = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for t, i in ids.items()}
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "pad_token": "<pad>",
         "unk_token": "<unk>", "sep_token": "<sep>", "bos_token": None, "model_max_length": 1024,
         "chat_template": SHAPES_CHAT_TEMPLATE, "added_tokens_decoder": added,
         "extra_special_tokens": {"image_token": "<image>", "video_token": "<video>"}}, indent=2))
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "LlavaOnevisionImageProcessor", "do_resize": True,
         "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
         "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_pad": True,
         "do_convert_rgb": True, "image_grid_pinpoints": [[size, size]]}, indent=2))
    return ids | {"vocab_size": tok.get_vocab_size()}


def tiny_shapes_onevision(words: list[str], directory: str | Path, default_frames: int = 4,
                          max_frames: int = 16) -> OneVision:
    """tiny-shapes' concat counterpart as a LLaVA-OneVision: the same decoder and ViT shapes (21 px patches, 6 x 6
    tokens a tile), a 2-layer projector from the ViT's last block, one 128 px pinpoint (an image: its base view
    and one crop, 36 + 42 tokens), videos pooled 2 x 2 (9 tokens a frame). Its assets go to `directory`."""
    from lavi.onevision.config import OneVisionConfig

    shapes = tiny_shapes_config(1)
    size = shapes.vision.image_size
    ids = save_onevision_assets(words, directory, size)
    decoder = dataclasses.replace(shapes.decoder, vocab_size=ids["vocab_size"])
    config = OneVisionConfig(
        decoder=decoder, vision=shapes.vision, feature_layers=(shapes.vision.num_layers,), select_strategy="full",
        projector_act="gelu", projector_bias=True, pinpoints=((size, size),), max_tiles=9,
        image_token_id=ids["<image>"], video_token_id=ids["<video>"], tile_size=size, resample=3,
        rescale_factor=1 / 255, image_mean=shapes.image_mean, image_std=shapes.image_std,
        eos_token_ids=(ids["<eos>"],), pad_token_id=ids["<pad>"], name="tiny-shapes-llava-ov",
        default_frames=default_frames, max_frames=max_frames, default_prompts=dict(shapes.default_prompts))
    model = OneVision(config)
    torch.nn.init.normal_(model.image_newline, std=0.02)
    return model
