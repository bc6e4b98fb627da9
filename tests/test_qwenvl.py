"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL in our engine against transformers 5's models, on tiny random checkpoints
written by `save_pretrained` (tests/qwenvl_fixture.py). fp32, CPU, seconds. transformers' processors cannot be built
here (their video processor needs torchvision): pixel values come from Qwen2VLImageProcessorPil (images) or our
patchifier (videos, checked against the image processor), and the expanded prompts from the processors' own
replace_image_token / replace_video_token."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qwenvl_fixture import make_qwenvl

transformers = pytest.importorskip("transformers")

from lavi.core.decoder import rope_cos_sin  # noqa: E402
from lavi.qwenvl import checkpoint as qwen_checkpoint  # noqa: E402
from lavi.qwenvl.config import IMAGE, VIDEO, QwenVLConfig, UnsupportedCheckpoint  # noqa: E402
from lavi.qwenvl.engine import QwenVLEngine, frame_times, patches, seconds_per_patch  # noqa: E402
from lavi.serving.steps import GenerationConfig  # noqa: E402

GEN = GenerationConfig(max_new_tokens=12)
SIZES = [(24, 40), (64, 16), (8, 8), (56, 48)]  # (height, width), multiples of 8 (patch 4, merge 2)
# the checkpoints: every kind nested (transformers 5's layout), Qwen2-VL and Qwen2.5-VL also flat (the hub's)
VARIANTS = [("qwen2_vl", False), ("qwen2_vl", True), ("qwen2_5_vl", False), ("qwen2_5_vl", True), ("qwen3_vl", False)]
KINDS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
PROMPT = "describe the image."


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {(k, flat): make_qwenvl(tmp_path_factory.mktemp(f"{k}-{int(flat)}") / "tiny", k, seed=1, flat=flat)
            for k, flat in VARIANTS}


@pytest.fixture(scope="module")
def hf_models(dirs):
    return {key: transformers.AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
            for key, d in dirs.items() if not key[1]}


@pytest.fixture(scope="module")
def engines(dirs):
    return {key: QwenVLEngine.load(str(d), max_batch=8) for key, d in dirs.items()}


def _image(size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    img[: size[0] // 2] //= 2  # some structure
    return img


def _reference_pixels(d, img: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Qwen2VLImageProcessorPil.from_pretrained(d)(images=Image.fromarray(img), return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _reference_ids(d, media: str, grid, times: list[float] | None = None, kind: str = "qwen2_vl") -> list[int]:
    """The processor's expanded prompt: the chat template's turn, its placeholder replaced by the processor's own
    replace_image_token / replace_video_token (Qwen3-VL: the template's start/end pair collapsed first), tokenised by
    transformers' tokenizer."""
    tok = transformers.AutoTokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": PROMPT}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ns = SimpleNamespace(image_processor=SimpleNamespace(merge_size=2), image_token="<|image_pad|>",
                         video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
                         video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
                         vision_end_token="<|vision_end|>")
    grid_t = torch.tensor([grid])
    if media == "image":
        text = text.replace("<|image_pad|>", transformers.Qwen2VLProcessor.replace_image_token(
            ns, {"image_grid_thw": grid_t}, 0))
    elif kind == "qwen3_vl":
        proc = transformers.Qwen3VLProcessor
        ns._calculate_timestamps = lambda *a: proc._calculate_timestamps(ns, *a)
        fps = 2.0  # frames at times[i] = index / fps
        meta = SimpleNamespace(fps=fps, frames_indices=[round(t * fps) for t in times])
        text = text.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")
        text = text.replace("<|video_pad|>", proc.replace_video_token(
            ns, {"video_grid_thw": grid_t, "video_metadata": [meta]}, 0))
    else:
        text = text.replace("<|video_pad|>", transformers.Qwen2VLProcessor.replace_video_token(
            ns, {"video_grid_thw": grid_t}, 0))
    return tok(text)["input_ids"]


def _mm(ids: torch.Tensor, c: QwenVLConfig) -> torch.Tensor:
    return (ids == c.image_token_id).long() + 2 * (ids == c.video_token_id).long()


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
def test_patches_equal_the_image_processor(dirs, size):
    """Our uint8 -> pixel_values (rescale, normalise, merge-block patch order, the frame repeated over a temporal
    patch) is Qwen2VLImageProcessorPil's for an image already at a valid size."""
    d = dirs[("qwen2_vl", False)]
    img = _image(size, sum(size))
    ref, grid = _reference_pixels(d, img)
    ours, our_grid = patches(img[None], QwenVLConfig.from_dir(d))
    assert our_grid == tuple(grid[0].tolist())
    torch.testing.assert_close(torch.from_numpy(ours), ref, rtol=0, atol=1e-6)


def test_a_video_patch_of_equal_frames_is_the_image(dirs):
    """A video's temporal patch holds its frames in order (an odd count completed by the last frame): two equal
    frames give the image's patches, and a third frame makes a second temporal patch of itself twice."""
    c = QwenVLConfig.from_dir(dirs[("qwen2_vl", False)])
    img, other = _image((16, 24), 0), _image((16, 24), 1)
    video, grid = patches(np.stack([img, img, other]), c)
    assert grid == (2, 4, 6)
    np.testing.assert_array_equal(video[:24], patches(img[None], c)[0])
    np.testing.assert_array_equal(video[24:], patches(other[None], c)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_expanded_prompts_and_rope_index_equal_the_processor_and_transformers(dirs, hf_models, engines, kind):
    """Our prompt layout (the placeholder's expansion; Qwen3-VL's timestamps and per-patch start/end) is what the
    processor writes, and our M-RoPE positions and first decode position are transformers' get_rope_index's (with
    Qwen2.5-VL's tokens_per_second x seconds), for an image and a video, left-padded in one batch."""
    d, hf, engine = dirs[(kind, False)], hf_models[(kind, False)], engines[(kind, False)]
    c = engine.config
    img, clip, times = _image((24, 40), 3), np.stack([_image((16, 24), i) for i in range(3)]), [10.0, 11.0, 12.0]
    vis = engine._encode([img[None], clip], [("image", (24, 40)), ("video", (16, 24), times)])
    prompts = [engine.encode_prompt(PROMPT, m) for m in ("image", "video")]
    ids, valid = (torch.zeros(2, max(map(len, prompts)), dtype=torch.long), torch.zeros(2, max(map(len, prompts)),
                                                                                        dtype=torch.bool))
    for b, p in enumerate(prompts):
        ids[b, ids.shape[1] - len(p):], valid[b, ids.shape[1] - len(p):] = torch.tensor(p), True
    rows = engine.model.rows(vis, ids, valid)
    grids = vis.grids.tolist()
    assert rows[1] == _reference_ids(d, "video", grids[1], times, kind)
    assert rows[0] == _reference_ids(d, "image", grids[0])
    positions, nxt = engine.model.prefill_positions(vis, ids, valid)
    t = max(map(len, rows))
    full = torch.tensor([[0] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    extra = {"second_per_grid_ts": torch.tensor([seconds_per_patch(times, 2)])} if kind == "qwen2_5_vl" else {}
    ref, delta = hf.model.get_rope_index(full, _mm(full, c), image_grid_thw=vis.grids[:1], video_grid_thw=vis.grids[1:],
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
    img = _image(size, seed=sum(size))
    got, expanded = _our_logits(engine, img[None], ("image", size))
    pixels, grid = _reference_pixels(dirs[variant], img)
    ids = torch.tensor([expanded])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=_mm(ids, engine.config)
                 ).logits[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_video_logits_equal_transformers(hf_models, engines, kind):
    """A 3-frame clip (its last temporal patch completed by repeating the last frame), with its frames' times:
    Qwen2.5-VL's temporal positions (tokens_per_second x seconds per patch), Qwen3-VL's timestamps and per-patch
    blocks, deepstack at the video's positions; logits equal transformers'."""
    engine, hf = engines[(kind, False)], hf_models[(kind, False)]
    c = engine.config
    clip, times = np.stack([_image((16, 24), i) for i in range(3)]), [0.0, 1.0, 2.0]
    got, expanded = _our_logits(engine, clip, ("video", (16, 24), times))
    pixels, grid = patches(clip, c, engine.norm)
    ids = torch.tensor([expanded])
    extra = {"second_per_grid_ts": torch.tensor([seconds_per_patch(times, 2)])} if kind == "qwen2_5_vl" else {}
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values_videos=torch.from_numpy(pixels), video_grid_thw=torch.tensor([grid]),
                 mm_token_type_ids=_mm(ids, c), **extra).logits[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# -- generation -----------------------------------------------------------------------------------------------------
def _hf_generate(hf, engine, d, frames: np.ndarray, media: tuple) -> list[int]:
    c = engine.config
    vis = engine._encode([frames], [media])
    prompt = torch.tensor([engine.encode_prompt(PROMPT, media[0])])
    ids = torch.tensor(engine.model.rows(vis, prompt, torch.ones_like(prompt, dtype=torch.bool)))
    if media[0] == "image":
        pixels, grid = _reference_pixels(d, frames[0])
        inputs = {"pixel_values": pixels, "image_grid_thw": grid}
    else:
        pixels, grid = patches(frames, c, engine.norm)
        inputs = {"pixel_values_videos": torch.from_numpy(pixels), "video_grid_thw": torch.tensor([grid])}
        if c.tokens_per_second:
            times = frame_times(len(frames), media[2] if len(media) > 2 else None)
            inputs["second_per_grid_ts"] = torch.tensor([seconds_per_patch(times, c.temporal_patch_size)])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=_mm(ids, c), **inputs,
                          max_new_tokens=GEN.max_new_tokens, do_sample=False)
    ref = out[0, ids.shape[1]:].tolist()
    return ref[: ref.index(c.eos_token_id)] if c.eos_token_id in ref else ref


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_is_token_identical_to_transformers_generate(dirs, hf_models, engines, kind):
    """Our static-cache prefill (M-RoPE) and decode steps (plain positions from each row's largest + 1) pick
    transformers' generate() tokens, for images of two sizes and a video (a decode position off by the rope delta
    diverges within a few tokens)."""
    engine, hf = engines[(kind, False)], hf_models[(kind, False)]
    clip = np.stack([_image((16, 24), i) for i in range(3)])
    cases = [(_image((24, 40), 7)[None], ("image", (24, 40))), (_image((56, 48), 8)[None], ("image", (56, 48))),
             (clip, ("video", (16, 24), [0.0, 0.5, 1.0]))]
    for frames, media in cases:
        [got] = engine.generate([frames], [(0, PROMPT)], GEN, media=[media])
        ref = _hf_generate(hf, engine, dirs[(kind, False)], frames, media)
        assert ref and got.text == engine.tokenizer.decode(ref), media
        assert got.num_generated_tokens == len(ref) + int(got.finished)


def _mixed(engine) -> tuple[list[np.ndarray], list[tuple], list[tuple[int, str]]]:
    sizes = [(24, 40), (64, 16), (8, 8), (56, 48)]
    visuals = [_image(s, seed=i)[None] for i, s in enumerate(sizes)]
    media: list[tuple] = [("image", s) for s in sizes]
    visuals.append(np.stack([_image((16, 24), i) for i in range(3)]))
    media.append(("video", (16, 24), [0.0, 1.0, 2.0]))
    requests = [(i, q) for i in range(len(visuals)) for q in (PROMPT, "what colour is the square?")]
    return visuals, media, requests


@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_one_by_one_with_mixed_sizes_and_a_video(engines, kind):
    """Images of different sizes (different token counts, so different left padding and rope deltas) and a video in
    one batch give each row the text it gets alone: padding never leaks into attention, M-RoPE or deepstack."""
    engine = engines[(kind, False)]
    visuals, media, requests = _mixed(engine)
    batched = engine.generate(visuals, requests, GEN, media=media, inflight=False)
    alone = [engine.generate([visuals[i]], [(0, q)], GEN, media=[media[i]])[0] for i, q in requests]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert len({g.text for g in batched}) > 2  # the inputs matter


@pytest.mark.parametrize("kind", KINDS)
def test_inflight_equals_static(engines, kind):
    """The in-flight pool (3 rows for 10 requests: rows admitted into rows others left, each with its own first
    decode position) gives the static batch's tokens."""
    engine = engines[(kind, False)]
    visuals, media, requests = _mixed(engine)
    static = engine.generate(visuals, requests, GEN, media=media, inflight=False)
    engine.max_batch = 3
    try:
        pooled = engine.generate(visuals, requests, GEN, media=media, inflight=True)
    finally:
        engine.max_batch = 8
    assert [(g.text, g.num_generated_tokens) for g in pooled] == [(g.text, g.num_generated_tokens) for g in static]


# -- checkpoints ----------------------------------------------------------------------------------------------------
def test_transformers_5_names_shards_and_tied_embeddings_load(dirs, tmp_path):
    """A directory in transformers 5's in-memory names (model.language_model., model.visual.: Qwen3-VL's hub layout
    too), sharded with an index, loads to the same model as Qwen2-VL's hub layout (model.layers., visual.); tied
    embeddings (no lm_head stored) load tied."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = dirs[("qwen2_vl", False)]
    state = load_file(str(src / "model.safetensors"))
    assert any(k.startswith("visual.") for k in state) and any(k.startswith("model.layers.") for k in state)
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else
                "model.visual." + k[7:] if k.startswith("visual.") else k): v for k, v in state.items()}
    d = tmp_path / "v5"
    shutil.copytree(src, d)
    (d / "model.safetensors").unlink()
    names = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: renamed[k] for k in keys}, str(d / file))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    a, b = qwen_checkpoint.load(src), qwen_checkpoint.load(d)
    assert all(torch.equal(x, b.state_dict()[k]) for k, x in a.state_dict().items())
    tied = make_qwenvl(tmp_path / "tied", "qwen2_vl", tie=True)
    model = qwen_checkpoint.load(tied, dtype=torch.bfloat16)
    assert model.decoder.lm_head.weight is model.decoder.embed_tokens.weight and model.dtype == torch.bfloat16


def test_engine_load_dispatches_a_qwen_vl_directory(dirs):
    """`Engine.load` (what the labeler and eval call) opens each kind through the family registry, and the driver's
    model info says its visual tokens are in the context."""
    from lavi.families import QWEN_VL, family_at
    from lavi.serving.engine import Engine

    for key, d in dirs.items():
        assert isinstance(Engine.load(str(d), max_batch=2), QwenVLEngine)
        family = family_at(d)
        info = family.describe(json.loads((d / "config.json").read_text()), lambda name: None, "tiny")
        assert family.name == info.family == QWEN_VL and info.vision_in_context
