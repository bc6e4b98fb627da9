"""Checkpoints: Hugging Face format backbones in, LaVi directories in and out. Safetensors only.

A LaVi checkpoint is a directory: config.json (the LaVi config, both backbone configs inside),
model.safetensors, tokenizer.json (+ tokenizer_config.json). Nothing is unpickled and no remote
code runs: a directory that only has .bin/.pt weights is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lavi.core.config import DecoderConfig, LaViConfig, VisionConfig
from lavi.core.decoder import Decoder
from lavi.core.model import LaVi
from lavi.families import CheckpointError
from lavi.core.vision import VisionTower

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _need(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"checkpoint file missing: {path} (expected in {path.parent})")
    return path


def read_json(path: Path) -> dict:
    return json.loads(_need(path).read_text())


def load_weights(directory: str | Path) -> dict[str, Tensor]:
    """All tensors of a directory: model.safetensors, or shards listed by model.safetensors.index.json."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}")
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        pickled = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(f"{d} has only pickled weights ({', '.join(pickled)}); they are refused because "
                                  "unpickling can run code. Convert them to safetensors (model.safetensors).")
        raise CheckpointError(f"checkpoint file missing: {d / 'model.safetensors'} (nor a sharded index)")
    weights: dict[str, Tensor] = {}
    for name in files:
        weights.update(load_file(str(_need(d / name))))
    return weights


def _assign(module: nn.Module, weights: dict[str, Tensor], what: str, optional: tuple[str, ...] = ()) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in weights and not k.startswith(optional)]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{what}: weights do not match the config; missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    module.load_state_dict(weights, strict=False)


INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                  "xavier_normal_", "constant_", "zeros_", "ones_", "orthogonal_")


@contextlib.contextmanager
def no_init():
    """Modules built inside are not initialised (torch.nn.init's functions leave the tensor as it is), for a model
    whose every weight a checkpoint then fills (`fill` checks that): a real tower's random init is seconds of CPU at
    real sizes, and on the meta device an Embedding's normal_ runs through torch's Python reference, whose first call
    imports torch._dynamo (1.7 s of a CPU labeler's start). Non-persistent buffers (rotary tables) are still computed."""
    saved = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS}
    try:
        for name in INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def stored_dtype(weights: dict[str, Tensor]) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (its first tensor's): what a load with dtype None computes in."""
    return next(iter(weights.values())).dtype


def empty_storage(model: nn.Module, weights: dict[str, Tensor], dtype: torch.dtype | None) -> nn.Module:
    """A model built on the meta device -> on uninitialised CPU storage in the dtype it will compute in (`dtype`, None:
    the checkpoint's): a bf16 checkpoint filled into float32 storage and cast after costs twice its memory and a
    conversion each way. torch.empty per tensor, not Module.to_empty: its empty_like of a meta tensor goes through
    torch's Python references, whose first use imports sympy and the meta registrations (~1 s of a labeler's start)."""
    dtype = dtype or stored_dtype(weights)
    return model._apply(lambda t: torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype,
                                              device="cpu"))


def fill(model: nn.Module, weights: dict[str, Tensor], tied: bool, what: str, device, dtype: torch.dtype | None):
    """A model made on empty storage (in its target dtype already: `empty_storage`), given a checkpoint's whole state
    (our names) -> it in eval mode on `device`, in `dtype` (None: the stored one). Every weight must be there with
    config.json's shape (tied: the head is the embedding's); `what` names the checkpoint in the refusal."""
    if tied:
        weights.pop("decoder.lm_head.weight", None)
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not (tied and k == "decoder.lm_head.weight")]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{what}: weights do not match config.json; missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, v in weights.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{what}: {k} is {tuple(v.shape)}, config.json says {tuple(own[k].shape)}")
    model.load_state_dict(weights, strict=False)
    if tied:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    return model.to(device=device, dtype=dtype or stored_dtype(weights)).eval()


def load_decoder(directory: str | Path, dtype: torch.dtype = torch.float32) -> Decoder:
    """A Qwen2ForCausalLM / LlamaForCausalLM directory -> our Decoder (HF names minus `model.`)."""
    d = Path(directory)
    config = DecoderConfig.from_hf(read_json(d / "config.json"))
    weights = {k.removeprefix("model."): v for k, v in load_weights(d).items()}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    decoder = Decoder(config)
    _assign(decoder, weights, f"decoder {d}", optional=("lm_head",) if config.tie_word_embeddings else ())
    return decoder.to(dtype)


def load_vision(directory: str | Path, dtype: torch.dtype = torch.float32) -> VisionTower:
    """A SiglipVisionModel (or full SiglipModel) directory -> our VisionTower. The pooling head is dropped."""
    d = Path(directory)
    config = VisionConfig.from_hf(read_json(d / "config.json"))
    weights = {k.removeprefix("vision_model."): v for k, v in load_weights(d).items()
               if not k.startswith(("text_model.", "logit_")) and not k.startswith(("vision_model.head.", "head."))}
    tower = VisionTower(config)
    _assign(tower, weights, f"vision tower {d}")
    return tower.to(dtype)


def save(model: LaVi, directory: str | Path, tokenizer_dir: str | Path | None = None) -> None:
    """Write config.json + model.safetensors (+ the tokenizer files) to a directory; bit-exact with `load`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.decoder.tie_word_embeddings:
        state.pop("decoder.lm_head.weight", None)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt", "lavi_fusion": model.config.fusion})
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != d.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy(Path(tokenizer_dir) / name, d / name)


def load(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LaVi:
    """A LaVi checkpoint directory -> LaVi in eval mode. dtype None keeps the stored dtype."""
    d = Path(directory)
    config = LaViConfig.from_dict(read_json(d / "config.json"))
    weights = load_weights(d)
    with no_init(), torch.device("meta"):
        model = model_class(config)(config)
    model = empty_storage(model, weights, dtype)
    optional = ("decoder.lm_head",) if config.decoder.tie_word_embeddings else ()
    _assign(model, weights, f"LaVi {d}", optional=optional)
    if config.decoder.tie_word_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    return model.to(device=device).eval()


def model_class(config: LaViConfig) -> type[LaVi]:
    """The LaVi module of a config: over a square SigLIP tower, or (with a processor config) a Qwen-VL's ViT."""
    if config.processor is None:
        return LaVi
    from lavi.qwenvl.lavi_model import QwenLaVi

    return QwenLaVi


def with_fusion(model: LaVi, fusion: str) -> LaVi:
    """A fresh LaVi for training: `model`'s decoder and vision tower (their weights shared, not copied), a new
    `fusion` at its own init (zero outputs: exactly the base LLM), its hyper-parameters from `model`'s config."""
    config = dataclasses.replace(model.config, fusion=fusion, name=f"{model.config.name}-{fusion}")
    return LaVi(config, decoder=model.decoder, vision=model.vision).to(model.device, model.dtype).train()


def from_backbones(decoder_dir: str | Path, vision_dir: str | Path, **options) -> LaVi:
    """A fresh LaVi for training: both backbones loaded from HF directories, the fusion initialised
    (ViLN's output heads at zero, so it starts as exactly the base LLM). `options` go to LaViConfig."""
    decoder, tower = load_decoder(decoder_dir), load_vision(vision_dir)
    config = LaViConfig(decoder=decoder.config, vision=tower.config, **options)
    model = LaVi(config)
    model.decoder.load_state_dict(decoder.state_dict())
    model.vision.load_state_dict(tower.state_dict())
    return model
