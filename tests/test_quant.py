"""Weight-only int8 decoder layers (lavi.serving.quant): close to the float model, through the engine and the labeler."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lavi.bundled import DEFAULT_MODEL
from lavi.serving.engine import Engine
from lavi.serving.steps import GenerationConfig
from lavi.serving.quant import Int8Linear, quantize
from shapes import render, spec

# int8 weights (per-channel scales) and bf16 activations: a layer's output within 2% of the float one (relative
# to its largest entry), the model's next-token probabilities within 0.02 of the float model's at every position
LAYER_RTOL, PROB_ATOL = 0.02, 0.02


def test_an_int8_layer_is_the_float_layer_within_its_quantisation_error():
    """Guards against wrong scales (per tensor instead of per channel, off by the 127), a transposed weight or a
    dropped bias."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200)
    q = Int8Linear(linear)
    x = torch.randn(3, 5, 96)
    want, got = linear(x), q(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max() <= LAYER_RTOL * want.abs().max()
    assert q.weight.dtype == torch.int8 and (q.dequantized() - linear.weight).abs().max() <= linear.weight.abs().max() / 127


def test_the_int8_model_is_close_to_the_float_one_and_captions_alike():
    """Guards against a quantised model that drifts from the float one (a layer left out of the swap breaks
    nothing; a wrong one breaks these), and against --quantize not reaching the engine."""
    float_engine = Engine.load(DEFAULT_MODEL)
    int8_engine = Engine.load(DEFAULT_MODEL, quantize="int8")
    n = sum(isinstance(m, Int8Linear) for m in int8_engine.model.modules())
    assert n == 7 * float_engine.config.decoder.num_layers + 1  # q k v o gate up down per layer, and the head
    rng = np.random.default_rng(3)
    items = [render.sample_image(rng) for _ in range(6)]
    clips = [it.pixels[None] for it in items]
    reqs = [(i, spec.IMAGE_PROMPT) for i in range(len(items))]
    gen = GenerationConfig(max_new_tokens=40)
    a = [c.text for c in float_engine.generate(clips, reqs, gen)]
    b = [c.text for c in int8_engine.generate(clips, reqs, gen)]
    assert sum(x == y for x, y in zip(a, b)) >= 5, (a, b)
    vis = float_engine._encode(clips[:1], [("image", (128, 128))])
    ids = torch.tensor([float_engine.encode_prompt(spec.IMAGE_PROMPT)])
    valid = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        logp = []
        for e in (float_engine, int8_engine):
            embeds, kvalid, conds = e.model.inputs(vis, ids, valid)
            positions = torch.arange(embeds.shape[1])[None]
            from lavi.core.model import attention_mask
            mask = attention_mask(kvalid, torch.arange(embeds.shape[1]), kvalid)
            logits, _ = e.model.decoder(embeds, positions, mask, conds=conds)
            logp.append(torch.softmax(logits.float(), -1))
    torch.testing.assert_close(logp[1], logp[0], atol=PROB_ATOL, rtol=0)


def test_quantize_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="int8"):
        quantize(Engine.load(DEFAULT_MODEL).model, "int4")


def test_run_quantize_reaches_the_labelers_engine_and_the_resume_settings():
    """Guards against `run --quantize int8` labelling with the float model, and int8 labels resumed into an output
    of float ones (or the other way round) without notice."""
    from pipeline.config import RunConfig
    from workers.labeler import Labeler, LabelerSpec

    labeler = Labeler(LabelerSpec(None, job_id="j", generation={"max_new_tokens": 4}, quantize="int8"))
    assert any(isinstance(m, Int8Linear) for m in labeler.engine.model.modules())
    base = RunConfig(inputs=("x",), out="o")
    assert "quantize" not in base.generation_settings()  # float outputs keep the settings they were written with
    assert RunConfig(inputs=("x",), out="o", quantize="int8").generation_settings()["quantize"] == "int8"
    with pytest.raises(ValueError, match="--quantize"):
        RunConfig(inputs=("x",), out="o", quantize="int4")
