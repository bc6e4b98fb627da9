"""LLaVA-OneVision checkpoints in the Hugging Face layout, in and out. Safetensors only.

Key layouts seen: the public llava-hf checkpoints' (`vision_tower.vision_model.`, `multi_modal_projector.`,
`image_newline`, `language_model.model.`, `language_model.lm_head.`), what transformers 5 saves (the same with
`vision_tower.` for the tower) and its in-memory names (`model.` in front, `lm_head.`). All load; `save`
writes the hub layout, which every transformers version reads.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from lavi.core.checkpoint import CheckpointError, empty_storage, fill, load_weights, no_init
from lavi.onevision.model import OneVision
from lavi.onevision.config import MODEL_TYPE, OURS, OneVisionConfig

# (HF prefix, ours), most specific first
_PREFIXES = (
    ("vision_tower.vision_model.", "vision."), ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."), ("vision_tower.", "vision."),
    ("multi_modal_projector.", "projector."), ("model.multi_modal_projector.", "projector."),
    ("image_newline", "image_newline"), ("model.image_newline", "image_newline"),
    ("language_model.model.", "decoder."), ("model.language_model.", "decoder."),
    ("language_model.lm_head.", "decoder.lm_head."), ("lm_head.", "decoder.lm_head."),
)
_SAVED = 0, 4, 6, 8, 10  # the hub layout, which every transformers version loads
_DROPPED = ("vision.head.",)  # SigLIP's pooling head: LLaVA-OneVision never uses it


def ours(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF names (either layout) -> this module's names."""
    out = {}
    for key, value in weights.items():
        for hf, mine in _PREFIXES:
            if key.startswith(hf):
                name = mine + key[len(hf):]
                break
        else:
            raise CheckpointError(f"LLaVA-OneVision weight {key!r} is not part of the architecture this loader knows")
        if not name.startswith(_DROPPED):
            out[name] = value
    return out


def load(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         config: OneVisionConfig | None = None) -> OneVision:
    """A LLaVA-OneVision directory -> OneVision in eval mode. dtype None keeps the stored dtype."""
    d = Path(directory)
    config = config or OneVisionConfig.from_dir(d)
    weights = ours(load_weights(d))
    with no_init(), torch.device("meta"):
        model = OneVision(config)
    model = empty_storage(model, weights, dtype)
    return fill(model, weights, config.decoder.tie_word_embeddings, f"LLaVA-OneVision {d}", device, dtype)


def hf_config(model: OneVision) -> dict:
    """config.json for a OneVision built here (a model trained by this project, saved for transformers)."""
    c = model.config
    dc, vc = c.decoder, c.vision
    text = {"model_type": "qwen2", "vocab_size": dc.vocab_size, "hidden_size": dc.hidden_size,
            "intermediate_size": dc.intermediate_size, "num_hidden_layers": dc.num_layers,
            "num_attention_heads": dc.num_heads, "num_key_value_heads": dc.num_kv_heads, "head_dim": dc.head_dim,
            "rope_theta": dc.rope_theta, "rms_norm_eps": dc.rms_norm_eps, "hidden_act": "silu",
            "max_position_embeddings": dc.max_position_embeddings, "tie_word_embeddings": dc.tie_word_embeddings,
            "eos_token_id": c.eos_token_ids[0], "pad_token_id": c.pad_token_id, "use_sliding_window": False}
    vision = {"model_type": "siglip_vision_model", "image_size": vc.image_size, "patch_size": vc.patch_size,
              "hidden_size": vc.hidden_size, "intermediate_size": vc.intermediate_size,
              "num_hidden_layers": vc.num_layers, "num_attention_heads": vc.num_heads,
              "layer_norm_eps": vc.layer_norm_eps, "num_channels": vc.num_channels, "vision_use_head": False,
              "hidden_act": "gelu_pytorch_tanh"}
    return {"model_type": MODEL_TYPE, "architectures": ["LlavaOnevisionForConditionalGeneration"],
            "text_config": text, "vision_config": vision, "vision_feature_layer": list(c.feature_layers),
            "vision_feature_select_strategy": c.select_strategy, "projector_hidden_act": c.projector_act,
            "multimodal_projector_bias": c.projector_bias, "image_grid_pinpoints": [list(p) for p in c.pinpoints],
            "vision_aspect_ratio": f"anyres_max_{c.max_tiles}", "image_token_index": c.image_token_id,
            "video_token_index": c.video_token_id, "tie_word_embeddings": dc.tie_word_embeddings,
            OURS: {"default_frames": c.default_frames, "max_frames": c.max_frames,
                   **({"default_prompts": c.default_prompts} if c.default_prompts else {})}}


ASSETS = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
          "preprocessor_config.json", "processor_config.json", "special_tokens_map.json")


def save(model: OneVision, directory: str | Path, assets: str | Path | None = None) -> None:
    """config.json, generation_config.json and model.safetensors in the hub layout; the tokenizer, chat template
    and preprocessor files are copied from `assets` (where the model's processor came from), if given."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if assets is not None and Path(assets).resolve() != d.resolve():
        for name in ASSETS:
            if (Path(assets) / name).exists():
                shutil.copyfile(Path(assets) / name, d / name)
    c = model.config
    (d / "config.json").write_text(json.dumps(hf_config(model), indent=2))
    (d / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": list(c.eos_token_ids), "pad_token_id": c.pad_token_id}, indent=2))
    back = {_PREFIXES[i][1]: _PREFIXES[i][0] for i in _SAVED}
    state = {}
    for key, value in model.state_dict().items():
        if key == "decoder.lm_head.weight" and model.config.decoder.tie_word_embeddings:
            continue
        mine = max((m for m in back if key.startswith(m)), key=len)
        state[back[mine] + key[len(mine):]] = value.detach().contiguous()
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
