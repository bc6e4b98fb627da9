"""The concat path's parameter-free baselines (lavi.visual_tokens.methods, lavi.visual_tokens.fastv): DCT low-pass compression of the visual
token grid (Fourier-VLM) and FastV pruning after a decoder layer, on a concat LaVi and a LLaVA-OneVision."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from engines import widen
from onevision_fixture import make_onevision
from torch.testing import assert_close

from lavi.visual_tokens.methods import VisualCompress
from lavi.visual_tokens.dct import dct_lowpass
from lavi.serving.engine import Engine
from lavi.visual_tokens.fastv import keep_mask, last_token_attention
from lavi.serving.generate import Generator
from lavi.serving.steps import GenerationConfig, setup_caches
from lavi.serving.load_prep import packed
from lavi.tiny_models import make_tiny_checkpoint

GEN = GenerationConfig(max_new_tokens=8)
PROMPTS = ["describe the image.", "how many", "what colour is the big red circle on the left of the image?"]


@pytest.fixture(scope="module")
def concat_dir(tmp_path_factory) -> str:
    """A tiny concat LaVi with 4 decoder layers (FastV's pruning needs layers past K to act on)."""
    import dataclasses

    from lavi.core import checkpoint
    from lavi.core.model import LaVi

    tok = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tok")), fusion="concat")
    torch.manual_seed(3)
    config = checkpoint.LaViConfig.from_dict(json.loads((Path(tok) / "config.json").read_text()))
    config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, num_layers=4))
    out = tmp_path_factory.mktemp("concat")
    checkpoint.save(LaVi(config), out, tokenizer_dir=tok)
    return str(out)


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    return make_onevision(tmp_path_factory.mktemp("ov"), seed=1)


def _clips(size: int, frames=(1, 3, 2)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (f, size, size, 3), dtype=np.uint8) for f in frames]


def _texts(engine: Engine, clips, requests, media=None) -> list[str]:
    return [c.text for c in engine.generate(clips, requests, GEN, media=media)]


def test_spellings_parse_and_bad_ones_say_how():
    """Guards against a --visual-compress that silently means something else than it says."""
    assert VisualCompress.parse("dct:0.25") == VisualCompress("dct", 0.25)
    assert VisualCompress.parse("fastv:0.5@3") == VisualCompress("fastv", 0.5, 3)
    assert VisualCompress.parse("fastv:0.5").layer == 2 and VisualCompress.parse("fastv:0.5").spelled() == "fastv:0.5@2"
    for bad in ("dct", "dct:0", "dct:1.5", "fastv:x", "dct:0.5@1", "pool:0.5", "fastv:0.5@-1"):
        with pytest.raises(ValueError, match="dct:KEEP or fastv"):
            VisualCompress.parse(bad)
    assert VisualCompress("dct", 0.25).side(6) == 3 and VisualCompress("dct", 1.0).side(6) == 6
    assert VisualCompress("fastv", 0.3).kept(10) == 3 and VisualCompress("fastv", 0.01).kept(10) == 1


def test_the_dct_low_pass_keeps_the_low_frequencies():
    """Guards against a transform that is not the DCT's low-pass: the full size gives the grid back, a constant
    grid stays that constant at any size, and a grid of only low frequencies survives a smaller size as itself
    resampled (its mean and its coarse shape)."""
    g = torch.randn(2, 6, 6, 5, dtype=torch.float64).float()
    assert_close(dct_lowpass(g, 6), g, rtol=1e-5, atol=1e-5)
    const = torch.full((1, 6, 6, 3), 2.5)
    assert_close(dct_lowpass(const, 2), torch.full((1, 2, 2, 3), 2.5))
    smooth = torch.linspace(-1, 1, 6)[None, :, None, None].expand(1, 6, 6, 1)  # a ramp down the rows
    small = dct_lowpass(smooth, 3)
    assert_close(small.mean(), smooth.mean(), atol=1e-6, rtol=0)
    assert (small[0, 1:, :, 0] > small[0, :-1, :, 0]).all()  # still increasing down the rows
    assert_close(small[0, :, 0], small[0, :, 2])  # and constant along them


@pytest.mark.parametrize("spelling", ["dct:1", "fastv:1", "fastv:1@0"])
def test_keep_one_is_the_unmodified_model_exactly(concat_dir, ov_dir, spelling):
    """Guards against a baseline that changes the model at ratio 1.0 (its quality figures would then not start
    from the model's own)."""
    for path, media, size in ((concat_dir, None, 32), (ov_dir, [("video", (35, 35))] * 3, 35)):
        plain = widen(Engine.load(str(path), max_batch=4, pack=False))
        same = widen(Engine.load(str(path), max_batch=4, visual_compress=spelling, pack=False))
        clips, requests = _clips(size), [(i % 3, p) for i, p in enumerate(PROMPTS)]
        vis_a, vis_b = (e._encode(clips, media or [("video", c.shape[1:3]) for c in clips]) for e in (plain, same))
        assert torch.equal(vis_a.tokens, vis_b.tokens) and torch.equal(vis_a.mask, vis_b.mask)
        assert _texts(plain, clips, requests, media) == _texts(same, clips, requests, media)


def test_dct_shrinks_each_frame_grid_to_r_by_r(concat_dir, ov_dir):
    """Guards against a compression that drops the wrong tokens or miscounts them: a concat LaVi keeps R*R tokens
    a frame; a OneVision's image keeps its base view and crops at R x R a tile, its video R x R pooled to
    ceil(R/2)^2 a frame, each with its newline."""
    lavi = Engine.load(concat_dir, visual_compress="dct:0.25")
    clips = _clips(32)
    vis = lavi._encode(clips, [("video", c.shape[1:3]) for c in clips])
    side = math.isqrt(lavi.config.vision.num_patches)  # 4
    r = VisualCompress("dct", 0.25).side(side)  # 2
    assert vis.mask.sum(1).tolist() == [f * r * r for f in (1, 3, 2)]
    ov = Engine.load(str(ov_dir), visual_compress="dct:0.25", pack=False)
    c = ov.config
    r = VisualCompress("dct", 0.25).side(c.side)  # 5 -> 2 (round(2.5) is 2)
    frames = np.random.default_rng(1).integers(0, 256, (3, 35, 35, 3), dtype=np.uint8)
    video = ov._encode([frames], [("video", (35, 35))])
    assert int(video.mask.sum()) == 3 * math.ceil(r / 2) ** 2 + 1
    from workers.anyres import anyres_tiles

    img = np.random.default_rng(2).integers(0, 256, (35, 35, 3), dtype=np.uint8)
    one = ov._encode([anyres_tiles(img, c.pinpoints, c.tile_size, c.resample)], [("image", (35, 35))])
    assert int(one.mask.sum()) == r * r + r * (r + 1)  # the base view, then one crop's grid with newlines
    texts = _texts(widen(ov), [frames], [(0, "describe the image.")], [("video", (35, 35))])
    assert len(texts) == 1  # the smaller context generates


def _reference_greedy(model, vis, prompt: list[int], vc: VisualCompress, steps: int) -> list[int]:
    """FastV by recomputation: the whole sequence through the uncached decoder, layers past K attending to the
    prompt tokens the row keeps (chosen once, from layer K's attention of the last prompt token) and to every
    generated token; layers 0..K to everything."""
    dec = model.decoder
    ids = torch.tensor([prompt])
    embeds, kvalid, _ = model.inputs(vis, ids, torch.ones_like(ids, dtype=torch.bool))
    t0 = embeds.shape[1]
    positions = torch.arange(t0)[None]
    mask = torch.ones(1, 1, t0, t0, dtype=torch.bool).tril()
    _, hidden = dec(embeds, positions, mask, output_hidden_states=True)
    from lavi.core.rope import rope_cos_sin

    cos, sin = rope_cos_sin(positions, dec.config.head_dim, dec.config.rope_theta)
    probs = last_token_attention(dec.layers[vc.layer].self_attn, dec.layers[vc.layer].input_layernorm(hidden[vc.layer]),
                                 cos, sin, kvalid)
    kept = keep_mask(probs, model.visual_positions(vis, ids, torch.ones_like(ids, dtype=torch.bool)), kvalid, vc)
    out = []
    for _ in range(steps):
        t = embeds.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        deep = causal & torch.cat([kept[0], torch.ones(t - t0, dtype=torch.bool)])[None, :]
        logits, _ = dec(embeds, torch.arange(t)[None], causal[None, None], pruned=(vc.layer, deep[None, None]))
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        embeds = torch.cat([embeds, dec.embed_tokens(torch.tensor([[tok]]))], 1)
    return out, kept


@pytest.mark.parametrize("keep,layer", [(0.5, 0), (0.25, 1)])
def test_fastv_cached_generation_equals_recomputation_with_the_tokens_pruned(concat_dir, keep, layer):
    """Guards against FastV's cache bookkeeping: pruned tokens' K/V written to the wrong slots, a decode step
    whose deep layers still see the dropped tokens (or whose shallow layers stop seeing them), or the wrong
    tokens kept; and checks the cache lengths: the layers past K attend to text + kept visual slots only.
    The layers past K attend evenly (q = 0), so that every visual token they see moves the output."""
    engine = widen(Engine.load(concat_dir, visual_compress=f"fastv:{keep}@{layer}", pack=False), pack=False)
    model, vc = engine.model, engine.model.visual_compress
    with torch.no_grad():
        for block in model.decoder.layers[layer + 1:]:
            block.self_attn.q_proj.weight.zero_()
            block.self_attn.q_proj.bias.zero_()
    packed(model, None)
    clip = _clips(32, frames=(2,))
    vis = engine._encode(clip, [("video", (32, 32))])
    prompt = engine.encode_prompt(PROMPTS[2])
    cache = setup_caches(model, 4, 128)
    with torch.no_grad():
        for buffers in cache.layers:  # what earlier batches left: a slot read but never written would show
            buffers.k.normal_(std=30.0)
            buffers.v.normal_(std=30.0)
    gen = Generator(model, cache)
    with torch.no_grad():
        got = gen(vis, torch.tensor([0]), [prompt], GEN, eos_id=10_000)[0].tokens
        want, kept = _reference_greedy(model, vis, prompt, vc, GEN.max_new_tokens)
    assert got == want
    with torch.no_grad():  # the pruning must matter here, or this test could not fail
        ids = torch.tensor([prompt])
        embeds, _, _ = model.inputs(vis, ids, torch.ones_like(ids, dtype=torch.bool))
        t = embeds.shape[1]
        causal = torch.ones(1, 1, t, t, dtype=torch.bool).tril()
        whole = model.decoder(embeds, torch.arange(t)[None], causal)[0][0, -1]
        pruned = model.decoder(embeds, torch.arange(t)[None], causal, pruned=(layer, causal & kept[:, None, None]))
        assert (pruned[0][0, -1] - whole).abs().max() > 1e-2
    n_vis, t0 = int(vis.mask.sum()), len(prompt) + int(vis.mask.sum())
    deep, shallow = gen.fixed.deep_valid[0], gen.fixed.slot_valid[0]
    assert int(shallow[:t0].sum()) == t0 and int(deep[:t0].sum()) == len(prompt) + vc.kept(n_vis)
    assert torch.equal(deep[:t0], kept[0]) and int(kept[0, :n_vis].sum()) == vc.kept(n_vis)


def test_fastv_rows_in_a_batch_and_in_flight_are_their_own(concat_dir, ov_dir):
    """Guards against one row's pruning choice leaking into another's (rows keep different tokens), and in-flight
    admission forgetting to set a row's pruned slots: batched, in-flight with a small pool and one by one agree."""
    for path, size, media in ((concat_dir, 32, None), (str(ov_dir), 35, [("video", (35, 35))] * 3)):
        engine = widen(Engine.load(str(path), max_batch=8, visual_compress="fastv:0.3@1", pack=False))
        clips = _clips(size)
        requests = [(i % 3, p) for i, p in enumerate(PROMPTS * 2)]
        engine.inflight = False
        static = _texts(engine, clips, requests, media)
        alone = [_texts(engine, clips, [r], media)[0] for r in requests]
        engine.inflight, engine.max_batch = True, 2
        assert _texts(engine, clips, requests, media) == static == alone
        assert len(set(static)) > 1


def test_compression_is_refused_where_vision_is_not_in_the_context(tmp_path):
    """Guards against --visual-compress silently doing nothing on a LaVi or VLoRA model."""
    for fusion in ("viln", "vlora"):
        with pytest.raises(ValueError, match="concat model's context"):
            Engine.load(make_tiny_checkpoint(tmp_path / fusion, fusion=fusion), visual_compress="dct:0.5")


def test_eval_scores_a_concat_model_with_each_compression_beside_it(tmp_path):
    """Guards the quality table of the baselines: `eval --visual-compress` scores each concat model plain and with
    each compression (columns named by it), and leaves a LaVi alone (it has no visual tokens to thin)."""
    from click.testing import CliRunner

    from jobs.cli import main

    dirs = {}
    for fusion in ("concat", "viln"):
        dirs[fusion] = tmp_path / fusion
        args = ["train", "--out", str(dirs[fusion]), "--fusion", fusion, "--steps", "1", "--images", "2", "--videos",
                "1", "--questions", "1", "--frames", "2", "--warmup", "1", "--threads", "1", "--checkpoint-every", "1"]
        assert CliRunner().invoke(main, args).exit_code == 0
    card = tmp_path / "CARD.md"
    result = CliRunner().invoke(main, ["eval", "--model", str(dirs["concat"]), "--model", str(dirs["viln"]),
                                       "--images", "2", "--videos", "1", "--device", "cpu", "--renderer", "shapes",
                                       "--visual-compress", "dct:0.25", "--visual-compress", "fastv:0.5@1",
                                       "--out", str(tmp_path / "eval.json"), "--card", str(card)])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert [(r["fusion"], r["visual_compress"]) for r in doc["results"]] == [
        ("concat", None), ("concat", "dct:0.25"), ("concat", "fastv:0.5@1"), ("viln", None)]
    assert "(concat, dct:0.25) | tiny-shapes-concat (concat, fastv:0.5@1)" in card.read_text()
    bad = CliRunner().invoke(main, ["eval", "--model", str(dirs["concat"]), "--visual-compress", "dct"])
    assert bad.exit_code == 2 and "dct:KEEP" in bad.output


@pytest.mark.timeout(300)
def test_run_labels_through_a_compressed_concat_model_and_keeps_its_setting(ray_local, concat_dir, tiny_model,
                                                                            tmp_path):
    """Guards the run path of --visual-compress: the labelers load the concat model with it (no error row), the
    setting is part of the output's generation settings (a resume with another one is refused), and a LaVi is
    refused before anything starts."""
    import pyarrow.parquet as pq

    from pipeline.config import RunConfig
    from pipeline.driver import run

    corpus = tmp_path / "in"
    corpus.mkdir()
    for i, clip in enumerate(_clips(32, frames=(1, 1, 1))):
        from PIL import Image

        Image.fromarray(clip[0]).save(corpus / f"{i}.png")
    base = dict(inputs=(str(corpus),), out=str(tmp_path / "out"), model=concat_dir, max_new_tokens=3,
                address=ray_local)
    config = RunConfig(**base, visual_compress="fastv:0.5")
    assert config.generation_settings()["visual_compress"] == "fastv:0.5@2"
    summary = run(config)
    assert summary["rows"] == 3 and {r["status"] for r in pq.read_table(tmp_path / "out").to_pylist()} <= {"ok", "truncated"}
    with pytest.raises(ValueError, match="settings"):
        run(RunConfig(**base, visual_compress="dct:0.5"))
    with pytest.raises(ValueError, match="viln model"):
        run(RunConfig(**{**base, "model": tiny_model, "out": str(tmp_path / "o2")}, visual_compress="dct:0.5"))
