"""The bundled checkpoints' directories. Torch-free: the driver reads these paths without loading the model."""
from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
DEFAULT_MODEL = str(WEIGHTS / "tiny-shapes")
TINY_SHAPES_LLAVA_OV = str(WEIGHTS / "tiny-shapes-llava-ov")  # its concat counterpart, a LLaVA-OneVision
