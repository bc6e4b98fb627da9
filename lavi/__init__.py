"""LaVi: a vision-language model whose vision reaches the LLM only through modulated norms."""
from .config import DecoderConfig, LaViConfig, VisionConfig
from .model import LaVi

__all__ = ["DecoderConfig", "LaViConfig", "LaVi", "VisionConfig"]
