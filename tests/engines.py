"""Engines for tests whose assertions need rows to differ."""
from __future__ import annotations

import torch

from lavi.engine import Engine


def widen(engine: Engine, seed: int = 2) -> Engine:
    """Every weight matrix past the ViT drawn again wider (std 0.5), so that rows generate different texts: at a
    tiny model's default init every row repeats one token, and no test of which row got whose tokens, or of which
    visual tokens were kept, could fail."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in engine.model.named_parameters():
            if p.ndim == 2 and not name.startswith("vision"):
                p.normal_(std=0.5)
    return engine
