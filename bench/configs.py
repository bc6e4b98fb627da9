"""The shapes the benchmarks run at, and random-weight models built on the device without a CPU copy.

Visual settings (frames x tokens per frame):
    tiny-random      image 1 x 16, video 4 x 16                      (lavi.tiny_models.tiny_config, 32 px, patch 8)
    tiny-shapes      image 1 x 36, anyres 10 x 36, video 16 x 36       (lavi.tiny_models.tiny_shapes_config(60))
    qwen2-0.5b-siglip  image 1 x 729, anyres 3 x 729 (base view + 2 crops): LLaVA-OneVision-0.5B's shapes, for CPU
    tiny-qwen2.5-vl  image 1 x 64 (32 px, patch 4; the Qwen: 16 merged tokens), video 4 x 64 (the Qwen: 2 x 16)
    qwen2.5-vl-3b    image 1 x 1,024 (448 px, patch 14; the Qwen: 256 merged tokens), video 8 x 1,024 (4 x 256)
    qwen2.5-vl-7b    the same settings, for --device cuda
    qwen2-7b-siglip  image 1 x 729 (384 px, fed as 378 px: see settings()), anyres 10 x 729 = 7,290 (ten crops),
                     video 32 x 196 (frames given at 196 px = 14 x 14 patches of 14 px)

The 7B decoder is Qwen2-7B (hidden 3584, 28 layers, 28 heads, 4 KV heads, FFN 18944, vocab 152064,
q/k/v bias, untied head); the ViT is SigLIP-so400m-patch14-384 with 26 layers (LLaVA-OneVision drops
the 27th). Video: LLaVA-OneVision encodes each frame at 384 px (729 tokens) and pools 2x2 to 196;
here the frame itself is 196 px, so the ViT does ~3.7x less work per frame than LLaVA-OV's and the
token count the decoder/conditioner sees (196 per frame) is the same.

At the Qwen2.5-VL shapes (`bench.qwen`), the LaVi beside the Qwen has its decoder (Qwen2.5-3B's or -7B's) and a
SigLIP-style ViT of the Qwen tower's width, depth and heads, its MLP (GELU, two matrices) 1.5x the tower's SwiGLU
width so the two hold the same weights; it attends over all 1,024 patches in every block where the Qwen's tower
attends within 8 x 8 windows in 28 of 32, and conditions on the unmerged patches (the Qwen puts 256 merged ones in
its context).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lavi.core.config import DecoderConfig, LaViConfig, VisionConfig
from lavi.core.model import LaVi

QWEN_SHAPES = ("tiny-qwen2.5-vl", "qwen2.5-vl-3b", "qwen2.5-vl-7b")  # bench.qwen: the Qwen and a LaVi of its decoder
SHAPES = ("tiny-random", "tiny-shapes", "qwen2-0.5b-siglip", "qwen2-7b-siglip", *QWEN_SHAPES)
SIGLIP_SO400M = dict(patch_size=14, hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16)
REAL_VLORA = dict(lora_rank=64, lora_alpha=64.0, gen_dim=256, gen_heads=4, gen_layers=2)
TINY_VOCAB = 60  # the brief's tiny_shapes_config(60): shapes-v1's 56 words + specials, rounded


@dataclass(frozen=True)
class Setting:
    """One visual input shape: `frames` images of `image_size` px per item."""

    name: str
    frames: int
    image_size: int

    def visual_tokens(self, patch_size: int) -> int:
        return self.frames * (self.image_size // patch_size) ** 2


def settings(shapes: str) -> list[Setting]:
    if shapes == "tiny-random":
        return [Setting("image", 1, 32), Setting("video", 4, 32)]
    if shapes == "tiny-shapes":
        return [Setting("image", 1, 128), Setting("anyres", 10, 128), Setting("video", 16, 128)]
    if shapes == "qwen2-0.5b-siglip":  # the CPU's real shapes: an image (729 tokens) and base + 2 crops
        return [Setting("image", 1, 378), Setting("anyres", 3, 378)]
    if shapes in QWEN_SHAPES:  # an image of 448 px (32 px for the tiny one): 32 x 32 patches, 16 x 16 merged
        side = 32 if shapes.startswith("tiny") else 448
        return [Setting("image", 1, side), Setting("video", 4 if shapes.startswith("tiny") else 8, side)]
    if shapes == "qwen2-7b-siglip":
        # 378 = 27 x 14: SigLIP's stride-14 conv floors a 384 px input to the same 27 x 27 = 729 patches
        # (same tokens, same FLOPs); lavi's VisionConfig refuses image_size % patch_size != 0
        return [Setting("image", 1, 378), Setting("anyres", 10, 378), Setting("video", 32, 196)]
    raise ValueError(f"shapes must be one of {SHAPES}, got {shapes!r}")


def model_config(shapes: str, fusion: str, setting: Setting) -> LaViConfig:
    """The LaViConfig of `shapes` with `fusion` (viln, vlora or concat), its ViT input sized for `setting`. VLoRA at
    the real shapes: rank 64, a generator of width 256 (the tiny shapes keep their own, lavi.tiny_models)."""
    from lavi.tiny_models import tiny_config, tiny_shapes_config

    if shapes == "tiny-random":
        base = tiny_config(TINY_VOCAB, fusion)
    elif shapes == "tiny-shapes":
        base = tiny_shapes_config(TINY_VOCAB, fusion)
    elif shapes == "qwen2-0.5b-siglip":  # LLaVA-OneVision-0.5B's: Qwen2-0.5B and its SigLIP tower; LaVi as `convert`
        decoder = DecoderConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                                num_heads=14, num_kv_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                                max_position_embeddings=32768, qkv_bias=True, tie_word_embeddings=True)
        vision = VisionConfig(image_size=378, **SIGLIP_SO400M)
        base = LaViConfig(decoder=decoder, vision=vision, fusion=fusion, sites="both", num_stages=4, cond_dim=256,
                          cond_heads=4, max_frames=32, default_frames=8, eos_token_id=151645, **REAL_VLORA,
                          pad_token_id=151643, name=f"qwen2-0.5b-siglip-{fusion}")
    elif shapes == "qwen2-7b-siglip":
        decoder = DecoderConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                                num_heads=28, num_kv_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
                                max_position_embeddings=32768, qkv_bias=True, tie_word_embeddings=False)
        vision = VisionConfig(image_size=378, **SIGLIP_SO400M)
        base = LaViConfig(decoder=decoder, vision=vision, fusion=fusion, sites="both", num_stages=4, cond_dim=256,
                          cond_heads=4, max_frames=32, default_frames=8, eos_token_id=151645, **REAL_VLORA,
                          pad_token_id=151643, name=f"qwen2-7b-siglip-{fusion}")
    elif shapes in QWEN_SHAPES:
        base = qwen_lavi_config(shapes, fusion)
    else:
        raise ValueError(f"shapes must be one of {SHAPES}, got {shapes!r}")
    if setting.frames > base.max_frames:
        base = dataclasses.replace(base, max_frames=setting.frames)
    return dataclasses.replace(base, vision=dataclasses.replace(base.vision, image_size=setting.image_size))


def qwen_lavi_config(shapes: str, fusion: str) -> LaViConfig:
    """A LaVi with the decoder of the Qwen shapes `shapes` (plain RoPE: a LaVi's context is text only) and a ViT of
    its tower's size (see the module doc); its conditioner as qwen2-0.5b-siglip's (the tiny one: as tiny-random's)."""
    from bench.qwen_shapes import hub_config
    from lavi.qwenvl.config import QwenVLConfig

    qwen = QwenVLConfig.from_hf(hub_config(shapes))
    decoder = dataclasses.replace(qwen.decoder, mrope_section=())
    v = qwen.vision
    vision = VisionConfig(image_size=settings(shapes)[0].image_size, patch_size=v["patch_size"],
                          hidden_size=v["hidden_size"], intermediate_size=3 * v["intermediate_size"] // 2,
                          num_layers=v["depth"], num_heads=v["num_heads"])
    tiny = shapes.startswith("tiny")
    conditioner = (dict(num_stages=2, cond_dim=32, cond_heads=2, gen_dim=32, gen_heads=2, lora_rank=4, lora_alpha=4.0)
                   if tiny else dict(num_stages=4, cond_dim=256, cond_heads=4, **REAL_VLORA))
    return LaViConfig(decoder=decoder, vision=vision, fusion=fusion, sites="both", max_frames=32, default_frames=8,
                      eos_token_id=qwen.eos_token_id, pad_token_id=qwen.pad_token_id, name=f"{shapes}-{fusion}",
                      **conditioner)


@torch.no_grad()
def random_model(config: LaViConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0,
                 std: float = 0.02) -> LaVi:
    """A LaVi with random weights, built on the meta device and materialised directly on `device` in
    `dtype` (a 7B model never exists in fp32 on the host). Matrices ~ N(0, std) (ViLN outputs included,
    so the conditioner is not the identity), norm weights 1, biases 0."""
    with torch.device("meta"):
        model = LaVi(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.decoder.tie_word_embeddings:  # to_empty gives each module its own storage: tie again
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std, generator=gen)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)  # RMSNorm / LayerNorm weights
    return model.eval()


def weight_bytes(model: LaVi) -> dict[str, int]:
    """Bytes of weights by part; `decode` = what one decode step reads (decoder without the embedding
    table unless it is the tied lm_head, plus ViLN's per-site heads)."""
    size = lambda params: sum(p.numel() * p.element_size() for p in params)  # noqa: E731
    dec = model.decoder
    decode = size(dec.layers.parameters()) + size(dec.norm.parameters()) + size(dec.lm_head.parameters())
    if model.viln is not None:
        decode += size(model.viln.heads.parameters())
    if model.vlora is not None:
        decode += size(model.vlora.B.parameters())
    fusion = next(m for m in (model.viln, model.vlora, model.projector) if m is not None)
    return {"decoder": size(dec.parameters()), "vision": size(model.vision.parameters()),
            "fusion": size(fusion.parameters()), "decode": decode}
