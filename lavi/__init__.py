"""LaVi: a vision-language model whose vision reaches the LLM only through modulated norms.

Importing the package loads no torch: the driver reads configs (`lavi.core.config`) and the bundled
paths (`lavi.bundled`) without it. `LaVi` itself loads on first use.
"""
from lavi.core.config import DecoderConfig, LaViConfig, VisionConfig

__all__ = ["DecoderConfig", "LaViConfig", "LaVi", "VisionConfig"]


def __getattr__(name: str):
    if name == "LaVi":  # torch, on demand
        from lavi.core.model import LaVi

        return LaVi
    raise AttributeError(f"module 'lavi' has no attribute {name!r}")
