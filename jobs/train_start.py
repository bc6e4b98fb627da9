"""What `lavi-label train` starts from (jobs.train): a resumed run, a checkpoint to fine-tune (or another fusion on
its backbones), Hugging Face backbones, or tiny-shapes from scratch."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from lavi.families import LLAVA_OV

log = logging.getLogger(__name__)


def build(out: Path, fusion: str, decoder: str | None, vision: str | None, resume: bool, frames: dict,
           init: str | None = None) -> tuple:
    """The model to train and its tokenizer directory: resumed, fine-tuned from a checkpoint (`init`), from
    backbones, or tiny-shapes (or, `llava-ov`, its LLaVA-OneVision counterpart) from scratch. A new model takes its
    default and max frames per clip from `frames` (those it is trained on); a fine-tuned one keeps its own."""
    import torch

    from lavi.core import checkpoint
    from lavi.families import load_model
    from lavi.onevision.model import OneVision
    from lavi.tiny_models import save_word_tokenizer, tiny_shapes_config, tiny_shapes_onevision
    from lavi.training.train import init_from_scratch
    if resume and (out / "train_state.json").exists():
        return load_model(out, dtype=torch.float32), out  # any family's checkpoint, in float32 for training
    if init:
        if decoder or vision:
            raise click.UsageError("--init starts from a whole checkpoint: leave out --decoder and --vision")
        model = load_model(init, dtype=torch.float32)
        kind = LLAVA_OV if isinstance(model, OneVision) else model.config.fusion
        if kind != fusion and LLAVA_OV in (kind, fusion):
            raise click.UsageError(f"--init {init} is a {kind} model: pass --fusion {kind}")
        if kind != fusion:  # another fusion on this LaVi's trained backbones (as VLoRA is built: on a trained LLM, ViT)
            log.info("a new %s fusion on %s's decoder, ViT and tokenizer", fusion, init)
            return checkpoint.with_fusion(model, fusion), Path(init)
        return model, Path(init)  # train() puts it in training mode
    if decoder or vision:
        if fusion == LLAVA_OV:
            raise click.UsageError("--fusion llava-ov trains tiny-shapes' LLaVA-OneVision from scratch, or fine-tunes "
                                   "one (--init DIR): it takes no --decoder or --vision")
        if not (decoder and vision):
            raise click.UsageError("--decoder and --vision go together (two local Hugging Face directories)")
        return checkpoint.from_backbones(decoder, vision, fusion=fusion, **frames), Path(decoder)
    from shapes.spec import vocabulary
    tok_dir = out / "_tokenizer"
    if fusion == LLAVA_OV:
        model = tiny_shapes_onevision(vocabulary(), tok_dir, **frames)
    else:
        tok = save_word_tokenizer(vocabulary(), tok_dir)
        model = checkpoint.LaVi(tiny_shapes_config(tok.get_vocab_size(), fusion, **frames))
    init_from_scratch(model)
    return model, tok_dir
