"""What loading does to a model before an engine serves it: weight-only int8 (`lavi.serving.quant`), a concat model's
visual compression (`lavi.visual_tokens.methods`), and on CPU the oneDNN-packed linear layers (`lavi.serving.cpu_pack`)."""
from __future__ import annotations

import logging

from lavi.visual_tokens.methods import VisualCompress, checked

log = logging.getLogger(__name__)


def prepare(model, quantize: str | None = None, visual_compress: str | VisualCompress | None = None,
            compile: bool = False, pack: bool | None = None):
    """The model, ready to serve. pack: None packs a CPU model's linear layers (float32, or bfloat16 where the CPU
    computes it natively: `cpu_pack.packable`) when this torch can and the decode step is not compiled
    (torch.compile traces plain weights); False never does."""
    return packed(compressed(quantized(model, quantize), visual_compress), pack, compile)


def quantized(model, mode: str | None):
    if mode:
        from lavi.serving.quant import quantize

        log.info("%s: %d decoder linear layers as weight-only %s", model.config.name, quantize(model, mode), mode)
    return model


def compressed(model, compress: str | VisualCompress | None):
    """Set a concat model's visual compression (`lavi.visual_tokens.methods`); refused for a model whose vision is not in its
    context (viln, vlora)."""
    if compress is None:
        return model
    vc = checked(compress, model.config.name, getattr(model.config, "fusion", type(model).__name__),
                 getattr(model, "compress_methods", None), bool(getattr(model, "vision_in_context", False)))
    model.visual_compress = vc
    log.info("%s: visual tokens compressed (%s)", model.config.name, vc.spelled())
    return model


def packed(model, pack: bool | None, compile: bool = False):
    from lavi.serving import cpu_pack

    if pack is False or model.device.type != "cpu" or not cpu_pack.packable(model.dtype) or compile:
        return model
    if not cpu_pack.available():
        if pack:
            raise ValueError("packed linear layers need torch's oneDNN (mkldnn), which this torch build lacks")
        return model
    n = cpu_pack.pack(model)
    if n:
        log.info("%s: %d linear layers packed for oneDNN (CPU, %s)", model.config.name, n,
                 str(model.dtype).removeprefix("torch."))
    return model
