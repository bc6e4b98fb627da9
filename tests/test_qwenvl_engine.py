"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL in our engine: greedy generation token-identical to transformers' generate(),
batched == one by one, in-flight == static, a decode step that compiles whole; the checkpoint layouts and the family
registry. Tiny random checkpoints written by `save_pretrained` (tests/qwenvl_fixture.py); fp32, CPU, seconds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwenvl_fixture import (KINDS, PROMPT, dirs, engines, hf_models, image, make_qwenvl,  # noqa: F401
                            mm_types, reference_pixels, transformers)

from lavi.core.fusion import Visual
from lavi.qwenvl import checkpoint as qwen_checkpoint
from lavi.qwenvl.engine import QwenVLEngine, _reader, frame_times, seconds_per_patch
from lavi.qwenvl.pixels import pixel_values
from lavi.serving.steps import GenerationConfig

GEN = GenerationConfig(max_new_tokens=12)


# -- generation -----------------------------------------------------------------------------------------------------
def _hf_inputs(engine, d, frames: np.ndarray, media: tuple) -> tuple[Visual, torch.Tensor, torch.Tensor, dict]:
    """One item and PROMPT on both sides: our encoded item and prompt, and transformers' expanded ids and pixel
    inputs (the PIL image processor's for an image; a video's at the model's input, as our engine computes them)."""
    c = engine.config
    vis = engine._encode([frames], [media])
    prompt = torch.tensor([engine.encode_prompt(PROMPT, media[0])])
    ids = torch.tensor(engine.model.rows(vis, prompt, torch.ones_like(prompt, dtype=torch.bool)))
    if media[0] == "image":
        pixels, grid = reference_pixels(d, frames[0])
        inputs = {"pixel_values": pixels, "image_grid_thw": grid}
    else:
        pixels, grid = pixel_values(frames, engine.processor.video)
        inputs = {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([grid])}
        if c.tokens_per_second:
            times = frame_times(len(frames), media[2] if len(media) > 2 else None)
            inputs["second_per_grid_ts"] = torch.tensor([seconds_per_patch(times, c.temporal_patch_size)])
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm_types(ids, c))
    return vis, prompt, ids, inputs


def _hf_generate(hf, engine, d, frames: np.ndarray, media: tuple) -> list[int]:
    c = engine.config
    _, _, ids, inputs = _hf_inputs(engine, d, frames, media)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=GEN.max_new_tokens, do_sample=False)
    ref = out[0, ids.shape[1]:].tolist()
    return ref[: ref.index(c.eos_token_id)] if c.eos_token_id in ref else ref


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_is_token_identical_to_transformers_generate(dirs, hf_models, engines, kind):
    """Our static-cache prefill (M-RoPE) and decode steps (plain positions from each row's largest + 1) pick
    transformers' generate() tokens, for images of two sizes and a video (a decode position off by the rope delta
    diverges within a few tokens)."""
    engine, hf = engines[(kind, False)], hf_models[(kind, False)]
    clip = np.stack([image((16, 24), i) for i in range(3)])
    cases = [(image((24, 40), 7)[None], ("image", (24, 40))), (image((56, 48), 8)[None], ("image", (56, 48))),
             (clip, ("video", (16, 24), [0.0, 0.5, 1.0]))]
    for frames, media in cases:
        [got] = engine.generate([frames], [(0, PROMPT)], GEN, media=[media])
        ref = _hf_generate(hf, engine, dirs[(kind, False)], frames, media)
        assert ref and got.text == engine.tokenizer.decode(ref), media
        assert got.num_generated_tokens == len(ref) + int(got.finished)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_logits_are_bit_identical_to_transformers(dirs, kind):
    """A hub checkpoint is bf16 and runs in bf16 where the CPU computes it (or on a GPU): at these sizes (no packed
    or differently blocked products) the full forward's logits equal transformers' bf16 forward bit for bit, for
    images of three sizes and a video. Guards against a rounding of our own: rotary positions computed in float32
    and rounded once, where transformers rounds q * cos and rotate_half(q) * sin each in bf16, moved the logits by up
    to 0.04 and changed the greedy text of 1 or 2 images in 6; Qwen3-VL's position table resized by F.interpolate
    (transformers sums four weighted rows) by up to 0.06."""
    d = dirs[(kind, False)]
    hf = transformers.AutoModelForImageTextToText.from_pretrained(d, dtype=torch.bfloat16).eval()
    engine = QwenVLEngine.load(str(d), max_batch=2, dtype=torch.bfloat16)
    clip = np.stack([image((16, 24), i) for i in range(3)])
    cases = [(image(s, i)[None], ("image", s)) for i, s in enumerate([(24, 40), (64, 16), (56, 48)])]
    cases.append((clip, ("video", (16, 24), [0.0, 0.5, 1.0])))
    for frames, media in cases:
        vis, prompt, _, inputs = _hf_inputs(engine, d, frames, media)
        with torch.no_grad():
            ref = hf(**inputs).logits
            ours = engine.model(vis, prompt, torch.ones_like(prompt, dtype=torch.bool))
        assert ours.dtype == ref.dtype == torch.bfloat16
        assert torch.equal(ours, ref), (media, (ours.float() - ref.float()).abs().max().item())


def _mixed(engine) -> tuple[list[np.ndarray], list[tuple], list[tuple[int, str]]]:
    sizes = [(24, 40), (64, 16), (8, 8), (56, 48)]
    visuals = [image(s, seed=i)[None] for i, s in enumerate(sizes)]
    media: list[tuple] = [("image", s) for s in sizes]
    visuals.append(np.stack([image((16, 24), i) for i in range(3)]))
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
    saved, engine.max_batch = engine.max_batch, 3
    try:
        pooled = engine.generate(visuals, requests, GEN, media=media, inflight=True)
    finally:
        engine.max_batch = saved
    assert [(g.text, g.num_generated_tokens) for g in pooled] == [(g.text, g.num_generated_tokens) for g in static]


def test_the_decode_step_compiles_whole(engines):
    """Guards against a graph break in Qwen3-VL's decode step (q/k norms, plain positions after an M-RoPE prefill,
    no deepstack), which would stop CUDA graphs on the GPU: torch.compile(fullgraph=True) raises on any break; the
    tokens equal eager's."""
    from lavi.serving.generate import Generator
    from lavi.serving.steps import setup_caches

    engine = engines[("qwen3_vl", False)]
    visuals, media, requests = _mixed(engine)
    vis = engine._encode(visuals[-2:], media[-2:])
    prompts = [engine.encode_prompt(PROMPT, m[0]) for m in media[-2:]] * 2
    rows, gen = torch.tensor([0, 1, 0, 1]), GenerationConfig(max_new_tokens=6)
    eager = Generator(engine.model, setup_caches(engine.model, 2, 128))(vis, rows, prompts, gen, -1, turns=True)
    compiled = Generator(engine.model, setup_caches(engine.model, 2, 128), compile=True, backend="eager")
    assert compiled(vis, rows, prompts, gen, -1, turns=True) == eager


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


def test_checkpoints_fill_storage_made_in_the_dtype_they_compute_in(dirs, tmp_path, monkeypatch):
    """Guards against a bf16 model filled into float32 storage and cast after: twice its memory at load (a 7B
    Qwen's 16 GB of weights became 33 GB of float32, more than a 24 GB machine has) and a conversion each way (a
    random 3B loaded in 37 s, 17 s without). Every family's loader: the module's parameters are already in the
    requested dtype when the checkpoint's tensors are copied into them."""
    from onevision_fixture import make_onevision

    from lavi.core import checkpoint as lavi_checkpoint
    from lavi.onevision import checkpoint as onevision_checkpoint
    from lavi.tiny_models import make_tiny_checkpoint

    seen = []
    original = torch.nn.Module.load_state_dict

    def recording(module, state, *args, **kwargs):
        seen.append({p.dtype for p in module.parameters()})
        return original(module, state, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", recording)
    lavi_dir = make_tiny_checkpoint(tmp_path / "lavi")
    for load, d in ((qwen_checkpoint.load, dirs[("qwen3_vl", False)]),
                    (onevision_checkpoint.load, make_onevision(tmp_path / "ov")), (lavi_checkpoint.load, lavi_dir)):
        seen.clear()
        model = load(d, dtype=torch.bfloat16)
        assert seen == [{torch.bfloat16}] and {p.dtype for p in model.parameters()} == {torch.bfloat16}, load


def test_engine_load_dispatches_a_qwen_vl_directory(dirs):
    """`Engine.load` (what the labeler and eval call) opens each kind through the family registry, and the driver's
    model info says its visual tokens are in the context."""
    from lavi.families import QWEN_VL, family_at
    from lavi.serving.engine import Engine

    for key, d in dirs.items():
        engine = Engine.load(str(d), max_batch=2)
        assert isinstance(engine, QwenVLEngine)
        family = family_at(d)
        info = family.describe(json.loads((d / "config.json").read_text()), _reader(d), "tiny")
        assert family.name == info.family == QWEN_VL and info.vision_in_context
        # the driver's contract (the decode workers resize to it) is the engine's (its pixels assume it)
        assert info.dynamic == engine.dynamic and info.dynamic.image.factor == 8 and info.image_size >= 8


def test_context_lengths_are_the_expanded_rows(engines):
    """The prefill groups (lavi.serving.steps.context_lengths) and the cache's size see each row's context as the
    prefill lays it out: Qwen3-VL's video with its "<t seconds>" text and each temporal patch's start and end (a
    count of visual tokens alone left those out)."""
    from lavi.serving.steps import context_lengths, left_pad

    for kind in KINDS:
        engine = engines[(kind, False)]
        visuals, media, _ = _mixed(engine)
        vis = engine._encode(visuals, media)
        prompts = [engine.encode_prompt(PROMPT, m[0]) for m in media]
        ids, valid = left_pad(prompts, engine.pad_id, engine.model.device)
        want = [len(r) for r in engine.model.rows(vis, ids, valid)]
        assert context_lengths(engine.model, vis, prompts) == want
        assert engine._context(vis, list(range(len(prompts))), prompts) == max(want)
        if kind == "qwen3_vl":  # the video's timestamps are text beside its visual tokens
            assert want[-1] > len(prompts[-1]) - 1 + int(vis.mask[-1].sum())


def test_the_memory_probe_is_the_largest_input_the_contract_gives(engines):
    """Guards against fit_batch (GPU memory -> rows per batch) measuring a smaller input than a run can give (the
    448 px square it measured before, where the processor takes up to max_pixels: the batch it set would overflow
    the GPU on large images), or a probe the engine refuses."""
    rng = np.random.default_rng(0)
    for kind in ("qwen2_5_vl", "qwen3_vl"):
        engine = engines[(kind, False)]
        frames, media = engine._probe(4)
        most = engine._visual_tokens(frames, media)
        for h, w in rng.integers(8, 3000, (300, 2)).tolist():
            if max(h, w) > 200 * min(h, w):
                continue
            image, clip = engine.dynamic.image.size(h, w), engine.dynamic.video.size(h, w, 4)
            assert engine._visual_tokens(np.zeros((1, *image, 3), np.uint8), ("image", image)) <= most
            assert engine._visual_tokens(np.zeros((4, *clip, 3), np.uint8), ("video", clip)) <= most
        vis = engine._encode([frames], [media])
        assert int(vis.mask.sum()) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_int8_qwen_vl_is_close_to_the_float_one(dirs, engines, kind):
    """--quantize int8 reaches a Qwen-VL's decoder (every linear of its layers and the head swapped) and keeps its
    next-token distribution within 0.02 of the float model's over a batch of mixed images and a video."""
    from lavi.core.model import attention_mask
    from lavi.serving.quant import Int8Linear
    from lavi.serving.steps import left_pad

    engine = engines[(kind, False)]
    q = QwenVLEngine.load(str(dirs[(kind, False)]), max_batch=8, quantize="int8")
    layers = engine.config.decoder.num_layers
    assert sum(isinstance(m, Int8Linear) for m in q.model.modules()) == 7 * layers + 1
    visuals, media, requests = _mixed(engine)
    probs = []
    for e in (engine, q):
        vis = e._encode(visuals, media)
        prompts = [e._prompt(p, media[v][0]) for v, p in requests]
        ids, valid = left_pad(prompts, e.pad_id, e.model.device)
        sub = vis.select(torch.tensor([v for v, _ in requests]))
        embeds, kvalid, conds = e.model.inputs(sub, ids, valid)
        positions, _ = e.model.prefill_positions(sub, ids, valid)
        mask = attention_mask(kvalid, torch.arange(embeds.shape[1]), kvalid)
        with torch.no_grad():
            logits, _ = e.model.decoder(embeds, positions, mask, conds=conds, last_only=True)
        probs.append(torch.softmax(logits.float(), -1))
    torch.testing.assert_close(probs[1], probs[0], atol=0.02, rtol=0)
    texts = [c.text for c in q.generate(visuals, requests, GEN, media=media)]
    assert len(texts) == len(requests) and all(isinstance(t, str) for t in texts)
