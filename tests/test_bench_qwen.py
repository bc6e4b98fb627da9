"""`bench model` for the Qwen-VL family: a Qwen2.5-VL of given shapes (our engine and transformers on the same
tensors, a LaVi of its decoder beside them) and Qwen-VL checkpoint directories; tiny shapes, a few tokens."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from jobs.bench import bench

transformers = pytest.importorskip("transformers")


def test_qwen_shapes_give_engine_transformers_and_lavi_rows(tmp_path):
    """Guards against the Qwen shapes' path breaking (the model built by transformers, ours made of its tensors, the
    LaVi of its decoder), a missing roofline for the Qwen in our engine (the LaVi-over-Qwen bound needs it), and the
    JSON or markdown losing the engine-over-transformers ratios."""
    out, md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    result = CliRunner().invoke(bench, [
        "model", "--shapes", "tiny-qwen2.5-vl", "--settings", "image", "--batch-sizes", "1,2", "--new-tokens", "2",
        "--repeats", "1", "--out", str(out), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    got = {(r["model"], r["batch_size"]) for r in doc["results"]}
    assert got == {(m, b) for m in ("lavi", "qwen-vl", "hf-qwen-vl") for b in (1, 2)}
    by = {(r["model"], r["batch_size"]): r for r in doc["results"]}
    ours, theirs = by[("qwen-vl", 1)], by[("hf-qwen-vl", 1)]
    # a 32 px image: 8 x 8 patches of 4 px, merged 2 x 2 into 16 tokens; the prompt's 3 template tokens + 64 text
    assert ours["visual_tokens"] == theirs["visual_tokens"] == 16
    assert ours["context_tokens"] == theirs["context_tokens"] == 16 + 2 + 64
    assert by[("lavi", 1)]["visual_tokens"] == 64 and by[("lavi", 1)]["context_visual_tokens"] == 0
    assert all(r["captions_per_s"] > 0 and r["caption_flops"] > r["prefill_flops"] > 0 for r in doc["results"])
    assert {r["model"] for r in doc["roofline"]} == {"lavi", "qwen-vl"}
    versus = {(x["versus"], x["batch_size"]): x for x in doc["ratios"]}
    assert versus[("qwen-vl", 1)]["roofline_bound_ratio"] > 0 and versus[("hf-qwen-vl", 1)]["roofline_bound_ratio"] \
        is None
    [e1, e2] = doc["engine_ratios"]
    assert (e1["batch_size"], e2["batch_size"]) == (1, 2)
    assert e1["captions_per_s_ratio"] == ours["captions_per_s"] / theirs["captions_per_s"]
    text = md.read_text()
    assert "bench model: tiny-qwen2.5-vl" in text and "Our engine over transformers' generate()" in text
    assert "Targets" not in text  # tiny shapes: no targets


def test_our_qwen_is_made_of_transformers_tensors_and_gives_its_logits():
    """Guards against the shapes' 'same weights' being two copies (twice the memory on a 3B) or a mapping that drops
    or misplaces a tensor: ours shares every tensor's storage and gives transformers' last-position logits."""
    from bench.qwen import build_hf, hf_kwargs, ours_from, patches_of, prompt_ids
    from bench.configs import settings
    from lavi.qwenvl.config import IMAGE

    theirs = build_hf("tiny-qwen2.5-vl", torch.device("cpu"), torch.float32, seed=0)
    ours = ours_from(theirs)
    shared = {t.data_ptr() for t in theirs.state_dict().values()}
    assert all(p.data_ptr() in shared for p in ours.parameters())
    gen = torch.Generator().manual_seed(0)
    pixels, grid = patches_of(ours.config, settings("tiny-qwen2.5-vl")[0], gen)
    prompt = prompt_ids(ours.config, IMAGE, 5, gen)
    kw = hf_kwargs(ours.config, pixels, grid, IMAGE, 1.0, prompt, 1, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        ref = theirs(**kw).logits[0, -1]
        vis = ours.encode(pixels, torch.tensor([grid]), [IMAGE], [1.0])
        got = ours(vis, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.bool))[0, -1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_bench_model_on_a_qwen_vl_directory(tmp_path, kind):
    """Guards against `bench model --model QWEN_DIR` failing on a Qwen-VL (its prompt needs a placeholder, its image
    a side the processor keeps) and against transformers' rows running another context than ours: the same expanded
    prompt (Qwen3-VL's video with its timestamps), image and video, and no anyres (a recorded skip)."""
    from qwenvl_fixture import make_qwenvl

    d = make_qwenvl(tmp_path / kind, kind, seed=1)
    out, md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    result = CliRunner().invoke(bench, [
        "model", "--model", str(d), "--batch-sizes", "1", "--new-tokens", "2", "--repeats", "1", "--out", str(out),
        "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    got = {(r["model"], r["setting"]) for r in doc["results"]}
    assert got == {(m, s) for m in ("qwen-vl", "hf-qwen-vl") for s in ("image", "video")}
    by = {(r["model"], r["setting"]): r for r in doc["results"]}
    for s in ("image", "video"):
        assert by[("qwen-vl", s)]["context_tokens"] == by[("hf-qwen-vl", s)]["context_tokens"]
        assert by[("qwen-vl", s)]["visual_tokens"] == by[("hf-qwen-vl", s)]["visual_tokens"] > 0
    # the fixture's processor takes at most 64 x 64 px: an image of 8 x 8 merged tokens
    assert by[("qwen-vl", "image")]["visual_tokens"] == 64
    assert doc["skipped"] == [{"model": "qwen-vl", "setting": "anyres", "reason": f"{d} has no anyres input"}]
    assert len(doc["engine_ratios"]) == 2 and "Our engine over transformers' generate()" in md.read_text()


def test_qwen_targets_are_read_from_the_runs_figures_with_gap_and_cause():
    """Guards against a missed Qwen target reported as met, a gap left out, a cause typed rather than read from the
    run (prefill vs decode time, context), and targets at tiny shapes."""
    from bench.qwen_report import targets

    row = lambda model, b, cps, ttft, dec, step: {  # noqa: E731
        "model": model, "shapes": "qwen2.5-vl-3b", "setting": "image", "batch_size": b, "captions_per_s": cps,
        "ttft_s": ttft, "decode_tokens_per_s": dec, "decode_step_s": step, "dtype": "float32",
        "context_tokens": 322, "visual_tokens": 1024 if model == "lavi" else 256, "context_visual_tokens": 256}
    results = [row("qwen-vl", 1, 0.2, 2.0, 10.0, 0.1), row("hf-qwen-vl", 1, 0.1, 4.0, 4.0, 0.25),
               row("qwen-vl", 4, 0.5, 4.0, 30.0, 0.13), row("hf-qwen-vl", 4, 0.4, 3.0, 10.0, 0.4),
               row("lavi", 1, 0.25, 1.0, 10.0, 0.1)]
    doc = {"config": {"shapes": "qwen2.5-vl-3b"}, "results": results,
           "ratios": [{"setting": "image", "versus": "qwen-vl", "batch_size": 1, "captions_per_s_ratio": 1.25,
                       "roofline_bound_ratio": 1.6, "of_roofline_bound": 1.25 / 1.6}]}
    got = {t["where"]: t for t in targets(doc)}
    b1, b4 = got["qwen2.5-vl-3b, image, batch 1, float32"], got["qwen2.5-vl-3b, image, batch 4, float32"]
    assert b1["met"] == "yes" and b1["measured"] == pytest.approx(2.0) and b1["cause"] is None
    assert b4["met"] == "no" and b4["gap"] == pytest.approx(2.0 - 1.25)
    assert "prefill (TTFT) 4 s against transformers' 3 s" in b4["cause"] and "the prefill hold" in b4["cause"]
    lavi = got["image, batch 1, float32"]
    assert lavi["met"] == "no" and lavi["gap"] == pytest.approx(0.9 - 1.25 / 1.6)
    assert "holds 256 visual tokens, LaVi conditions on 1024" in lavi["cause"]
    assert targets({**doc, "config": {"shapes": "tiny-qwen2.5-vl"}}) == []
