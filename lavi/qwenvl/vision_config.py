"""The vision tower of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint: its config, read without torch.

`QwenVisionConfig.from_hf(config["vision_config"], kind)` reads every layout transformers 5 and the hub use (a key
left out takes the transformers default of that model type) and refuses, in one line, what the tower does not
implement; `as_hf()` writes the transformers 5 layout back. How the three towers differ (vision.py builds them):

    Qwen2-VL     LayerNorm blocks, fc1 -> act -> fc2 MLP (quick_gelu), LayerNorm merger; hub names the width
                 `embed_dim`, the MLP `mlp_ratio` and the merger's output (the LLM's width) `hidden_size`
    Qwen2.5-VL   RMSNorm blocks, SwiGLU MLP, window attention but in `fullatt_block_indexes`, RMSNorm merger
    Qwen3-VL     LayerNorm blocks, linear_fc1 -> act -> linear_fc2 MLP (gelu_pytorch_tanh), learned positions
                 bilinearly resized to each grid, extra mergers on the `deepstack_visual_indexes` blocks
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lavi.qwenvl.kinds import MODEL_TYPES, QWEN2_5_VL, QWEN2_VL, QWEN3_VL

# the MLP activations the tower implements (transformers' ACT2FN names); vision.py maps each to its function
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new", "silu", "swish")
ROPE_TYPES = ("axial", "default")  # transformers 5 reads a vision "default" rope as "axial": both are the 2D rope
ROPE_THETA = 10000.0

# transformers 5's defaults per model type, in the hub's names (a vision_config key left out takes these)
_DEFAULTS: dict[str, dict[str, Any]] = {
    QWEN2_VL: dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
                   in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    QWEN2_5_VL: dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                     in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=4,
                     window_size=112, out_hidden_size=3584, fullatt_block_indexes=(7, 15, 23, 31)),
    QWEN3_VL: dict(depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304, num_heads=16,
                   in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584,
                   num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24)),
}
# the fields only one tower has (zero or empty in the others' configs)
KIND_FIELDS = {QWEN2_5_VL: ("window_size", "fullatt_block_indexes", "tokens_per_second"),
               QWEN3_VL: ("num_position_embeddings", "deepstack_visual_indexes")}
_ALIASES = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth", "in_chans": "in_channels"}


@dataclass(frozen=True)
class QwenVisionConfig:
    """One tower. Widths in our names: `hidden_size` is the ViT's, `out_hidden_size` the merger's (the LLM's)."""

    kind: str  # one of MODEL_TYPES
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = ROPE_THETA
    window_size: int = 0  # Qwen2.5-VL: a window's side in pixels; 0 for the others
    fullatt_block_indexes: tuple[int, ...] = ()  # Qwen2.5-VL: the blocks that attend over the whole frame
    tokens_per_second: int = 0  # Qwen2.5-VL: the LLM's temporal rope step (the tower does not use it)
    num_position_embeddings: int = 0  # Qwen3-VL: the learned position table (a square side**2)
    deepstack_visual_indexes: tuple[int, ...] = ()  # Qwen3-VL: blocks whose output gets its own merger

    def __post_init__(self) -> None:
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
        object.__setattr__(self, "deepstack_visual_indexes", tuple(self.deepstack_visual_indexes))
        if self.kind not in MODEL_TYPES:
            raise ValueError(f"vision kind {self.kind!r} is not one of {', '.join(MODEL_TYPES)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act {self.hidden_act!r} is not implemented "
                             f"(one of {', '.join(ACTIVATIONS)})")
        sizes = ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "in_channels",
                 "patch_size", "temporal_patch_size", "spatial_merge_size")
        for name in sizes:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"vision_config.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ValueError(f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a whole "
                             "head_dim divisible by 4 (the 2D rope gives each axis half of the head's pairs)")
        if self.kind == QWEN2_VL and self.intermediate_size % self.hidden_size:
            raise ValueError(f"Qwen2-VL's intermediate_size {self.intermediate_size} must be a multiple of its "
                             f"embed_dim {self.hidden_size} (its config says mlp_ratio, an int)")
        self._check_kind_fields()

    def _check_kind_fields(self) -> None:
        for kind, names in KIND_FIELDS.items():
            for name in names:
                if kind != self.kind and getattr(self, name):
                    raise ValueError(f"vision_config.{name} is not part of a {self.kind} tower "
                                     f"(got {getattr(self, name)!r})")
        if self.kind == QWEN2_5_VL and self.window_units < 1:
            raise ValueError(f"vision_config.window_size {self.window_size} is smaller than one merged patch "
                             f"(spatial_merge_size * patch_size = {self.spatial_merge_size * self.patch_size})")
        if self.kind == QWEN3_VL and self.num_position_embeddings < 1:
            raise ValueError("vision_config.num_position_embeddings must be positive for Qwen3-VL")
        for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            indexes = getattr(self, name)
            if len(set(indexes)) != len(indexes) or any(not 0 <= i < self.depth for i in indexes):
                raise ValueError(f"vision_config.{name} {list(indexes)} must be distinct blocks in 0..{self.depth - 1}")

    @property
    def num_layers(self) -> int:
        """The blocks (what a LaVi's stages tap, as a SigLIP tower's `num_layers`)."""
        return self.depth

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """The width of one row of pixel_values: channels x frames x pixels of a patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def window_units(self) -> int:
        """Qwen2.5-VL: a window's side in merged patches (transformers floors it the same way)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def position_side(self) -> int:
        """Qwen3-VL: the side of the learned position grid (transformers: int(sqrt(num_position_embeddings)))."""
        return int(self.num_position_embeddings ** 0.5)

    @classmethod
    def from_hf(cls, vision_config: dict[str, Any], kind: str) -> "QwenVisionConfig":
        """Map a config.json's vision_config (transformers 5 or the hub's older layout) onto ours; refuse the rest."""
        if kind not in MODEL_TYPES:
            raise ValueError(f"vision kind {kind!r} is not one of {', '.join(MODEL_TYPES)}")
        hf = {**_DEFAULTS[kind], **{_ALIASES.get(k, k): v for k, v in vision_config.items()}}
        if "in_channels" in vision_config and "in_chans" in vision_config:  # transformers 5 reads in_channels
            hf["in_channels"] = vision_config["in_channels"]
        patch = hf["patch_size"]
        for name in ("patch_size", "temporal_patch_size"):
            if not isinstance(hf[name], int):
                raise ValueError(f"vision_config.{name} {hf[name]!r} is not implemented (a single int only)")
        if hf.get("spatial_patch_size", patch) != patch:
            raise ValueError(f"vision_config.spatial_patch_size {hf['spatial_patch_size']} differs from patch_size "
                             f"{patch}: not implemented")
        common = dict(kind=kind, depth=hf["depth"], num_heads=hf["num_heads"], hidden_act=hf["hidden_act"],
                      in_channels=hf["in_channels"], patch_size=patch, temporal_patch_size=hf["temporal_patch_size"],
                      spatial_merge_size=hf["spatial_merge_size"], rope_theta=_rope_theta(hf))
        if kind == QWEN2_VL:
            ratio = hf["mlp_ratio"]
            if not isinstance(ratio, (int, float)) or ratio != int(ratio):
                raise ValueError(f"vision_config.mlp_ratio {ratio!r} is not implemented (transformers takes an int)")
            width = hf["embed_dim"]
            config = cls(hidden_size=width, intermediate_size=width * int(ratio), out_hidden_size=hf["hidden_size"],
                         **common)
        else:
            extra = {name: hf[name] for name in KIND_FIELDS[kind]}
            config = cls(hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                         out_hidden_size=hf["out_hidden_size"], **common, **extra)
        head_dim = hf.get("head_dim") or config.head_dim  # transformers' rope would use it, its attention not
        if head_dim != config.head_dim:
            raise ValueError(f"vision_config.head_dim {head_dim} is not hidden_size / num_heads = {config.head_dim}: "
                             "not implemented")
        return config

    def as_hf(self) -> dict[str, Any]:
        """This tower as a transformers 5 vision_config (what `from_hf` reads back to an equal config)."""
        out: dict[str, Any] = dict(depth=self.depth, hidden_act=self.hidden_act, num_heads=self.num_heads,
                                   in_channels=self.in_channels, patch_size=self.patch_size,
                                   temporal_patch_size=self.temporal_patch_size,
                                   spatial_merge_size=self.spatial_merge_size,
                                   rope_parameters={"rope_type": "axial", "rope_theta": self.rope_theta})
        if self.kind == QWEN2_VL:
            return {**out, "embed_dim": self.hidden_size, "mlp_ratio": self.intermediate_size // self.hidden_size,
                    "hidden_size": self.out_hidden_size}
        out.update(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                   out_hidden_size=self.out_hidden_size)
        if self.kind == QWEN2_5_VL:
            return {**out, "window_size": self.window_size, "fullatt_block_indexes": list(self.fullatt_block_indexes),
                    "tokens_per_second": self.tokens_per_second}
        return {**out, "num_position_embeddings": self.num_position_embeddings,
                "deepstack_visual_indexes": list(self.deepstack_visual_indexes)}


def _rope_theta(hf: dict[str, Any]) -> float:
    """The rope base: rope_parameters' (or the older rope_scaling's), else a flat rope_theta, else 10000."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"vision rope_type {rope_type!r} is not implemented (the tower's 2D rope is 'axial')")
    return float(rope.get("rope_theta", hf.get("rope_theta", ROPE_THETA)))
