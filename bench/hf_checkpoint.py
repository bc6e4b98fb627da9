"""What a Hugging Face vision-language checkpoint directory holds besides its weights, made here for checkpoints
built with transformers' `save_pretrained` (the tests' tiny ones, the benchmarks' real-size ones): a byte-level BPE
tokenizer trained by `tokenizers` with Qwen2's special tokens, and a Qwen2-style chat template."""
from __future__ import annotations

import json
from pathlib import Path

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>' }}{% elif content['type'] == 'text' %}"
    "{{ '\n' + content['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
CORPUS = ["a red circle on the left", "describe the image.", "what colour is the square?", "you are a helpful "
          "assistant", "system user assistant", "two blue triangles and a green star", "how many shapes are there?"]


def write_tokenizer(directory: Path, vocab_size: int = 300) -> dict[str, int]:
    """tokenizer.json + tokenizer_config.json; returns the special tokens' ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(directory / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "model_max_length": 4096, "chat_template": QWEN2_TEMPLATE,
              "extra_special_tokens": {"image_token": "<image>", "video_token": "<video>"},
              "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                "normalized": False, "single_word": False} for t, i in ids.items()}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ids
