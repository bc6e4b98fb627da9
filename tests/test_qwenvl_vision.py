"""lavi.qwenvl's vision towers against transformers 5's: Qwen2-VL, Qwen2.5-VL (windows) and Qwen3-VL (learned
positions, deepstack), on tiny random checkpoints saved with save_pretrained; the config's layouts and refusals."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers.activations import ACT2FN
from transformers.vision_utils import get_vision_window_index

from lavi.qwenvl import vision_config
from lavi.qwenvl.vision import ACTIVATIONS, QwenVision, visual_weights, window_order
from lavi.qwenvl.kinds import MODEL_TYPES as KINDS, QWEN2_5_VL, QWEN2_VL, QWEN3_VL
from lavi.qwenvl.vision_config import QwenVisionConfig

# kind -> transformers' (full config, full model, vision config) classes
REFERENCE = {
    QWEN2_VL: (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration,
               transformers.Qwen2VLVisionConfig),
    QWEN2_5_VL: (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration,
                 transformers.Qwen2_5_VLVisionConfig),
    QWEN3_VL: (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration,
               transformers.Qwen3VLVisionConfig),
}
TINY = {
    QWEN2_VL: QwenVisionConfig(kind=QWEN2_VL, depth=3, hidden_size=32, num_heads=2, intermediate_size=64,
                               hidden_act="quick_gelu", out_hidden_size=24, patch_size=4),
    # windows of 3 x 3 merge blocks (24 px / merge 2 / patch 4): uneven on most grids below; block 2 attends fully
    QWEN2_5_VL: QwenVisionConfig(kind=QWEN2_5_VL, depth=4, hidden_size=32, num_heads=2, intermediate_size=48,
                                 hidden_act="silu", out_hidden_size=24, patch_size=4, window_size=24,
                                 fullatt_block_indexes=(2,), tokens_per_second=2),
    # a 4 x 4 learned position grid, resized to every grid below
    QWEN3_VL: QwenVisionConfig(kind=QWEN3_VL, depth=4, hidden_size=32, num_heads=2, intermediate_size=48,
                               hidden_act="gelu_pytorch_tanh", out_hidden_size=24, patch_size=4,
                               num_position_embeddings=16, deepstack_visual_indexes=(0, 2)),
}
GRIDS = [(1, 4, 6), (1, 8, 8), (1, 2, 14), (3, 4, 4), (1, 12, 12)]  # images, a 3-frame video, one even-window image
ROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, rope_parameters=ROPE)
# published vision_configs (Qwen2-VL-7B-Instruct, Qwen2.5-VL-7B-Instruct, Qwen3-VL-4B-Instruct): the hub's layouts
HUB = {
    QWEN2_VL: {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 3584,
               "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2},
    QWEN2_5_VL: {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                 "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                 "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                 "tokens_per_second": 2, "temporal_patch_size": 2},
    QWEN3_VL: {"deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
               "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
               "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2560,
               "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
}


@pytest.fixture(scope="module", params=KINDS)
def towers(request, tmp_path_factory):
    """(transformers' tower, ours loaded from its save_pretrained checkpoint by the prefix rule, our config)."""
    kind, config = request.param, TINY[request.param]
    config_cls, model_cls, _ = REFERENCE[kind]
    text = {**TEXT, "rope_parameters": {**ROPE, "mrope_interleaved": True}} if kind == QWEN3_VL else TEXT
    torch.manual_seed(0)
    model = model_cls(config_cls(text_config=text, vision_config=config.as_hf())).eval()
    with torch.no_grad():  # every weight off its init (norms off 1, biases off 0), so a swapped one shows
        for p in model.model.visual.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    ours = QwenVision(config).eval()
    ours.load_state_dict(visual_weights(load_file(path / "model.safetensors")))  # strict: every name matches
    return model.model.visual, ours, config


def _pixels(config: QwenVisionConfig, grids: list[tuple[int, int, int]], seed: int = 1) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, config.patch_dim, generator=torch.Generator().manual_seed(seed))


def test_tower_equals_transformers(towers):
    """Guards against any drift from transformers' tower: patch order, the 2D rope, attention leaking across images,
    frames or Qwen2.5-VL's (uneven) windows, the window reordering and its undoing, Qwen3-VL's position resize off
    its trained side, the mergers, the deepstack outputs and their order."""
    reference, ours, config = towers
    grid_thw, pixels = torch.tensor(GRIDS), _pixels(config, GRIDS)
    with torch.no_grad():
        want = reference(pixels, grid_thw)
        tokens, deepstack = ours(pixels, grid_thw)
    merged = sum(t * h * w for t, h, w in GRIDS) // config.spatial_merge_size ** 2
    assert tokens.shape == (merged, config.out_hidden_size)
    torch.testing.assert_close(tokens, want.pooler_output, rtol=1e-4, atol=1e-5)
    want_deepstack = getattr(want, "deepstack_features", None) or []
    assert len(deepstack) == len(want_deepstack) == len(config.deepstack_visual_indexes)
    for got, expected in zip(deepstack, want_deepstack):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_batch_equals_one_by_one(towers):
    """Guards against items of one call changing each other (a mask or window spanning two images)."""
    _, ours, config = towers
    pixels = _pixels(config, GRIDS, seed=2)
    with torch.no_grad():
        tokens, deepstack = ours(pixels, torch.tensor(GRIDS))
        alone = [ours(part, torch.tensor([grid])) for part, grid in
                 zip(pixels.split([t * h * w for t, h, w in GRIDS]), GRIDS)]
    torch.testing.assert_close(tokens, torch.cat([a[0] for a in alone]), rtol=1e-4, atol=1e-5)
    for i, layer in enumerate(deepstack):
        torch.testing.assert_close(layer, torch.cat([a[1][i] for a in alone]), rtol=1e-4, atol=1e-5)


def test_windows_equal_transformers_windows():
    """Guards against a wrong window order or size where windows do not divide the grid evenly."""
    config = TINY[QWEN2_5_VL]
    order, sizes = window_order(GRIDS, config.spatial_merge_size, config.window_units)
    assert len(set(sizes)) > 1  # the grids do give uneven windows
    want_order, want_bounds = get_vision_window_index(torch.tensor(GRIDS), config.spatial_merge_size,
                                                      config.window_size, config.patch_size)
    assert order.tolist() == want_order.tolist()
    bounds = torch.tensor([0, *sizes]).cumsum(0) * config.spatial_merge_size ** 2
    assert bounds.tolist() == want_bounds.tolist()


def test_activations_equal_transformers():
    """Guards against an activation the config accepts but the tower computes differently (or lacks)."""
    assert set(ACTIVATIONS) == set(vision_config.ACTIVATIONS)
    x = torch.linspace(-6, 6, 101)
    for name, fn in ACTIVATIONS.items():
        torch.testing.assert_close(fn(x), ACT2FN[name](x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trips_through_transformers(kind):
    """Guards against as_hf writing what transformers (or from_hf) reads as another tower."""
    config = TINY[kind]
    assert QwenVisionConfig.from_hf(config.as_hf(), kind) == config
    reference = REFERENCE[kind][2](**config.as_hf()).to_dict()
    assert QwenVisionConfig.from_hf(reference, kind) == config


@pytest.mark.parametrize("kind", KINDS)
def test_reads_hub_layouts_and_defaults_as_transformers(kind):
    """Guards against misreading the hub's older layouts (Qwen2-VL's embed_dim / mlp_ratio / hidden_size, in_chans)
    or a left-out key taking another default than transformers'."""
    vision_cls = REFERENCE[kind][2]
    hub = QwenVisionConfig.from_hf(HUB[kind], kind)
    assert hub == QwenVisionConfig.from_hf(vision_cls(**HUB[kind]).to_dict(), kind)
    assert QwenVisionConfig.from_hf({}, kind) == QwenVisionConfig.from_hf(vision_cls().to_dict(), kind)
    if kind == QWEN2_VL:  # the merger's output is the LLM's width, the hub's `hidden_size`
        assert (hub.hidden_size, hub.out_hidden_size) == (HUB[kind]["embed_dim"], HUB[kind]["hidden_size"])
        assert hub.intermediate_size == HUB[kind]["embed_dim"] * HUB[kind]["mlp_ratio"]


@pytest.mark.parametrize("kind, change, field", [
    (QWEN2_VL, {"hidden_act": "relu"}, "hidden_act"),
    (QWEN2_VL, {"mlp_ratio": 2.5}, "mlp_ratio"),
    (QWEN2_VL, {"embed_dim": 30, "num_heads": 3}, "head_dim"),
    (QWEN2_VL, {"head_dim": 64}, "head_dim"),
    (QWEN2_VL, {"spatial_patch_size": 16}, "spatial_patch_size"),
    (QWEN2_5_VL, {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
    (QWEN2_5_VL, {"window_size": 14}, "window_size"),
    (QWEN2_5_VL, {"depth": 4, "fullatt_block_indexes": [4]}, "fullatt_block_indexes"),
    (QWEN3_VL, {"depth": 4, "deepstack_visual_indexes": [1, 1]}, "deepstack_visual_indexes"),
    (QWEN3_VL, {"patch_size": [16, 16]}, "patch_size"),
    ("qwen4_vl", {}, "kind"),
])
def test_refuses_what_the_tower_does_not_implement(kind, change, field):
    """Guards against loading a tower this code would compute wrongly, and against a refusal that does not say
    what in one line."""
    with pytest.raises(ValueError, match=field) as refused:
        QwenVisionConfig.from_hf(change, kind)
    assert "\n" not in str(refused.value)


def test_refuses_another_towers_fields():
    """Guards against a config that says windows or deepstack for a tower that has neither."""
    with pytest.raises(ValueError, match="window_size"):
        dataclasses.replace(TINY[QWEN2_VL], window_size=112)
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        dataclasses.replace(TINY[QWEN2_5_VL], deepstack_visual_indexes=(1,))


def test_refuses_inputs_that_do_not_fit():
    """Guards against pixel rows and grids that disagree being cut silently into wrong images."""
    config = TINY[QWEN2_VL]
    ours = QwenVision(config)
    with pytest.raises(ValueError, match="pixel_values"):
        ours(_pixels(config, [(1, 4, 4)])[:-1], torch.tensor([(1, 4, 4)]))
    with pytest.raises(ValueError, match="spatial_merge_size"):
        ours(_pixels(config, [(1, 3, 4)]), torch.tensor([(1, 3, 4)]))


def test_prefix_rule():
    """Guards against the tower's weights being missed (either checkpoint prefix) or the LLM's being taken."""
    w = torch.zeros(1)
    state = {"model.visual.blocks.0.attn.qkv.weight": w, "visual.merger.ln_q.weight": w,
             "model.language_model.layers.0.mlp.up_proj.weight": w, "lm_head.weight": w}
    assert set(visual_weights(state)) == {"blocks.0.attn.qkv.weight", "merger.ln_q.weight"}


def test_config_needs_no_torch():
    """Guards against the torch-free config (read by the driver) growing a torch import."""
    code = "import sys, lavi.qwenvl.vision_config\nassert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
