"""VLoRA (lavi.core.vlora): per-image low-rank weight deltas. Its share of the fusion invariants (cache == recompute,
batch == rows alone, save/load, in-flight == static) runs in test_lavi.py and test_inflight.py beside ViLN's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from lavi.core.decoder import Conditioning, Decoder
from lavi.core.model import LaVi
from lavi.tiny_models import tiny_config


def _model(seed: int = 0, random_b: bool = True, **options) -> LaVi:
    torch.manual_seed(seed)
    model = LaVi(tiny_config(40, "vlora", **options)).eval()
    if random_b:
        for b in model.vlora.B.values():
            torch.nn.init.normal_(b, std=0.2)
    return model


def _pixels(n: int, f: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, f, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _ids(b: int = 2, t: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(4, 40, (b, t), generator=torch.Generator().manual_seed(2)), torch.ones(b, t, dtype=torch.bool)


def _base(model: LaVi, ids: torch.Tensor) -> torch.Tensor:
    b, t = ids.shape
    return model.decoder(model.decoder.embed_tokens(ids), torch.arange(t)[None].expand(b, t),
                         torch.ones(b, 1, t, t, dtype=torch.bool).tril())[0]


def test_an_untrained_vlora_is_exactly_its_base_llm():
    """Guards against deltas that are not zero at init (B must start at zero): a trained LLM would be damaged."""
    model = _model(random_b=False)
    ids, valid = _ids()
    with torch.no_grad():
        base = _base(model, ids)
        for seed in (1, 2):
            assert torch.equal(model(ids, valid, model.encode(_pixels(2, seed=seed))), base)


@pytest.mark.parametrize("types,stride", [(("q", "k", "v", "o", "m"), 1), (("v", "m"), 2)])
def test_the_image_changes_logits_and_gradients_reach_the_generator_only(types, stride):
    """Guards against a weights generator that is not wired in (the image would not matter), deltas on the
    wrong layers, and gradients leaking into frozen backbones."""
    model = _model(lora_types=types, layer_stride=stride)
    model.freeze_backbones()
    ids, valid = _ids()
    a = model(ids, valid, model.encode(_pixels(2, seed=1)))
    b = model(ids, valid, model.encode(_pixels(2, seed=2)))
    assert (a - b).abs().max() > 1e-4
    a.logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    assert all(p.grad is None for p in model.vision.parameters())
    grads = dict(model.vlora.named_parameters())
    assert set(model.vlora.B) == {f"{t}_{l}" for t in types for l in range(0, 2, stride)}
    for name in ("queries", "proj.weight", "blocks.0.cross_kv.weight", f"heads.{types[0]}.weight", f"B.{types[0]}_0"):
        assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name


def _merged_decoder(model: LaVi, vis, item: int) -> tuple[Decoder, dict[int, torch.Tensor]]:
    """A plain decoder with item `item`'s deltas merged into its weights (W + alpha / r B A^T), and each layer's
    MLP bypass as a dense d x d matrix: what the low-rank path must equal."""
    g = model.vlora
    merged = Decoder(model.config.decoder)
    state = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
    bypass = {}
    for t, a in zip(model.config.lora_types, vis.factors):
        for j, l in enumerate(g.layers):
            dw = model.config.lora_alpha / model.config.lora_rank * g.B[f"{t}_{l}"] @ a[item, j].T  # (d_out, d_in)
            if t == "m":
                bypass[l] = dw
            else:
                state[f"layers.{l}.{names[t]}.weight"] = state[f"layers.{l}.{names[t]}.weight"] + dw
    merged.load_state_dict(state)
    return merged, bypass


def test_the_low_rank_path_equals_the_model_with_its_deltas_merged():
    """Guards against a batched low-rank product that applies another row's factors, transposes A, or scales
    by other than alpha / r: for each item, the per-row path equals running W + dW merged (and the MLP bypass as
    a dense matrix)."""
    model = _model()
    ids, valid = _ids(b=2)
    with torch.no_grad():
        vis = model.encode(_pixels(2, seed=3))
        got = model(ids, valid, vis)
        for item in range(2):
            merged, bypass = _merged_decoder(model, vis, item)

            def dense(layer: int) -> Conditioning:
                return Conditioning(delta=lambda name, x: x @ bypass[layer].T if name == "m" else None)

            t = ids.shape[1]
            want = merged(merged.embed_tokens(ids[item:item + 1]), torch.arange(t)[None],
                          torch.ones(1, 1, t, t, dtype=torch.bool).tril(), conds=dense)[0]
            assert_close(got[item:item + 1], want, rtol=1e-4, atol=1e-5)


def test_a_vlora_checkpoint_labels_through_the_engine(tmp_path):
    """Guards against a vlora checkpoint that saves but does not load or generate through the engine the pipeline
    runs (`run --model`): the same clips give the same texts batched and one by one."""
    from lavi.serving.engine import Engine
    from lavi.serving.steps import GenerationConfig
    from lavi.tiny_models import make_tiny_checkpoint

    engine = Engine.load(make_tiny_checkpoint(tmp_path, fusion="vlora"), max_batch=4)
    assert engine.config.fusion == "vlora"
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (f, 32, 32, 3), dtype=np.uint8) for f in (1, 3)]
    requests = [(0, "describe the image."), (1, "describe the video."), (1, "how many")]
    gen = GenerationConfig(max_new_tokens=6)
    batched = [c.text for c in engine.generate(clips, requests, gen)]
    assert batched == [engine.generate(clips, [r], gen)[0].text for r in requests]


def test_a_vlora_on_a_trained_lavis_backbones_starts_as_that_decoder(tmp_path):
    """Guards against `train --init LAVI --fusion vlora` (VLoRA on a trained LaVi's decoder and ViT, as the paper
    builds it on a trained LLM) losing or copying the backbones, or starting with a delta: the new model's decoder
    is the LaVi's own (base logits equal, bit for bit), its generator is fresh, and only it trains when frozen."""
    from lavi.core.checkpoint import load, save, with_fusion

    torch.manual_seed(3)
    lavi = LaVi(tiny_config(40, "viln")).eval()
    for p in lavi.viln.parameters():  # a trained conditioner: not at its zero init
        torch.nn.init.normal_(p, std=0.1)
    save(lavi, tmp_path / "lavi")
    vlora = with_fusion(load(tmp_path / "lavi"), "vlora")
    assert vlora.config.fusion == "vlora" and vlora.viln is None and vlora.config.name == "tiny-random-vlora"
    ids, valid = _ids()
    with torch.no_grad():
        base = _base(lavi, ids)
        assert torch.equal(vlora.eval()(ids, valid, vlora.encode(_pixels(2))), base)
        assert not torch.equal(lavi(ids, valid, lavi.encode(_pixels(2))), base)  # the LaVi's own fusion mattered
    vlora.train().freeze_backbones()
    trainable = {n for n, p in vlora.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("vlora.") for n in trainable)


def test_vlora_refuses_the_focus_loss():
    """Guards against a focus loss silently recording nothing for VLoRA (its text attends to no image tokens)."""
    from lavi.training.losses import FocusRecorder

    with pytest.raises(ValueError, match="VLoRA"):
        FocusRecorder(_model())
