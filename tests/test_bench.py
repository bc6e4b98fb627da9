"""The benchmark harness: FLOP counts, the fast generation path and the `bench` commands, on tiny models."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from bench import flops as F
from bench.compiled import TimedGenerator
from bench.configs import Setting, model_config, random_model, settings
from bench.report import write_section
from jobs.bench import bench
from lavi.serving.generate import Generator, generate
from lavi.serving.steps import GenerationConfig, setup_caches
from lavi.core.model import LaVi
from lavi.tiny_models import tiny_config

NEVER = -1
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]  # unequal: left padding is exercised


def chaotic_model(fusion: str, seed: int = 0) -> LaVi:
    """A tiny LaVi whose greedy tokens vary from step to step and with the image (untied head, large
    weights, ViLN outputs non-zero): token equality between two paths then means something."""
    c = tiny_config(40, fusion)
    c = dataclasses.replace(c, decoder=dataclasses.replace(c.decoder, tie_word_embeddings=False))
    torch.manual_seed(seed)
    model = LaVi(c).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    return model


def engine_tokens(model: LaVi, pixels, rows, prompts, new_tokens: int, eos_id: int) -> list[list[int]]:
    out = generate(model, setup_caches(model, len(prompts), 256), model.encode(pixels), rows, prompts,
                   GenerationConfig(max_new_tokens=new_tokens), eos_id=eos_id, pad_id=0)
    return [g.tokens for g in out]


def timed_tokens(gen: TimedGenerator, pixels, rows, prompts, new_tokens: int, eos_id: int) -> list[list[int]]:
    out, timing = gen.generate(pixels, None, rows, prompts, new_tokens, eos_id)
    assert 0 < timing.encode_s <= timing.ttft_s <= timing.total_s
    return [g.tokens for g in out]


@pytest.mark.parametrize("fusion,compress", [("viln", None), ("vlora", None), ("concat", None),
                                              ("concat", "dct:0.25"), ("concat", "fastv:0.5@0")])
def test_counted_flops_equal_the_formula(fusion, compress):
    """Guards against an analytic FLOP formula (the figures BENCHMARKS.md reports) drifting from what the
    engine actually multiplies: the ViT, ViLN's per-stage K/V and per-(layer, site) q/attention/o, VLoRA's
    generator and per-token deltas, the projector, the decoder over Nv + T tokens for concat (fewer after a dct
    compression; fewer past FastV's layer), the cache's key length, lm_head positions. Only matmuls count on
    both sides (norms, softmax, RoPE, activations are not matmuls)."""
    from lavi.visual_tokens.methods import VisualCompress

    torch.manual_seed(0)
    model = LaVi(tiny_config(40, fusion)).eval()
    vc = VisualCompress.parse(compress) if compress else None
    model.visual_compress = vc
    plain = F.prefill_flops(model.config, 3, 7, key_slots=300, logits="last").total
    for frames, text, batch, keys, logits in ((2, 5, 2, None, "all"), (3, 7, 1, 300, "last")):
        if vc is not None and vc.method == "fastv" and logits == "all":
            continue  # FastV's prefill gives the last position's logits only
        counted = F.counted_prefill_flops(model, frames, text, batch=batch, key_slots=keys, logits=logits)
        analytic = F.prefill_flops(model.config, frames, text, batch=batch, key_slots=keys, logits=logits,
                                   compress=vc)
        assert counted.to_dict() == analytic.to_dict()
        assert counted.vision > 0 and counted.fusion > 0 and counted.decoder > 0 and counted.lm_head > 0
    if vc is not None:
        assert analytic.total < plain  # the compression saves work


@pytest.mark.parametrize("fusion", ["viln", "vlora", "concat"])
def test_counted_flops_at_7b_shapes_on_meta(fusion):
    """Guards against the formula being right only at toy sizes (e.g. a GQA or head_dim term that
    cancels when heads are few): the real 7B + SigLIP shapes, counted on the meta device, no memory."""
    setting = next(s for s in settings("qwen2-7b-siglip") if s.name == "image")
    config = model_config("qwen2-7b-siglip", fusion, setting)
    with torch.device("meta"):
        model = LaVi(config)
    counted = F.counted_prefill_flops(model, setting.frames, 64, key_slots=64 + 729 + 48, logits="last")
    analytic = F.prefill_flops(config, setting.frames, 64, key_slots=64 + 729 + 48, logits="last")
    assert counted.to_dict() == analytic.to_dict()
    assert 0.5e12 < counted.vision < 0.8e12  # ~400M-parameter ViT over 729 patches


@pytest.mark.parametrize("fusion", ["viln", "concat"])
def test_timed_generator_measures_the_engine_loop(fusion):
    """Guards against the benchmark measuring something other than what `lavi-label run` runs: the timed
    path gives the engine's greedy tokens, with left-padded prompts and with a row stopping at EOS."""
    model = chaotic_model(fusion)
    pixels, rows = torch.randn(3, 2, 3, 32, 32), torch.tensor([0, 1, 2])
    gen = TimedGenerator(model, 4, 256)
    ref = engine_tokens(model, pixels, rows, PROMPTS, 10, NEVER)
    assert len({t for r in ref for t in r}) > 3, "degenerate model: the test would prove nothing"
    assert timed_tokens(gen, pixels, rows, PROMPTS, 10, NEVER) == ref
    eos = ref[0][4]  # a token that does occur: row 0 (at least) stops early
    ref_eos = engine_tokens(model, pixels, rows, PROMPTS, 10, eos)
    assert len(ref_eos[0]) < 10
    assert timed_tokens(gen, pixels, rows, PROMPTS, 10, eos) == ref_eos


def test_host_looks_at_eos_every_k_steps_and_stops_when_all_rows_are_done():
    """Guards against the decode loop syncing with the host every step (a stall per token on a GPU) and
    against it running on once every row has stopped: the EOS is looked at every check_every tokens, the
    loop stops at the first look after the last row's EOS, and the tokens do not depend on check_every."""
    model = chaotic_model("viln", seed=4)
    pixels, rows, prompt = torch.randn(1, 2, 3, 32, 32), torch.tensor([0]), PROMPTS[:1]
    cache = setup_caches(model, 1, 64)
    vis = model.encode(pixels)
    free = Generator(model, cache)(vis, rows, prompt, GenerationConfig(max_new_tokens=12), NEVER)[0].tokens
    eos = free[2]
    j = free.index(eos)  # the EOS is token j (j <= 2)

    def run(k: int, eos_id: int) -> tuple[list[int], int]:
        gen, calls = Generator(model, cache, check_every=k), []
        step = gen.step
        gen.step = lambda *a: calls.append(1) or step(*a)
        out = gen(vis, rows, prompt, GenerationConfig(max_new_tokens=12), eos_id)
        return out[0].tokens, len(calls)

    assert run(1, eos) == (free[:j], j)  # looked at every token: stops right after the EOS
    assert run(4, eos) == (free[:j], 3)  # looked at after token 4 (3 decode steps after the prefill)
    assert run(4, NEVER) == (free, 11)  # no EOS: every step runs


@pytest.mark.parametrize("fusion", ["viln", "concat"])
def test_decode_step_compiles_whole_and_equals_eager(fusion):
    """Guards against a graph break in the decode step (a .tolist(), a host sync, an untraceable closure),
    which would stop CUDA graphs on the GPU: torch.compile(fullgraph=True) raises on any break. The
    'eager' backend checks the trace without spending minutes in the CPU code generator."""
    model = chaotic_model(fusion, seed=2)
    pixels, rows = torch.randn(2, 2, 3, 32, 32), torch.tensor([0, 1])
    eager = timed_tokens(TimedGenerator(model, 2, 64), pixels, rows, PROMPTS[:2], 6, NEVER)
    compiled = timed_tokens(TimedGenerator(model, 2, 64, compile=True, backend="eager"), pixels, rows, PROMPTS[:2],
                            6, NEVER)
    assert compiled == eager


@pytest.mark.slow
def test_decode_step_inductor_equals_eager():
    """Guards against the inductor-compiled step (what runs on the GPU) computing different tokens."""
    model = chaotic_model("viln", seed=3)
    pixels, rows = torch.randn(2, 2, 3, 32, 32), torch.tensor([0, 1])
    eager = timed_tokens(TimedGenerator(model, 2, 64), pixels, rows, PROMPTS[:2], 6, NEVER)
    compiled = timed_tokens(TimedGenerator(model, 2, 64, compile=True), pixels, rows, PROMPTS[:2], 6, NEVER)
    assert compiled == eager


@pytest.mark.gpu
@pytest.mark.parametrize("fusion", ["viln", "concat"])
def test_cuda_graph_decode_equals_eager_on_gpu(fusion):
    """Guards the GPU path: the inductor + CUDA graphs decode step ("reduce-overhead") gives the eager tokens,
    and on replay of the recorded graph."""
    model = chaotic_model(fusion, seed=4).to("cuda")
    pixels, rows = torch.randn(3, 2, 3, 32, 32, device="cuda"), torch.tensor([0, 1, 2])
    eager = timed_tokens(TimedGenerator(model, 3, 64), pixels, rows, PROMPTS[:3], 8, NEVER)
    compiled = TimedGenerator(model, 3, 64, compile=True)
    assert timed_tokens(compiled, pixels, rows, PROMPTS[:3], 8, NEVER) == eager
    assert timed_tokens(compiled, pixels, rows, PROMPTS[:3], 8, NEVER) == eager  # graph replay


def test_random_model_is_built_without_a_host_copy_and_keeps_ties():
    """Guards against the meta-device build leaving weights uninitialised (NaN/garbage) or untying the
    tied lm_head (a second vocab x d matrix: wrong memory and wrong weights-read roofline)."""
    config = model_config("tiny-shapes", "viln", Setting("image", 1, 128))
    model = random_model(config, "cpu", torch.float32, seed=0)
    assert model.decoder.lm_head.weight is model.decoder.embed_tokens.weight
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    assert torch.equal(model.decoder.norm.weight, torch.ones_like(model.decoder.norm.weight))
    again = random_model(config, "cpu", torch.float32, seed=0)
    assert torch.equal(model.vision.embeddings.patch_embedding.weight, again.vision.embeddings.patch_embedding.weight)


def test_write_section_replaces_only_its_own(tmp_path):
    """Guards against a rerun appending a second copy of its section, or clobbering another run's."""
    md = tmp_path / "BENCHMARKS.md"
    write_section(md, "a", "first a")
    write_section(md, "b", "only b")
    write_section(md, "a", "second a")
    text = md.read_text()
    assert "second a" in text and "first a" not in text and "only b" in text
    assert text.count("<!-- bench:a -->") == 1


def test_bench_model_command_end_to_end(tmp_path):
    """Guards against the bench command breaking (flags, measurement, JSON contract, markdown) without a GPU:
    tiny shapes, two batch sizes, 4 new tokens, LaVi, VLoRA, concat (plain and with each baseline compression, on
    the same weights) and transformers' LLaVA-OneVision."""
    out, md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    result = CliRunner().invoke(bench, [
        "model", "--device", "cpu", "--shapes", "tiny-random", "--settings", "image", "--batch-sizes", "1,2",
        "--visual-compress", "dct:0.25", "--visual-compress", "fastv:0.5@0",
        "--new-tokens", "4", "--repeats", "1", "--out", str(out), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert {"results", "device", "versions", "command"} <= doc.keys()
    keys = {"model", "visual_tokens", "batch_size", "captions_per_s", "ttft_s", "decode_tokens_per_s",
            "peak_mem_bytes", "prefill_flops"}
    got = {(r["model"], r["batch_size"]) for r in doc["results"]}
    models = ("lavi", "vlora", "concat", "concat-dct:0.25", "concat-fastv:0.5@0", "hf-llava-ov")
    assert got == {(m, b) for m in models for b in (1, 2)}
    for r in doc["results"]:
        assert keys <= r.keys(), r
        assert r["captions_per_s"] > 0 and 0 < r["ttft_s"] and r["decode_tokens_per_s"] > 0
    lavi = next(r for r in doc["results"] if r["model"] == "lavi")
    concat = next(r for r in doc["results"] if r["model"] == "concat")
    assert lavi["visual_tokens"] == concat["visual_tokens"] == 16
    by = {r["model"]: r for r in doc["results"] if r["batch_size"] == 1}
    assert all(r["prefill_flops"] == r["prefill_flops_analytic"] for r in by.values() if r["model"] != "hf-llava-ov")
    assert by["concat-dct:0.25"]["context_visual_tokens"] == 4 and concat["context_visual_tokens"] == 16
    assert by["concat-fastv:0.5@0"]["prefill_flops"] < concat["prefill_flops"]
    hf = next(r for r in doc["results"] if r["model"] == "hf-llava-ov")  # the same visual tokens in its context
    assert concat["prefill_flops"] < hf["prefill_flops"] < 2 * concat["prefill_flops"]
    # transformers' caption: its counted prefill and 3 decode steps of the same decoder over a cache growing from its
    # context (a few more visual tokens than concat's: image newlines), about concat's 3 over its static slots
    steps, concat_steps = hf["caption_flops"] - hf["prefill_flops"], concat["caption_flops"] - concat["prefill_flops"]
    assert 0.8 * concat_steps < steps < 1.25 * concat_steps, (steps, concat_steps)
    assert {r["model"] for r in doc["roofline"]} == set(models) - {"hf-llava-ov"}
    assert all(r["measured_over_roofline"] > 0 for r in doc["roofline"])
    for r in doc["roofline"]:  # the step alone and its linear layers alone, in turns, and what the step spends beside
        assert 0 < r["linears_step_s"] < r["step_alone_s"] and r["rest_step_s"] == r["step_alone_s"] - r["linears_step_s"]
        assert r["step_alone_over_roofline"] == r["step_alone_s"] / r["roofline_step_s"]
        assert r["linears_over_roofline"] == r["linears_step_s"] / r["roofline_step_s"]
        assert r["linears_read_bytes_per_s"] == r["linears_weight_bytes"] / r["linears_step_s"]
    assert doc["read_bandwidth_bytes_per_s"] == max(doc["read_bandwidths_start_end"]) > 0
    assert doc["peak_flops"] == max(doc["peak_flops_start_end"])  # each row's utilisation against the better one
    assert all(r["flop_utilization"] == pytest.approx(r["captions_per_s"] * r["caption_flops"] / doc["peak_flops"])
               for r in doc["results"])
    assert len(doc["copy_bandwidths_start_end"]) == 2 and doc["copy_bandwidth_bytes_per_s"] == max(
        doc["copy_bandwidths_start_end"])
    assert {x["versus"] for x in doc["ratios"]} == set(models) - {"lavi"}
    assert all(x["flop_bound_ratio"] > 0 for x in doc["ratios"] if x["batch_size"] != "best")  # transformers too
    paired = [x for x in doc["ratios"] if x["batch_size"] != "best"]
    assert all((x["roofline_bound_ratio"] is None) == (x["versus"] == "hf-llava-ov") for x in paired)
    assert all(x["of_roofline_bound"] == x["captions_per_s_ratio"] / x["roofline_bound_ratio"]
               for x in paired if x["roofline_bound_ratio"])
    assert "bench model: tiny-random" in md.read_text() and "roofline-bound ratio" in md.read_text()
    assert "linears / roofline" in md.read_text() and "Targets" not in md.read_text()  # tiny shapes: no targets
    again = tmp_path / "again.md"  # a recorded run's section written again from its JSON: the same section
    result = CliRunner().invoke(bench, ["render", str(out), "--markdown", str(again)])
    assert result.exit_code == 0, result.output
    assert doc["section"] == "model-tiny-random-cpu-image" and again.read_text() == md.read_text()


def test_a_decode_steps_linears_are_the_decoders_its_head_and_vilns_site_heads():
    """Guards against the linears-alone time leaving out a product the step runs (the output head, ViLN's q/o
    projections, a packed layer) or counting one it does not (the vision tower's, the stage projections')."""
    from bench.roofline import linears_step_s, step_alone, step_linears
    from lavi.visual_tokens.methods import VisualCompress
    from lavi.serving.cpu_pack import pack
    from lavi.serving.load_prep import packed

    for fusion in ("viln", "concat"):
        model = LaVi(tiny_config(40, fusion)).eval()
        c = model.config
        heads = 2 * len(c.modulated_layers()) * len(c.site_names()) if fusion == "viln" else 0
        assert len(step_linears(model)) == 7 * c.decoder.num_layers + 1 + heads
        packed_model = packed(model, None)
        pack(packed_model, min_elements=1)  # the tiny layers are under the packing threshold: pack them all
        # q/k/v and gate/up are one product each once packed: 4 per layer
        assert len(step_linears(packed_model)) == 4 * c.decoder.num_layers + 1 + heads
        assert linears_step_s(packed_model, repeats=1) > 0
        # the step alone runs the model's own decode step (a FastV model's too, whose deeper layers take their mask)
        packed_model.visual_compress = VisualCompress.parse("fastv:0.5@0") if fusion == "concat" else None
        vis = packed_model.encode(torch.zeros(1, 1, 3, c.vision.image_size, c.vision.image_size))
        step, linears = step_alone(packed_model, vis, max_seq=40, new_tokens=8, rounds=2, steps=1)
        assert 0 < linears < step


def test_targets_are_checked_against_the_runs_figures_with_gap_and_cause():
    """Guards against a missed target reported as met (or one without its distance), a cause typed rather than
    read from the run's figures, and targets applied to tiny shapes (all per-op overhead)."""
    from bench.model_report import targets

    roof = lambda model, measured, linears: {  # noqa: E731  (the step alone: 0.9 of the run's)
        "model": model, "setting": "image", "weight_bytes_per_step": 100, "state_bytes_per_step": 0,
        "measured_step_s": measured, "roofline_step_s": 0.1, "measured_over_roofline": measured / 0.1,
        "step_alone_s": 0.9 * measured, "step_alone_over_roofline": 0.9 * measured / 0.1,
        "linears_step_s": linears, "linears_over_roofline": linears / 0.1, "rest_step_s": 0.9 * measured - linears,
        "linears_read_bytes_per_s": 100 / linears}
    doc = {"config": {"shapes": "qwen2-0.5b-siglip"}, "read_bandwidth_bytes_per_s": 2e9,
           "ratios": [{"setting": "image", "versus": "concat", "batch_size": 1, "of_bound": 0.8,
                       "roofline_bound_ratio": 1.5, "of_roofline_bound": 0.95},
                      {"setting": "image", "versus": "concat", "batch_size": 4, "of_bound": 0.95,
                       "roofline_bound_ratio": 1.7, "of_roofline_bound": 1.0},
                      {"setting": "image", "versus": "concat", "batch_size": "best", "captions_per_s_ratio": 1.5}],
           "results": [{"model": "lavi", "setting": "image", "batch_size": 1, "prefill_flop_utilization": 0.4}],
           "roofline": [roof("lavi", 0.16, 0.12), roof("concat", 0.12, 0.09)]}
    got = {(t["target"].split()[0], t["where"]): t for t in targets(doc)}
    miss = got[("LaVi/concat", "image, batch 1")]
    assert miss["met"] == "no" and miss["gap"] == pytest.approx(0.1) and "0.95 of it" in miss["cause"]
    assert got[("LaVi/concat", "image, batch 4")]["met"] == "yes" and got[("LaVi/concat", "image, batch 4")]["gap"] \
        is None
    assert got[("prefill", "lavi, image, batch 1")]["met"] == "no"
    step = got[("decode", "lavi, image")]
    assert step["met"] == "no" and step["gap"] == pytest.approx(0.1) and "1.2x the roofline" in step["cause"]
    assert "a streaming read: 2 GB/s" in step["cause"]
    assert got[("decode", "concat, image")]["met"] == "yes"
    assert "takes 1.44x the roofline" in step["cause"]  # the step alone, 0.144 s
    # the steps alone, 0.144 / 0.108, against equal bytes: missed by a third; 24 ms vs 18 ms outside the linears
    beyond = got[("LaVi's", "image")]
    assert beyond["met"] == "no" and beyond["gap"] == pytest.approx(1 / 3) and "24 ms, concat's 18 ms" in beyond["cause"]
    assert beyond["target"].endswith("(steps alone)")
    assert targets({**doc, "config": {"shapes": "tiny-shapes"}}) == []


def test_the_roofline_bound_takes_each_decode_step_at_the_slower_of_its_flops_and_its_bytes():
    """Guards against a caption's time bound that ignores a bandwidth-bound decode step (batch 1: the FLOP bound
    then asks for more than any engine can give) or that charges the weights to every row of a batch."""
    from bench.model_report import caption_time_bound

    row = {"new_tokens": 5, "caption_flops": 1000 + 4 * 10, "prefill_flops": 1000, "prefill_flops_analytic": 1000,
           "batch_size": 1}
    roof = {"weight_bytes_per_step": 400, "state_bytes_per_step": 20}
    # prefill 1000 FLOP at 100 FLOP/s; each step: 10 FLOP (0.1 s) or 420 B at 1000 B/s (0.42 s): bytes win
    assert caption_time_bound(row, roof, 100.0, 1000.0) == pytest.approx(10 + 4 * 0.42)
    # batch 4: the weights are read once for the 4 rows (100 B each) plus the row's 20 B: 0.12 s; batch 8: 70 B,
    # 0.07 s, and the FLOPs win
    assert caption_time_bound({**row, "batch_size": 4}, roof, 100.0, 1000.0) == pytest.approx(10 + 4 * 0.12)
    assert caption_time_bound({**row, "batch_size": 8}, roof, 100.0, 1000.0) == pytest.approx(10 + 4 * 0.1)
    assert caption_time_bound(row, None, 100.0, 1000.0) is None and caption_time_bound(row, roof, None, 1.0) is None


def test_bench_model_on_checkpoint_directories(tmp_path):
    """`bench model --model DIR`: a LLaVA-OneVision directory gives concat rows (our engine on its weights) and
    transformers' rows on the same weights, at its own visual token counts (anyres from its largest pinpoint); a
    LaVi directory gives lavi rows and, having no anyres input, a recorded skip."""
    from lavi.onevision import anyres
    from lavi.onevision.config import OneVisionConfig
    from lavi.tiny_models import make_tiny_checkpoint
    from onevision_fixture import make_onevision

    ov = make_onevision(tmp_path / "ov")
    lavi = make_tiny_checkpoint(tmp_path / "lavi")
    out, md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    result = CliRunner().invoke(bench, [
        "model", "--model", str(ov), "--model", lavi, "--batch-sizes", "1", "--new-tokens", "3", "--repeats", "1",
        "--out", str(out), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    got = {(r["model"], r["setting"], r["batch_size"]) for r in doc["results"]}
    want = {(m, s, b) for m in ("concat", "hf-llava-ov") for s in ("image", "anyres", "video") for b in (1,)}
    assert got == want | {("lavi", s, 1) for s in ("image", "video")}
    c = OneVisionConfig.from_dir(ov)
    big = max(c.pinpoints, key=lambda p: p[0] * p[1])
    tokens = {"image": anyres.image_tokens((c.tile_size,) * 2, c.pinpoints, c.tile_size, c.side, c.max_tiles),
              "anyres": anyres.image_tokens(big, c.pinpoints, c.tile_size, c.side, c.max_tiles),
              "video": anyres.video_tokens(c.default_frames, c.side)}
    for r in doc["results"]:
        assert r["captions_per_s"] > 0 and r["ttft_s"] > 0
        if r["model"] != "lavi":
            assert r["visual_tokens"] == tokens[r["setting"]], r
    assert doc["skipped"] == [{"model": "lavi", "setting": "anyres", "reason": f"{lavi} has no anyres input"}]
    assert {x["versus"] for x in doc["ratios"]} == {"concat", "hf-llava-ov"}
    assert f"bench model: {ov}, {lavi}" in md.read_text()


def test_model_bench_imports_without_ray_av_decord_fsspec():
    """Guards against `python -m bench model --device cuda` failing on the GPU machine, which has torch and
    transformers but no ray, decord or av (and maybe no fsspec or click): importing them at module level
    anywhere on the model-bench path would break it."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('ray', 'av', 'decord', 'fsspec', 'click', 'pyarrow'):\n"
            "    sys.modules[name] = None  # any import of these now raises ImportError\n"
            "import bench.__main__, bench.model, bench.hf, bench.compiled, bench.flops\n"
            "bench.__main__.parser().parse_args(['model', '--device', 'cpu'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_python_m_bench_takes_every_flag_of_lavi_label_bench_model():
    """Guards against the GPU machine's entry (`python -m bench model`: argparse, no click there) falling behind the
    click command: a flag the GPU run needs (--quantize and --mixed, for the 7B run with int8 and in-flight
    batching) missing from it, or parsed into something the config does not take."""
    import argparse

    from bench.__main__ import parser
    from bench.model_config import ModelBenchConfig
    from jobs.bench import model_cmd

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["model"]
    theirs = {o for a in sub._actions for o in a.option_strings}
    ours = {o for p in model_cmd.params for o in p.opts + p.secondary_opts if o.startswith("--")}
    assert ours - theirs == set()
    args = vars(parser().parse_args(["model", "--device", "cpu", "--quantize", "int8", "--mixed", "8",
                                     "--visual-compress", "dct:0.25", "--visual-compress", "fastv:0.5@2"]))
    args.pop("command")
    peak = args.pop("peak_tflops")
    config = ModelBenchConfig(**args, peak_flops=peak)
    assert (config.quantize, config.mixed, config.compress) == ("int8", 8, ("dct:0.25", "fastv:0.5@2"))


def test_bench_pipeline_command_end_to_end(ray_local, tmp_path):
    """Guards against the pipeline benchmark drifting from the real `lavi-label run` entry point (RunConfig
    fields, summary keys) or comparing different work: both sides must label every corpus item; and, where the
    labeler computes on fewer threads than torch's default, the plain loop is measured on those too."""
    out = tmp_path / "pipeline.json"
    result = CliRunner().invoke(bench, [
        "pipeline", "--images", "6", "--batch-size", "4", "--max-new-tokens", "3", "--workdir", str(tmp_path / "w"),
        "--out", str(out), "--markdown", str(tmp_path / "BENCHMARKS.md")])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    pipeline, plain, *alone = doc["results"]
    assert pipeline["mode"] == "pipeline" and plain["mode"].startswith("plain")
    assert pipeline["rows"] == plain["rows"] == 6
    assert [p["threads"] for p in alone] == ([doc["labeler_threads"]] if doc["labeler_threads"] < plain["threads"]
                                             else [])
    assert all(p["rows"] == 6 for p in alone)
    assert doc["throughput_ratio"] > 0 and pipeline["first_commit_s"] > 0 and pipeline["driver_peak_rss_mb"] > 50
    assert "bench pipeline" in (tmp_path / "BENCHMARKS.md").read_text()


def test_bench_pipeline_scale_mode_measures_the_pipeline_without_a_model(tmp_path):
    """Guards against the scale benchmark measuring anything but the real pipeline (its driver, listing, reads,
    decodes and commits, every item committed once), its resume run labelling more than the items added, and its
    targets table losing a figure."""
    import pyarrow.parquet as pq

    from bench.fixed_labeler import TEXT

    out = tmp_path / "scale.json"
    result = CliRunner().invoke(bench, [
        "pipeline", "--scale", "300", "--resume-left", "20", "--scale-batch", "64", "--workdir", str(tmp_path / "w"),
        "--out", str(out), "--markdown", str(tmp_path / "BENCHMARKS.md")])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    run, resume = doc["results"]
    assert run["rows"] == 300 and resume["rows"] == 20 and resume["items_skipped"] == 300
    assert run["driver_peak_rss_mb"] > 50 and run["first_commit_s"] > 0 and doc["commit_alone"]["rows_per_s"] > 0
    labels = pq.read_table(tmp_path / "w" / "labels-300")
    assert labels.num_rows == 320 and set(labels.column("text").to_pylist()) == {TEXT}
    assert len(set(labels.column("item_id").to_pylist())) == 320
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "bench pipeline --scale" in text and "commit path alone" in text


def test_bench_model_measures_int8_beside_float(tmp_path):
    """Guards against `bench model --quantize int8` measuring the float model twice, or dropping the float rows."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench, [
        "model", "--device", "cpu", "--shapes", "tiny-random", "--settings", "image", "--models", "lavi,concat",
        "--batch-sizes", "1", "--new-tokens", "4", "--repeats", "1", "--quantize", "int8", "--out", str(out),
        "--markdown", ""])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert sorted(r["model"] for r in doc["results"]) == ["concat", "concat-int8", "lavi", "lavi-int8"]
    assert all(r["captions_per_s"] > 0 for r in doc["results"])
    assert {r["versus"] for r in doc["ratios"]} == {"concat", "concat-int8", "lavi-int8"}


def test_qwen2_0_5b_siglip_shapes_give_the_flop_bound_the_cpu_table_is_held_to():
    """Guards against the real-shapes CPU bench running other shapes than LLaVA-OneVision-0.5B's: a caption (image,
    729 tokens, 64-token prompt, 32 new tokens) is 0.73 TFLOP for LaVi, the tower most of it, and 1.78x that for
    concat (the bound the measured ratio is compared with); transformers gets its own token count for the crops."""
    from bench import flops as F
    from bench import hf
    from bench.configs import model_config, settings

    image, anyres = settings("qwen2-0.5b-siglip")
    flops = {}
    for fusion in ("viln", "concat"):
        c = model_config("qwen2-0.5b-siglip", fusion, image)
        flops[fusion] = F.caption_flops(c, 1, 64, 32, key_slots=64 + 32 + (729 if fusion == "concat" else 0))
    assert flops["viln"] == pytest.approx(0.73e12, rel=0.01)
    assert flops["concat"] / flops["viln"] == pytest.approx(1.78, rel=0.01)
    assert image.visual_tokens(14) == 729 and anyres.visual_tokens(14) == 3 * 729
    assert hf.tokens(anyres, 384, 14) == (729 + 27 * (54 + 1), {"views": 3, "image_px": (384, 768)})


def test_scale_report_says_where_the_driver_memory_grew():
    """A missed driver-RSS target must come with the cause its runs show: the growth split into the Python heap,
    Arrow's pool and the rest, and the object types that grew, from each run's census (bench.child.census)."""
    from bench.scale import rss_growth

    def run(items, peak, blocks, arrow, objects):
        return {"run": f"{items:,} items", "items": items, "driver_peak_rss_mb": peak,
                "census": {"python_blocks": blocks, "arrow_bytes": arrow, "objects": objects}}

    lines = rss_growth([run(100_000, 280.0, 1_000_000, 0, {"dict": 40_000, "BlockStats": 500}),
                        run(1_000_000, 340.0, 1_163_840, 2 << 20, {"dict": 41_000, "BlockStats": 12_500}),
                        {"run": "resume: ...", "items": 1_001_000, "driver_peak_rss_mb": 200.0}])
    text = " ".join(lines)
    assert "peak RSS +60.0 MB" in text and "Python heap +10.0 MB" in text and "Arrow's pool +2.0 MB" in text
    assert "the allocator) +48.0 MB" in text and "BlockStats +12,000" in text
    assert text.index("BlockStats") < text.index("dict +1,000")
    assert rss_growth([run(100, 1.0, 1, 0, {})]) == []


def test_realsize_report_says_what_the_run_prefilled():
    """The real-size bench's miss must show its cause: the run's prefill tokens against transformers' contexts."""
    from bench.realsize import _work

    doc = {"context_tokens": [1000, 3000], "engine_work": {"prefills": 2, "prefill_tokens": 6000, "decode_steps": 22},
           "ray_start_s": 4.25}
    text = " ".join(_work(doc))
    assert "6,000 tokens in 2 prefills (1.50x transformers' 4,000" in text and "22 decode steps" in text
    assert "Ray started in 4.2 s" in text and _work({"context_tokens": [1]}) == []
    assert "had its model 9.5 s after Ray's start began" in " ".join(_work({**doc, "labeler_ready_s": 9.5}))


def test_realsize_reads_its_ratio_against_transformers_in_the_run_s_dtype():
    """Guards against a real-size ratio that compares two arithmetics (transformers in bf16 emulated on a CPU
    without native bf16, the run in float32) without saying so: with a second transformers run in the run's dtype,
    the report names which one the ratio is read against and gives the other beside it."""
    from bench.realsize import markdown

    doc = {"config": {"new_tokens": 12}, "device": "cpu", "versions": {}, "command": "lavi-label bench realsize",
           "context_tokens": [10, 20, 30, 40], "ratio": 1.1, "met": True, "ratio_as_published": 0.3,
           "results": [{"path": "transformers generate()", "wall_s": 400.0, "note": "torch.bfloat16, as published"},
                       {"path": "transformers generate()", "wall_s": 100.0, "note": "torch.float32, the run's dtype"},
                       {"path": "lavi-label run", "wall_s": 110.0, "note": "ok 4, computes in float32"}]}
    text = markdown(doc)
    assert ("1.100 (target <= 1.25: met); read against transformers in the dtype the run computes in "
            "(torch.float32)") in text
    assert "against transformers as published (torch.bfloat16) 0.300" in text
    assert "read against" not in markdown({**doc, "results": [doc["results"][0], doc["results"][2]]})
