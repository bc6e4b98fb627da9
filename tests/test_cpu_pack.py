"""oneDNN-packed linear layers on CPU (lavi.serving.cpu_pack): the same outputs as the plain model, where loading uses them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from engines import widen
from torch import nn
from torch.testing import assert_close

from lavi.serving import cpu_pack
from lavi.serving.engine import Engine
from lavi.serving.steps import GenerationConfig
from lavi.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not cpu_pack.available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_computes_the_linear_layer(bias):
    """Guards against a packed weight read transposed or with its bias dropped, and against inputs the packed
    kernel mishandles: one row (a decode step), 3-D batches, a non-contiguous view."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    packed = cpu_pack.PackedLinear(linear)
    wide = torch.randn(4, 7, 192)
    for x in (torch.randn(1, 96), torch.randn(3, 5, 96), wide[..., ::2], torch.randn(700, 96)):
        with torch.no_grad():
            assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-4)
    assert packed(torch.randn(2, 96)).shape == (2, 200)


@pytest.mark.parametrize("native", [False, True])
def test_pack_replaces_float32_cpu_linears_and_native_bf16_ones_only(monkeypatch, native):
    """Guards against packing a bf16 layer on a CPU without native bf16 (oneDNN would convert every product, ~4x
    slower), a float16 one, or one already replaced (int8's layers); and against leaving bf16 unpacked where the
    CPU computes it (AVX512-BF16, AMX: packed, its decode products read the weights ~1.2x faster)."""
    from lavi.serving.quant import Int8Linear

    class PackedLinear(nn.Module):  # which layers are packed, not how: oneDNN packs bf16 only on AVX-512 CPUs
        def __init__(self, linear: nn.Linear):
            super().__init__()
            self.linear = linear

    monkeypatch.setattr(cpu_pack, "native_bf16", lambda: native)
    monkeypatch.setattr(cpu_pack, "PackedLinear", PackedLinear)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16), Int8Linear(nn.Linear(8, 8)),
                          nn.Sequential(nn.Linear(8, 4)), nn.Linear(8, 8).to(torch.float16))
    assert cpu_pack.pack(model, min_elements=0) == 2 + native
    kinds = [type(m).__name__ for m in (model[0], model[1], model[2], model[3][0], model[4])]
    assert kinds == ["PackedLinear", "PackedLinear" if native else "Linear", "Int8Linear", "PackedLinear", "Linear"]


@pytest.mark.skipif(not cpu_pack.native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")
def test_a_packed_bf16_linear_computes_the_bf16_linear_layer():
    """Guards against a bf16 weight packed through float32 or read in another layout: the packed product is the
    plain bf16 one (oneDNN's summation order only), one row and a prefill's."""
    torch.manual_seed(0)
    linear = nn.Linear(512, 1024).to(torch.bfloat16)
    packed = cpu_pack.PackedLinear(linear)
    for x in (torch.randn(1, 512), torch.randn(3, 5, 512), torch.randn(300, 512)):
        x = x.to(torch.bfloat16)
        with torch.no_grad():
            assert packed(x).dtype == torch.bfloat16
            assert_close(packed(x).float(), linear(x).float(), rtol=1e-2, atol=1e-2)


def test_small_layers_are_left_to_f_linear():
    """Guards against packing the small layers whose packed call costs more than the product (a 3 MB model ran
    3-4x slower packed), and against leaving the large ones unpacked."""
    model = nn.Sequential(nn.Linear(128, 384), nn.Linear(1024, 512), nn.Linear(256, 896))
    assert cpu_pack.pack(model) == 1
    assert [type(m).__name__ for m in model] == ["Linear", "PackedLinear", "Linear"]


@pytest.mark.parametrize("fusion", ["viln", "concat", "vlora"])
def test_a_packed_engine_generates_what_the_plain_one_does(tmp_path, fusion, monkeypatch):
    """Guards against a layer packed wrong in any fusion's path (decoder, ViLN's site heads, VLoRA's generator,
    the concat projector, the ViT, the tied output head), and against loading that does not pack by default on
    a float32 CPU model, or packs when told not to or when the step is compiled (torch.compile traces weights)."""
    monkeypatch.setattr(cpu_pack, "MIN_ELEMENTS", 0)  # a tiny model's layers are all under the size that packs
    path = make_tiny_checkpoint(str(tmp_path / fusion), seed=1, fusion=fusion)
    plain = widen(Engine.load(path, max_batch=4, pack=False), pack=False)
    fast = widen(Engine.load(path, max_batch=4, pack=False))
    assert not any(isinstance(m, cpu_pack.PackedLinear) for m in plain.model.modules())
    assert any(isinstance(m, cpu_pack.PackedLinear) for m in fast.model.modules())
    assert not any(type(m) is nn.Linear for m in fast.model.modules())
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (f, plain.image_size, plain.image_size, 3), dtype=np.uint8) for f in (1, 3)]
    requests = [(0, "describe the image."), (1, "what is in it?"), (1, "how many")]
    gen = GenerationConfig(max_new_tokens=12)
    texts = [c.text for c in plain.generate(clips, requests, gen)]
    assert len(set(texts)) > 1  # rows differ: a test of which layer is wrong can fail
    assert [c.text for c in fast.generate(clips, requests, gen)] == texts
    loaded = Engine.load(path)
    assert any(isinstance(m, cpu_pack.PackedLinear) for m in loaded.model.modules())  # the default packs
    compiled = Engine.load(path, compile=True)
    assert not any(isinstance(m, cpu_pack.PackedLinear) for m in compiled.model.modules())


def test_products_of_one_input_are_packed_as_one_and_compute_what_the_layers_did():
    """Guards against a fused q/k/v or gate/up product whose outputs come back in the wrong order or width (GQA:
    k and v narrower than q), a bias dropped, or FastV's look at the last token's attention (which reads the
    projections itself) broken by the fusion."""
    from lavi.core.decoder import Attention, MLP
    from lavi.core.rope import rope_cos_sin
    from lavi.visual_tokens.fastv import last_token_attention
    from lavi.tiny_models import tiny_config

    torch.manual_seed(0)
    c = tiny_config(40, "viln").decoder
    attn, mlp = Attention(c).eval(), MLP(c).eval()
    for p in attn.parameters():  # biases too: zero at init would hide one dropped
        torch.nn.init.normal_(p, std=0.2)
    plain_attn, plain_mlp = Attention(c).eval(), MLP(c).eval()
    plain_attn.load_state_dict(attn.state_dict())
    plain_mlp.load_state_dict(mlp.state_dict())
    assert cpu_pack.pack(attn, min_elements=0) == 2 and cpu_pack.pack(mlp, min_elements=0) == 2  # qkv, o; gate_up, down
    assert isinstance(attn.qkv, cpu_pack.PackedLinear) and not hasattr(attn, "q_proj") and not hasattr(mlp, "up_proj")
    x = torch.randn(2, 5, c.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(5)[None].expand(2, 5), c.head_dim, c.rope_theta)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    with torch.no_grad():
        for got, want in zip(attn.projections(x), plain_attn.projections(x)):
            assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert_close(attn(x, cos, sin, mask), plain_attn(x, cos, sin, mask), rtol=1e-5, atol=1e-5)
        assert_close(mlp(x), plain_mlp(x), rtol=1e-5, atol=1e-5)
        valid = torch.ones(2, 5, dtype=torch.bool)
        assert_close(last_token_attention(attn, x, cos, sin, valid),
                     last_token_attention(plain_attn, x, cos, sin, valid))


def test_run_dtype_reaches_the_labelers_engine_and_the_resume_settings():
    """Guards against `run --dtype` not reaching the labelers (a bf16 run labelled in float32, or the other way
    round) and against labels of two dtypes resumed into one output without notice; auto keeps the default (the
    bundled float32 checkpoint in float32) and writes no setting, so outputs of earlier runs resume as they were."""
    from types import SimpleNamespace

    from pipeline.config import RunConfig
    from pipeline.driver import _labeler_spec
    from workers.labeler import Labeler, LabelerSpec

    for flag, want in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
        config = RunConfig(inputs=("x",), out="o", dtype=flag)
        assert config.generation_settings()["dtype"] == flag
        spec = _labeler_spec(config, SimpleNamespace(frames_per_clip=None), "j", None)
        assert spec.dtype == flag
        labeler = Labeler(LabelerSpec(None, job_id="j", generation={"max_new_tokens": 2}, dtype=spec.dtype))
        assert labeler.engine.model.dtype == want
    auto = RunConfig(inputs=("x",), out="o", dtype="auto")
    assert auto.dtype is None and "dtype" not in auto.generation_settings()
    assert Labeler(LabelerSpec(None, job_id="j", generation={"max_new_tokens": 2})).engine.model.dtype == torch.float32
    with pytest.raises(ValueError, match="--dtype"):
        RunConfig(inputs=("x",), out="o", dtype="int8")


def test_weight_count_sees_packed_weights():
    """Guards against a CPU labeler sizing its threads from `parameters()` alone: a packed layer's weight is not a
    parameter, so a packed 0.5B LLaVA-OneVision counted as a small model and computed on one thread of two (the
    realsize run 2.3x transformers' time, its engine alone 0.92x). Packing, fused or not, keeps the count (a tied
    output head packed is a copy of the embedding's weights: counted too)."""
    from lavi.tiny_models import tiny_config
    from lavi.core.model import LaVi

    model = LaVi(tiny_config(40, "viln")).eval()
    before = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert cpu_pack.weight_count(model) == before
    assert cpu_pack.pack(model, min_elements=0) > 0
    assert sum(p.numel() for p in model.parameters()) < before / 2  # what the labeler counted
    head = model.decoder.lm_head
    tied_copy = head.in_features * head.out_features if isinstance(head, cpu_pack.PackedLinear) else 0
    assert cpu_pack.weight_count(model) == before + tied_copy
