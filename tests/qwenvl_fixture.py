"""Tiny random Qwen-VL checkpoints saved the way a user downloads one: transformers' `save_pretrained` of
`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration` or `Qwen3VLForConditionalGeneration`, a
byte-level BPE tokenizer trained by `tokenizers` with the Qwen-VL special tokens, Qwen2-VL's chat template and the
image processor's preprocessor_config.json; and the tests' shared fixtures (the checkpoints, transformers' models,
our engines) and the transformers side of their comparisons: transformers' processors cannot be built here (their
video processor needs torchvision), so pixel values come from Qwen2VLImageProcessorPil and the expanded prompts from
the processors' own replace_image_token / replace_video_token.

Patches of 4 px merged 2 x 2 (so an image side is a multiple of 8), temporal patches of 2 frames; a 2-layer decoder
of width 32 whose M-RoPE sections (2, 1, 1) cover its head_dim of 8.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lavi.qwenvl.config import QwenVLConfig
from lavi.qwenvl.engine import QwenVLEngine

transformers = pytest.importorskip("transformers")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
CORPUS = ["a red circle on the left", "describe the image.", "what colour is the square?", "you are a helpful "
          "assistant", "system user assistant", "two blue triangles and a green star", "how many shapes are there?",
          "<0.5 seconds> <1.5 seconds> <2.0 seconds> <12.3 seconds>"]
# Qwen2-VL-Instruct's chat template (Qwen2.5-VL and Qwen3-VL write the image and video the same way)
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PATCH, MERGE, TEMPORAL = 4, 2, 2


def write_tokenizer(directory: Path, vocab_size: int = 300) -> dict[str, int]:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja); returns the special tokens' ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Qwen2's own pre-tokenizer (what its tokenizer.json holds, and transformers' Qwen2Tokenizer builds whatever
    # the file says): digits one by one, so "<12.0 seconds>" tokenises alike alone and after a special token
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(directory / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIALS}
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "model_max_length": 4096,
              "extra_special_tokens": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                       "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
              "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                "normalized": False, "single_word": False} for t, i in ids.items()}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "chat_template.jinja").write_text(QWEN_VL_TEMPLATE)
    return ids


def hf_config(kind: str, ids: dict[str, int], vocab: int, flat: bool = False, tie: bool = False) -> dict:
    """The config.json dict of a tiny checkpoint of `kind`; flat: Qwen2-VL/2.5-VL's older hub layout (the text
    fields at the top level, M-RoPE under rope_scaling as {"type": "mrope"})."""
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    vision = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                  in_channels=3)
    if kind == "qwen2_vl":
        vision.update(embed_dim=16, hidden_size=32, mlp_ratio=2)
    elif kind == "qwen2_5_vl":
        vision.update(hidden_size=16, intermediate_size=24, out_hidden_size=32, window_size=16,
                      fullatt_block_indexes=[1], tokens_per_second=2)
    else:
        vision.update(hidden_size=16, intermediate_size=24, out_hidden_size=32, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
        text.update(head_dim=8)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    if kind == "qwen3_vl":
        rope["mrope_interleaved"] = True
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if flat:
        return dict(model_type=kind, **text, rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
                    vision_config=vision, tie_word_embeddings=tie, **special)
    return dict(model_type=kind, text_config=dict(text, rope_parameters=rope), vision_config=vision,
                tie_word_embeddings=tie, **special)


def make_qwenvl(directory: str | Path, kind: str, seed: int = 0, flat: bool = False, tie: bool = False) -> Path:
    """Write a tiny checkpoint of `kind` (qwen2_vl, qwen2_5_vl, qwen3_vl) to `directory` and return it."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    names = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}[kind]
    config_cls = getattr(transformers, f"{names}Config")
    model_cls = getattr(transformers, f"{names}ForConditionalGeneration")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(d)
    vocab = len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"])
    config = config_cls(**hf_config(kind, ids, vocab, flat=flat, tie=tie))
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # random init is near-degenerate at these sizes: widen it so tokens differ
        for name, p in model.named_parameters():
            if "norm" not in name and p.ndim >= 1:
                p.normal_(0, 0.15 if p.ndim > 1 else 0.05)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)  # q_norm / k_norm / layer norms away from 1, so a missing norm shows
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(d)
    if flat:  # rewrite config.json in the older hub layout, as Qwen2-VL's and Qwen2.5-VL's hubs hold it
        saved = json.loads((d / "config.json").read_text())
        flat_config = hf_config(kind, ids, vocab, flat=True, tie=tie)
        flat_config["vision_config"] = saved["vision_config"]
        (d / "config.json").write_text(json.dumps(flat_config, indent=2))
    size = {"shortest_edge": 8 * 8, "longest_edge": 64 * 64}
    Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, size=size,
                             ).save_pretrained(d)
    return d


def make_fixed_answer_qwenvl(directory: str | Path, kind: str = "qwen2_vl", answer: str = "square",
                             seed: int = 0) -> Path:
    """A tiny Qwen-VL whose greedy answer to every prompt and image is `answer` then EOS: a teacher whose rows end (a
    random one never emits EOS, so all its rows are truncated and a student has nothing finished to learn from).

    Every decoder layer's o_proj and down_proj are zeroed (weights and any biases), so no layer adds to the residual
    stream and the last norm sees the current token's embedding: the next token depends on the current one alone.
    lm_head is then zero but for the rows of the answer's tokens and EOS, solved so that the generation prompt's
    last token maps to the answer's first token, each answer token to the next, and the last one to EOS."""
    d = make_qwenvl(directory, kind, seed=seed)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    turn = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    chain = [tok(turn)["input_ids"][-1], *tok(answer)["input_ids"], tok.convert_tokens_to_ids("<|im_end|>")]
    if len(set(chain[:-1])) < len(chain) - 1:  # a token met twice would map to two successors
        raise ValueError(f"{answer!r} repeats a token (or the generation prompt's last one): choose another answer")
    model = transformers.AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32)
    lm, head = model.model.language_model, model.get_output_embeddings().weight
    assert head.data_ptr() != lm.embed_tokens.weight.data_ptr(), "make_qwenvl(tie=False) keeps lm_head its own"
    with torch.no_grad():
        for name, p in lm.layers.named_parameters():
            if ".o_proj." in name or ".down_proj." in name:
                p.zero_()
        h = lm.norm(lm.embed_tokens(torch.tensor(chain[:-1])))  # (n, d): lm_head's input after each source token
        n = h.shape[0]
        want = 20.0 * torch.eye(n) - 10.0  # (n targets, n sources): +10 for a source's successor, -10 otherwise
        head.zero_()  # every other token's logit is 0
        head[chain[1:]] = want @ torch.linalg.pinv(h.T)  # rows (n, d) with rows @ h.T == want (h's rows independent)
    model.save_pretrained(d)
    return d


# -- what the tests share ---------------------------------------------------------------------------------------------
SIZES = [(24, 40), (64, 16), (8, 8), (56, 48)]  # (height, width), multiples of 8 (patch 4, merge 2)
# the checkpoints: every kind nested (transformers 5's layout), Qwen2-VL and Qwen2.5-VL also flat (the hub's)
VARIANTS = [("qwen2_vl", False), ("qwen2_vl", True), ("qwen2_5_vl", False), ("qwen2_5_vl", True), ("qwen3_vl", False)]
PROMPT = "describe the image."


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {(k, flat): make_qwenvl(tmp_path_factory.mktemp(f"{k}-{int(flat)}") / "tiny", k, seed=1, flat=flat)
            for k, flat in VARIANTS}


@pytest.fixture(scope="module")
def hf_models(dirs):
    return {key: transformers.AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
            for key, d in dirs.items() if not key[1]}


@pytest.fixture(scope="module")
def engines(dirs):
    return {key: QwenVLEngine.load(str(d), max_batch=8) for key, d in dirs.items()}


def image(size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    img[: size[0] // 2] //= 2  # some structure
    return img


def reference_pixels(d, img: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Qwen2VLImageProcessorPil.from_pretrained(d)(images=Image.fromarray(img), return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def reference_ids(d, media: str, grid, times: list[float] | None = None, kind: str = "qwen2_vl",
                  prompt: str = PROMPT) -> list[int]:
    """The processor's expanded prompt: the chat template's turn, its placeholder replaced by the processor's own
    replace_image_token / replace_video_token (Qwen3-VL: the template's start/end pair collapsed first), tokenised by
    transformers' tokenizer."""
    tok = transformers.AutoTokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": prompt}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ns = SimpleNamespace(image_processor=SimpleNamespace(merge_size=2), image_token="<|image_pad|>",
                         video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
                         video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
                         vision_end_token="<|vision_end|>")
    grid_t = torch.tensor([grid])
    if media == "image":
        text = text.replace("<|image_pad|>", transformers.Qwen2VLProcessor.replace_image_token(
            ns, {"image_grid_thw": grid_t}, 0))
    elif kind == "qwen3_vl":
        proc = transformers.Qwen3VLProcessor
        ns._calculate_timestamps = lambda *a: proc._calculate_timestamps(ns, *a)
        fps = 2.0  # frames at times[i] = index / fps
        meta = SimpleNamespace(fps=fps, frames_indices=[round(t * fps) for t in times])
        text = text.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")
        text = text.replace("<|video_pad|>", proc.replace_video_token(
            ns, {"video_grid_thw": grid_t, "video_metadata": [meta]}, 0))
    else:
        text = text.replace("<|video_pad|>", transformers.Qwen2VLProcessor.replace_video_token(
            ns, {"video_grid_thw": grid_t}, 0))
    return tok(text)["input_ids"]


def mm_types(ids: torch.Tensor, c: QwenVLConfig) -> torch.Tensor:
    return (ids == c.image_token_id).long() + 2 * (ids == c.video_token_id).long()



def reference_text(d: Path, hf, path: Path, prompt: str, new_tokens: int) -> str:
    """transformers' greedy answer to `prompt` about the image file: its PIL image processor on the file as PIL opens
    it, the chat template's prompt expanded by the processor's rule, generate(), decoded without special tokens."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    with Image.open(path) as im:
        out = Qwen2VLImageProcessorPil.from_pretrained(d)(images=im.convert("RGB"), return_tensors="pt")
    kind = hf.config.model_type
    ids = torch.tensor([reference_ids(d, "image", out["image_grid_thw"][0].tolist(), kind=kind, prompt=prompt)])
    with torch.no_grad():
        gen = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=out["pixel_values"],
                          image_grid_thw=out["image_grid_thw"], mm_token_type_ids=mm_types(ids, hf.config),
                          max_new_tokens=new_tokens, do_sample=False)
    tokens = gen[0, ids.shape[1]:].tolist()
    eos = hf.generation_config.eos_token_id
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
    return transformers.AutoTokenizer.from_pretrained(d).decode(tokens, skip_special_tokens=True)
