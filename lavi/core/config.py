"""Configs: the decoder, the vision tower and LaVi itself. Small frozen dataclasses that serialise."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lavi.qwenvl.vision_config import QwenVisionConfig

SITES = ("attn", "ffn", "both")
VILN, CONCAT, VLORA = "viln", "concat", "vlora"  # how vision reaches the LLM: its norms, its context, its weights
FUSIONS = (VILN, CONCAT, VLORA)
CONTEXT_FUSION = CONCAT  # the one fusion whose visual tokens enter the LLM's context (the LLaVA-style baseline)
# the weights VLoRA gives a per-image low-rank delta: attention's q, k, v, o, and "m", a bypass around the MLP
LORA_TYPES = ("q", "k", "v", "o", "m")


def _known(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class DecoderConfig:
    """A Qwen2/Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2: q/k/v have a bias, o does not
    o_bias: bool = False  # Llama attention_bias=True: all four have one
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's q and k, before RoPE
    mrope_section: tuple[int, ...] = ()  # M-RoPE (Qwen-VL): rotary frequencies per axis (t, h, w); (): plain RoPE
    mrope_interleaved: bool = False  # Qwen3-VL's M-RoPE: the axes take turns over the frequencies (t h w t h w ...)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        if self.mrope_section and (len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2):
            raise ValueError(f"mrope_section {list(self.mrope_section)} must be 3 sections (t, h, w) summing to "
                             f"head_dim / 2 = {self.head_dim // 2}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "DecoderConfig":
        """Map a transformers Qwen2/Llama config.json onto ours; refuse what we do not implement."""
        kind = hf.get("model_type", "")
        if kind not in ("qwen2", "llama"):
            raise ValueError(f"decoder model_type {kind!r} is not supported: use a qwen2 or llama checkpoint")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"rope scaling {rope_type!r} is not supported yet (only plain RoPE)")
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        bias = bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0,
            rope_theta=float(theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            qkv_bias=True if kind == "qwen2" else bias,
            o_bias=bias if kind == "llama" else False,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class VisionConfig:
    """A SigLIP-family ViT: conv patch embedding, learned positions, pre-norm blocks."""

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    def __post_init__(self) -> None:
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size {self.patch_size} is larger than image_size {self.image_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # floored, as the patch conv does (SigLIP 384/14: 729)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "VisionConfig":
        """Map a SiglipVisionConfig (or a SiglipConfig's vision_config) onto ours."""
        hf = hf.get("vision_config", hf)
        if hf.get("model_type", "siglip_vision_model") not in ("siglip_vision_model", "siglip"):
            raise ValueError(f"vision model_type {hf.get('model_type')!r} is not supported: use a SigLIP checkpoint")
        act = hf.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"vision hidden_act {act!r} is not supported (SigLIP uses gelu_pytorch_tanh)")
        return cls(
            image_size=hf.get("image_size", 224),
            patch_size=hf.get("patch_size", 16),
            hidden_size=hf.get("hidden_size", 768),
            intermediate_size=hf.get("intermediate_size", 3072),
            num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 12),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
            num_channels=hf.get("num_channels", 3),
        )


@dataclass(frozen=True)
class LaViConfig:
    """LaVi = decoder + ViT + a fusion: `viln` (modulated norms), `concat` (LLaVA-style baseline) or `vlora`
    (per-image low-rank weight deltas, lavi.core.vlora)."""

    decoder: DecoderConfig
    vision: VisionConfig | QwenVisionConfig  # a SigLIP tower, or a Qwen-VL's ViT (with `processor`: lavi.qwenvl.lavi)
    fusion: str = "viln"
    sites: str = "both"  # which norms are modulated: attn, ffn or both
    layer_stride: int = 1  # modulate every k-th layer (1 = all): ViLN's norms, VLoRA's weights
    num_stages: int = 4  # ViT taps, mapped onto contiguous groups of LLM layers
    cond_dim: int = 256  # conditioner width d_c
    cond_heads: int = 4
    lora_rank: int = 8  # VLoRA: rank r of each per-image delta B A^T
    lora_alpha: float = 16.0  # VLoRA: the delta is scaled by alpha / r
    lora_types: tuple[str, ...] = LORA_TYPES  # VLoRA: which weights get a delta
    gen_dim: int = 256  # VLoRA: width d_g of the perceptual weights generator
    gen_layers: int = 2  # VLoRA: its decoder blocks
    gen_heads: int = 4  # VLoRA: its attention heads
    max_frames: int = 32  # size of the learned temporal embedding
    default_frames: int = 8  # frames per video clip when the caller does not say
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    prompt_template: str = "{prompt}"  # text fed to the decoder; generation starts after it
    chat_template: str | None = None  # set (a converted checkpoint's jinja template): prompts are one user turn
    chat_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... the template may use
    bos_token_id: int | None = None
    eos_token_id: int = 0
    eos_token_ids: tuple[int, ...] = ()  # several ends of a row (a chat model's end-of-turn, end-of-text)
    pad_token_id: int = 0
    default_prompts: dict[str, str] = field(
        default_factory=lambda: {"image": "describe the image.", "video": "describe the video."}
    )
    name: str = "lavi"
    # a dynamic-resolution tower's image and video processors (set with a Qwen-VL ViT as `vision`: a
    # lavi.qwenvl.processor_config.ProcessorConfig as a dict); None: a SigLIP tower over square frames of image_size
    processor: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.sites not in SITES:
            raise ValueError(f"sites must be one of {SITES}, got {self.sites!r}")
        if isinstance(self.vision, QwenVisionConfig) != (self.processor is not None):
            raise ValueError("a Qwen-VL vision tower and a processor config go together (lavi.qwenvl.convert)")
        if self.processor is not None and self.fusion != VILN:
            raise ValueError(f"a Qwen-VL vision tower conditions through {VILN} only, not {self.fusion!r}")
        if self.layer_stride < 1:
            raise ValueError("layer_stride must be >= 1")
        if not 1 <= self.num_stages <= self.vision.num_layers:
            raise ValueError(f"num_stages must be in [1, {self.vision.num_layers}] (the ViT's depth)")
        if self.cond_dim % self.cond_heads:
            raise ValueError(f"cond_dim {self.cond_dim} must be divisible by cond_heads {self.cond_heads}")
        if not 1 <= self.default_frames <= self.max_frames:
            raise ValueError(f"default_frames must be in [1, max_frames={self.max_frames}]")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ValueError("lora_rank must be >= 1 and lora_alpha > 0")
        if not self.lora_types or set(self.lora_types) - set(LORA_TYPES):
            raise ValueError(f"lora_types must be some of {LORA_TYPES}, got {self.lora_types!r}")
        if self.gen_layers < 1 or self.gen_dim % self.gen_heads:
            raise ValueError(f"gen_layers must be >= 1 and gen_dim {self.gen_dim} divisible by gen_heads {self.gen_heads}")
        object.__setattr__(self, "lora_types", tuple(t for t in LORA_TYPES if t in self.lora_types))
        object.__setattr__(self, "image_mean", tuple(self.image_mean))
        object.__setattr__(self, "image_std", tuple(self.image_std))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a generated row."""
        return self.eos_token_ids or (self.eos_token_id,)

    # -- where modulation goes ------------------------------------------------------------
    def modulated_layers(self) -> list[int]:
        return list(range(0, self.decoder.num_layers, self.layer_stride))

    def site_names(self) -> list[str]:
        return ["attn", "ffn"] if self.sites == "both" else [self.sites]

    def stage_of_layer(self, layer: int) -> int:
        """Contiguous LLM layer groups, shallow to shallow: layer l -> stage floor(l*K/L)."""
        return layer * self.num_stages // self.decoder.num_layers

    def vision_taps(self) -> list[int]:
        """ViT layer indices (0-based block outputs) feeding each stage, evenly spaced, last = deepest."""
        n = self.vision.num_layers
        return [round((g + 1) * n / self.num_stages) - 1 for g in range(self.num_stages)]

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LaViConfig":
        d = dict(d)
        d["decoder"] = DecoderConfig(**_known(DecoderConfig, d["decoder"]))
        tower = QwenVisionConfig if d.get("processor") else VisionConfig  # a Qwen-VL ViT comes with its processor
        d["vision"] = tower(**_known(tower, d["vision"]))
        return cls(**_known(cls, d))
