"""Engines for tests whose assertions need rows to differ."""
from __future__ import annotations

import torch

from lavi.serving.engine import Engine
from lavi.serving.load_prep import packed


def widen(engine: Engine, seed: int = 2, pack: bool = True) -> Engine:
    """Every weight matrix past the ViT drawn again wider (std 0.5), so that rows generate different texts: at a
    tiny model's default init every row repeats one token, and no test of which row got whose tokens, or of which
    visual tokens were kept, could fail. The engine is loaded with pack=False (a packed linear has no weight to
    draw); pack: then pack it as loading would have (`lavi.serving.cpu_pack`)."""
    if any(type(m).__name__ == "PackedLinear" for m in engine.model.modules()):
        raise ValueError("widen: load the engine with pack=False (its packed linear layers have no weights to draw)")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in engine.model.named_parameters():
            if p.ndim == 2 and not name.startswith("vision"):
                p.normal_(std=0.5)
    if pack:
        packed(engine.model, None)
    return engine
