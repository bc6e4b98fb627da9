"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL against transformers 5's models and processors: the config's layouts and
refusals, M-RoPE, the pixels, the prompt layout and its positions, the logits. Tiny random checkpoints written by
`save_pretrained` (tests/qwenvl_fixture.py); fp32, CPU, seconds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwenvl_fixture import (KINDS, PROMPT, SIZES, VARIANTS, dirs, engines, hf_models,  # noqa: F401
                            image, mm_types, reference_ids, reference_pixels)

from lavi.core.rope import rope_cos_sin
from lavi.qwenvl.config import QwenVLConfig
from lavi.qwenvl.engine import seconds_per_patch
from lavi.qwenvl.pixels import pixel_values


# -- config ---------------------------------------------------------------------------------------------------------
def test_flat_and_nested_layouts_read_the_same(dirs):
    """The hub's flat config.json (text fields at the top, rope_scaling {"type": "mrope"}) and transformers 5's nested
    one give one config; a field read from the wrong level (theta, sections, ties, token ids) breaks equality."""
    for kind in ("qwen2_vl", "qwen2_5_vl"):
        nested, flat = (QwenVLConfig.from_dir(dirs[(kind, f)]) for f in (False, True))
        assert nested.decoder == flat.decoder
        assert nested.decoder.mrope_section == (2, 1, 1) and not nested.decoder.mrope_interleaved
        assert (nested.image_token_id, nested.eos_token_ids) == (flat.image_token_id, flat.eos_token_ids)
    q3 = QwenVLConfig.from_dir(dirs[("qwen3_vl", False)])
    assert q3.decoder.qk_norm and q3.decoder.mrope_interleaved and q3.decoder.head_dim == 8 and q3.stamped
    assert QwenVLConfig.from_dir(dirs[("qwen2_5_vl", False)]).tokens_per_second == 2


# published config.json files (vision_config left out: lavi.qwenvl.vision_config's tests read those)
HUB = {
    "Qwen2-VL-7B-Instruct": {"model_type": "qwen2_vl", "hidden_size": 3584, "intermediate_size": 18944,
                             "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
                             "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
                             "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 152064,
                             "max_window_layers": 28, "eos_token_id": 151645, "bos_token_id": 151643,
                             "vision_start_token_id": 151652, "vision_end_token_id": 151653,
                             "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
                             "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
    "Qwen2.5-VL-3B-Instruct": {"model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008,
                               "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
                               "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
                               "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936,
                               "eos_token_id": 151645, "image_token_id": 151655, "video_token_id": 151656,
                               "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                               "vision_config": {"tokens_per_second": 2, "patch_size": 14}},
    "Qwen3-VL-4B-Instruct": {"model_type": "qwen3_vl", "image_token_id": 151655, "video_token_id": 151656,
                             "tie_word_embeddings": True, "text_config": {
                                 "attention_bias": False, "eos_token_id": 151645, "head_dim": 128,
                                 "hidden_size": 2560, "intermediate_size": 9728, "num_attention_heads": 32,
                                 "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                                 "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                                  "rope_type": "default"},
                                 "rope_theta": 5000000, "tie_word_embeddings": True, "vocab_size": 151936},
                             "vision_config": {"patch_size": 16, "spatial_merge_size": 2}},
}


@pytest.mark.parametrize("name", HUB)
def test_published_configs_map_onto_ours(name):
    """The hub's own config.json files read as transformers reads them: Qwen2-VL's head_dim from hidden/heads and
    q/k/v biases, Qwen3-VL's head_dim, q/k norms, interleaved sections and theta from text_config, ties, EOS."""
    c = QwenVLConfig.from_hf(HUB[name], {"eos_token_id": [151645, 151643]})
    d = c.decoder
    want = {"Qwen2-VL-7B-Instruct": (128, True, False, (16, 24, 24), 1e6, False, 0.0, 28),
            "Qwen2.5-VL-3B-Instruct": (128, True, False, (16, 24, 24), 1e6, True, 2.0, 28),
            "Qwen3-VL-4B-Instruct": (128, False, True, (24, 20, 20), 5e6, True, 0.0, 32)}[name]
    assert (d.head_dim, d.qkv_bias, d.qk_norm, d.mrope_section, d.rope_theta, d.tie_word_embeddings,
            c.tokens_per_second, c.factor) == want
    assert d.mrope_interleaved == (name == "Qwen3-VL-4B-Instruct") and c.eos_token_ids == (151645, 151643)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "qwen3_vl_moe"}, "'qwen3_vl_moe' is not supported .*mixture-of-experts"),
    ({"model_type": "qwen3_5"}, "'qwen3_5' is not supported .*linear-attention"),
    ({"text_config": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "mrope_section": [2, 1, 1]}}},
     "rope scaling 'yarn'"),
    ({"text_config": {"use_sliding_window": True}}, "use_sliding_window"),
    ({"text_config": {"hidden_act": "gelu"}}, "hidden_act 'gelu'"),
    ({"text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 2]}}}, "mrope_section"),
])
def test_unsupported_options_are_refused_by_name(dirs, change, match):
    """What we do not implement is refused in one line naming it, by the family registry's load (a MoE or linear-
    attention sibling is not mistaken for an unknown model type, nor loaded wrong)."""
    from lavi.families import CheckpointError, family_of

    hf = json.loads((dirs[("qwen3_vl", False)] / "config.json").read_text())
    for key, value in change.items():
        hf[key] = {**hf[key], **value} if isinstance(value, dict) else value
    with pytest.raises(CheckpointError, match=match):
        family_of(hf).describe(hf, lambda name: None, "x")


# -- the decoder ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interleaved", [False, True])
def test_mrope_with_equal_axes_is_plain_rope(interleaved):
    """A decode step gives plain (B, T) positions: that is M-RoPE with all three axes equal only if every frequency
    takes some axis's angle of the same position (a section mix-up or a lost frequency breaks it), while unequal
    axes do change the rotation."""
    pos = torch.arange(7)[None].expand(2, 7) + torch.tensor([[0], [5]])
    plain = rope_cos_sin(pos, 16, 10000.0)
    same = rope_cos_sin(pos[None].expand(3, -1, -1), 16, 10000.0, (2, 3, 3), interleaved)
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    other = rope_cos_sin(torch.stack([pos, pos * 2, pos + 3]), 16, 10000.0, (2, 3, 3), interleaved)
    assert not torch.equal(other[0], plain[0])


# -- pixels and layout ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_the_engine_pixels_equal_the_image_processor(dirs, engines, size):
    """The engine's image processor, read from the checkpoint's preprocessor_config.json, gives
    Qwen2VLImageProcessorPil's pixel values for an image already at a valid size (a processor read with the model
    type's defaults instead of the file's patch size or mean and std would not)."""
    d = dirs[("qwen2_vl", False)]
    img = image(size, sum(size))
    ref, grid = reference_pixels(d, img)
    ours, our_grid = pixel_values(img[None], engines[("qwen2_vl", False)].processor.image)
    assert our_grid == tuple(grid[0].tolist())
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_expanded_prompts_and_rope_index_equal_the_processor_and_transformers(dirs, hf_models, engines, kind):
    """Our prompt layout (the placeholder's expansion; Qwen3-VL's timestamps and per-patch start/end) is what the
    processor writes, and our M-RoPE positions and first decode position are transformers' get_rope_index's (with
    Qwen2.5-VL's tokens_per_second x seconds), for an image and a video, left-padded in one batch."""
    d, hf, engine = dirs[(kind, False)], hf_models[(kind, False)], engines[(kind, False)]
    c = engine.config
    img, clip, times = image((24, 40), 3), np.stack([image((16, 24), i) for i in range(3)]), [10.0, 11.0, 12.0]
    vis = engine._encode([img[None], clip], [("image", (24, 40)), ("video", (16, 24), times)])
    prompts = [engine.encode_prompt(PROMPT, m) for m in ("image", "video")]
    ids, valid = (torch.zeros(2, max(map(len, prompts)), dtype=torch.long), torch.zeros(2, max(map(len, prompts)),
                                                                                        dtype=torch.bool))
    for b, p in enumerate(prompts):
        ids[b, ids.shape[1] - len(p):], valid[b, ids.shape[1] - len(p):] = torch.tensor(p), True
    rows = engine.model.rows(vis, ids, valid)
    grids = vis.grids.tolist()
    assert rows[1] == reference_ids(d, "video", grids[1], times, kind)
    assert rows[0] == reference_ids(d, "image", grids[0])
    positions, nxt = engine.model.prefill_positions(vis, ids, valid)
    t = max(map(len, rows))
    full = torch.tensor([[0] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    extra = {"second_per_grid_ts": torch.tensor([seconds_per_patch(times, 2)])} if kind == "qwen2_5_vl" else {}
    ref, delta = hf.model.get_rope_index(full, mm_types(full, c), image_grid_thw=vis.grids[:1], video_grid_thw=vis.grids[1:],
                                         attention_mask=mask, **extra)
    torch.testing.assert_close(positions * mask, ref * mask, rtol=0, atol=0)
    assert nxt.tolist() == (delta[:, 0] + mask.sum(1)).tolist()


# -- logits ---------------------------------------------------------------------------------------------------------
def _our_logits(engine, frames: np.ndarray, media: tuple) -> tuple[torch.Tensor, list[int]]:
    vis = engine._encode([frames], [media])
    ids = torch.tensor([engine.encode_prompt(PROMPT, media[0])])
    with torch.no_grad():
        logits = engine.model(vis, ids, torch.ones_like(ids, dtype=torch.bool))[0]
    return logits, engine.model.rows(vis, ids, torch.ones_like(ids, dtype=torch.bool))[0]


@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{k}{'-flat' if f else ''}" for k, f in VARIANTS])
@pytest.mark.parametrize("size", SIZES)
def test_image_logits_equal_transformers(dirs, hf_models, engines, variant, size):
    """An image at its own resolution through our tower, splice and M-RoPE decoder gives transformers' logits at
    every position of the processor's expanded prompt (a flat checkpoint is checked against its nested twin: the
    same weights)."""
    kind = variant[0]
    engine, hf = engines[variant], hf_models[(kind, False)]
    img = image(size, seed=sum(size))
    got, expanded = _our_logits(engine, img[None], ("image", size))
    pixels, grid = reference_pixels(dirs[variant], img)
    ids = torch.tensor([expanded])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm_types(ids, engine.config)
                 ).logits[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_video_logits_equal_transformers(hf_models, engines, kind):
    """A 3-frame clip (its last temporal patch completed by repeating the last frame), with its frames' times:
    Qwen2.5-VL's temporal positions (tokens_per_second x seconds per patch), Qwen3-VL's timestamps and per-patch
    blocks, deepstack at the video's positions; logits equal transformers'."""
    engine, hf = engines[(kind, False)], hf_models[(kind, False)]
    c = engine.config
    clip, times = np.stack([image((16, 24), i) for i in range(3)]), [0.0, 1.0, 2.0]
    got, expanded = _our_logits(engine, clip, ("video", (16, 24), times))
    pixels, grid = pixel_values(clip, engine.processor.video)
    ids = torch.tensor([expanded])
    extra = {"second_per_grid_ts": torch.tensor([seconds_per_patch(times, 2)])} if kind == "qwen2_5_vl" else {}
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=torch.tensor([grid]),
                 mm_token_type_ids=mm_types(ids, c), **extra).logits[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_the_driver_describes_a_qwen_vl_without_torch(dirs):
    """Guards against an import chain from the family's torch-free family.py (config, the registry) into torch:
    the driver reads a checkpoint's model info and must start without the GPU stack."""
    import subprocess
    import sys
    from pathlib import Path

    code = (f"import json, os, sys\nfrom lavi.families import family_at\nd = {str(dirs[('qwen3_vl', False)])!r}\n"
            "f = family_at(d)\nread = lambda n: json.load(open(d + '/' + n)) if os.path.exists(d + '/' + n) else None\n"
            "info = f.describe(read('config.json'), read, 'x')\n"
            "assert info.family == 'qwen-vl' and info.dynamic.image.factor == 8, info\n"
            "assert 'torch' not in sys.modules, sorted(sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
