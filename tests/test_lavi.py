"""LaVi invariants: zero-init identity, conditioning, cache == recompute, batch == rows, checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from lavi.core import checkpoint
from lavi.serving.generate import generate
from lavi.serving.steps import GenerationConfig, setup_caches
from lavi.core.model import LaVi
from lavi.training.shared_prefix import forward_shared
from lavi.tiny_models import tiny_config

FUSIONS = ["viln", "concat", "vlora"]


def _model(fusion: str = "viln", seed: int = 0, random_heads: bool = True, **options) -> LaVi:
    torch.manual_seed(seed)
    model = LaVi(tiny_config(40, fusion, **options)).eval()
    if random_heads and model.viln is not None:
        for head in model.viln.heads.values():
            torch.nn.init.normal_(head.o_proj.weight, std=0.2)
    if random_heads and model.vlora is not None:
        for b in model.vlora.B.values():
            torch.nn.init.normal_(b, std=0.2)
    return model


def _pixels(n: int, f: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, f, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _ids(b: int = 2, t: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(4, 40, (b, t), generator=torch.Generator().manual_seed(2)), torch.ones(b, t, dtype=torch.bool)


def test_zero_init_is_the_base_llm():
    """Guards against a modulation that is not the identity at init (a trained LLM would be damaged)."""
    model = _model(random_heads=False, sites="both")
    ids, valid = _ids()
    with torch.no_grad():
        base = model.decoder(model.decoder.embed_tokens(ids), torch.arange(7)[None].expand(2, 7),
                             torch.ones(2, 1, 7, 7, dtype=torch.bool).tril())[0]
        for seed in (1, 2):
            logits = model(ids, valid, model.encode(_pixels(2, seed=seed)))
            assert torch.equal(logits, base)


@pytest.mark.parametrize("sites,stride", [("both", 1), ("attn", 1), ("ffn", 2)])
def test_image_changes_logits_and_gradients_reach_conditioner(sites, stride):
    """Guards against a conditioner that is not wired in, or that leaks gradients into frozen backbones."""
    model = _model(sites=sites, layer_stride=stride)
    model.freeze_backbones()
    ids, valid = _ids()
    a = model(ids, valid, model.encode(_pixels(2, seed=1)))
    b = model(ids, valid, model.encode(_pixels(2, seed=2)))
    assert (a - b).abs().max() > 1e-4
    a.logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    assert all(p.grad is None for p in model.vision.parameters())
    grads = {n: p.grad for n, p in model.viln.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "q_proj" in n or "o_proj" in n)
    assert grads["stages.0.k_proj.weight"].abs().sum() > 0


def test_unfrozen_backbones_get_gradients():
    """Guards against a freeze that happens by accident (e.g. tensors detached in the fusion)."""
    model = _model()
    ids, valid = _ids()
    model(ids, valid, model.encode(_pixels(2))).sum().backward()
    assert model.vision.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.decoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def _greedy_by_recompute(model: LaVi, pixels: torch.Tensor, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    vis = model.encode(pixels)
    for _ in range(steps):
        x = torch.tensor([ids])
        ids.append(int(model(x, torch.ones_like(x, dtype=torch.bool), vis)[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_cached_generation_equals_full_recompute(fusion):
    """Guards against KV-cache slot/position bugs: cached decode must equal recomputing everything."""
    model = _model(fusion)
    cache = setup_caches(model, 4, 128)
    pixels = _pixels(1, f=2)
    prompt = [5, 9, 11, 3]
    with torch.no_grad():
        want = _greedy_by_recompute(model, pixels, prompt, 12)
        got = generate(model, cache, model.encode(pixels), torch.tensor([0]), [prompt],
                       GenerationConfig(max_new_tokens=12), eos_id=10_000)
    assert got[0].tokens == want and not got[0].finished


@pytest.mark.parametrize("fusion", FUSIONS)
def test_batch_equals_rows_alone(fusion):
    """Guards against padding leaking into attention or RoPE: uneven prompts in a batch give each row's
    own tokens, including rows sharing one item's visual state and items with fewer frames."""
    model = _model(fusion)
    cache = setup_caches(model, 8, 128)
    pixels = _pixels(2, f=3)
    fmask = torch.tensor([[True, True, True], [True, False, False]])
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    rows = torch.tensor([0, 1, 0])
    gen = GenerationConfig(max_new_tokens=10)
    with torch.no_grad():
        batch = generate(model, cache, model.encode(pixels, fmask), rows, prompts, gen, eos_id=10_000)
        for i, p in enumerate(prompts):
            item = int(rows[i])
            f = int(fmask[item].sum())
            alone = generate(model, cache, model.encode(pixels[item:item + 1, :f]), torch.tensor([0]), [p], gen,
                             eos_id=10_000)
            assert batch[i].tokens == alone[0].tokens


def test_eos_stops_each_row_and_sampling_is_seeded():
    """Guards against rows running past their EOS, and unseeded sampling (irreproducible labels)."""
    model = _model()
    cache = setup_caches(model, 4, 64)
    vis = model.encode(_pixels(1))
    prompts = [[5, 6, 7], [8, 9]]
    rows = torch.tensor([0, 0])
    with torch.no_grad():
        free = generate(model, cache, vis, rows, prompts, GenerationConfig(max_new_tokens=8), eos_id=10_000)
        eos = free[0].tokens[2]  # make the third greedy token of row 0 the EOS
        stopped = generate(model, cache, vis, rows, prompts, GenerationConfig(max_new_tokens=8), eos_id=eos)
        assert stopped[0].finished and stopped[0].tokens == free[0].tokens[:free[0].tokens.index(eos)]
        s = GenerationConfig(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
        one, two = (generate(model, cache, vis, rows, prompts, s, eos_id=10_000) for _ in range(2))
        assert [r.tokens for r in one] == [r.tokens for r in two]


def test_a_cache_too_small_is_refused_and_the_engine_grows_its_own_once(tmp_path):
    """Guards against a decode that writes past its static cache (an index error deep in a step, or garbage)
    and against an engine that reallocates its cache per request: a batch that does not fit is refused with
    what to do; the engine's cache grows to fit a larger request, then serves smaller ones as it is."""
    import numpy as np

    from lavi.serving.engine import Engine
    from lavi.tiny_models import make_tiny_checkpoint
    model = _model()
    with pytest.raises(ValueError, match="setup_caches"):
        generate(model, setup_caches(model, 1, 8), model.encode(_pixels(1)), torch.tensor([0]), [[5, 6, 7]],
                 GenerationConfig(max_new_tokens=6), eos_id=10_000)
    engine = Engine.load(make_tiny_checkpoint(tmp_path), max_batch=4)
    frames = [np.zeros((1, 32, 32, 3), np.uint8)]
    engine.generate(frames, [(0, "describe the image.")], GenerationConfig(max_new_tokens=4))
    first = engine.generator.kv_cache
    assert (first.max_batch, first.max_seq) == (1, 64)  # slots rounded up to a multiple of 64
    long = " ".join(["a"] * 70)
    engine.generate(frames, [(0, long)] * 3, GenerationConfig(max_new_tokens=4))
    grown = engine.generator.kv_cache
    assert (grown.max_batch, grown.max_seq) == (3, 128)
    engine.generate(frames, [(0, "describe the image.")], GenerationConfig(max_new_tokens=4))
    assert engine.generator.kv_cache is grown


def test_top_p_keeps_only_the_nucleus():
    """Guards against a top-p filter that drops the top token or keeps the tail."""
    from lavi.serving.steps import sample
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, 0.8, g)) for _ in range(200)}
    assert draws == {0, 1}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_save_load_round_trip_is_bit_exact(tmp_path, fusion):
    """Guards against lost or re-initialised tensors (e.g. tied lm_head, temporal embedding) on save/load."""
    model = _model(fusion)
    checkpoint.save(model, tmp_path)
    loaded = checkpoint.load(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config == model.config
    assert loaded.decoder.lm_head.weight is loaded.decoder.embed_tokens.weight


def test_pickled_checkpoint_is_refused(tmp_path):
    """Guards against unpickling untrusted weights (arbitrary code execution)."""
    model = _model()
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(checkpoint.CheckpointError, match="pickled"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(tmp_path, missing):
    """Guards against an opaque KeyError/OSError when a checkpoint directory is incomplete."""
    from lavi.serving.engine import Engine
    from lavi.tiny_models import make_tiny_checkpoint
    make_tiny_checkpoint(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(ValueError, match=missing):
        Engine.load(str(tmp_path))


def test_from_backbones_starts_as_the_base_llm(tmp_path):
    """Guards against from_backbones losing backbone weights or starting with a non-identity fusion."""
    import transformers
    torch.manual_seed(0)
    dec = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    vit = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2))
    dec.save_pretrained(tmp_path / "dec")
    vit.save_pretrained(tmp_path / "vit")
    model = checkpoint.from_backbones(tmp_path / "dec", tmp_path / "vit", num_stages=2, cond_dim=16,
                                      cond_heads=2).eval()
    ids, valid = torch.randint(0, 50, (1, 6)), torch.ones(1, 6, dtype=torch.bool)
    with torch.no_grad():
        assert_close(model(ids, valid, model.encode(_pixels(1))), dec(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_shared_prefix_forward_equals_per_row_forward(fusion):
    """Guards against the training shortcut (one visual prefix per item, replayed for each of its text rows)
    computing a different model than the per-row sequence it stands for (RoPE offsets, masks, padding)."""
    model = _model(fusion)
    fmask = torch.tensor([[True, True], [True, False]])
    vis = model.encode(_pixels(2, f=2), fmask)
    rows = torch.tensor([0, 1, 0, 1])
    ids = torch.randint(4, 40, (4, 6), generator=torch.Generator().manual_seed(3))
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[1, 4:] = False  # right padding, as in training
    with torch.no_grad():
        want = model(ids, valid, vis.select(rows))
        got = forward_shared(model, ids, valid, vis, rows)
    assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_generation_in_half_precision(tmp_path, fusion, dtype):
    """Guards against dtype mismatches (fp32 masks, RoPE tables or pixels meeting half weights) and
    against a half-precision model drifting from the fp32 one on the first greedy token."""
    from lavi.serving.engine import Engine
    from lavi.tiny_models import make_tiny_checkpoint
    import numpy as np
    make_tiny_checkpoint(tmp_path, fusion=fusion)
    frames = [np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)]
    full = Engine.load(str(tmp_path))
    half = Engine.load(str(tmp_path), dtype=dtype)
    assert half.model.dtype == dtype
    gen = GenerationConfig(max_new_tokens=6)
    a = full.generate(frames, [(0, "describe the video.")], gen)
    b = half.generate(frames, [(0, "describe the video.")], gen)
    assert b[0].num_generated_tokens == 6 and not b[0].finished
    pixels = torch.zeros(1, 1, 3, 32, 32)
    with torch.no_grad():
        ids, valid = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool)
        lf = full.model(ids, valid, full.model.encode(pixels))[0, -1]
        lh = half.model(ids, valid, half.model.encode(pixels))[0, -1].float()
    assert_close(lh, lf, atol=0.05, rtol=0.05)
    assert a[0].text is not None


def test_rows_that_fit_a_memory_budget():
    """Guards the auto batch size: floor of budget / per-row bytes, rounded to a multiple of 8, clamped."""
    from lavi.serving.steps import rows_that_fit
    assert rows_that_fit(1000, 10) == 96  # 100 fit, 96 is the multiple of 8 below
    assert rows_that_fit(70, 10) == 7  # under 8: exact
    assert rows_that_fit(5, 10) == 1  # nothing fits: one row still runs (and may fail as an infer error)
    assert rows_that_fit(10**12, 10, ceiling=512) == 512
    assert rows_that_fit(100, 0, ceiling=64) == 64


def test_a_failing_compiled_step_falls_back_to_eager(tmp_path):
    """Guards against a compiler failure (no C++ toolchain, a Triton bug) failing a whole labeling job:
    the engine continues eager, with the same greedy tokens."""
    from lavi.serving.engine import Engine
    from lavi.tiny_models import make_tiny_checkpoint
    import numpy as np
    make_tiny_checkpoint(tmp_path)
    frames = [np.random.default_rng(0).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)]
    gen = GenerationConfig(max_new_tokens=5)
    eager = Engine.load(str(tmp_path)).generate(frames, [(0, "describe the image.")], gen)
    engine = Engine.load(str(tmp_path))

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("simulated compiler failure")

    engine.generator.compiled, engine.generator.step = True, broken
    out = engine.generate(frames, [(0, "describe the image.")], gen)
    assert not engine.generator.compiled
    assert [g.text for g in out] == [g.text for g in eager]
    engine.generator.step = broken  # eager (not compiled) errors propagate: they are real
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        engine.generate(frames, [(0, "describe the image.")], gen)


@pytest.mark.gpu
def test_fit_batch_fills_gpu_memory(tmp_path):
    """Guards against an auto batch that overruns GPU memory or wastes it: the per-row memory is measured,
    the chosen batch actually runs, and CPU (nothing to measure) is refused."""
    from lavi.serving.engine import Engine
    from lavi.tiny_models import make_tiny_checkpoint
    import numpy as np
    make_tiny_checkpoint(tmp_path)
    engine = Engine.load(str(tmp_path), device="cuda", dtype=torch.bfloat16)
    b = engine.fit_batch(new_tokens=8, ceiling=256)
    assert 8 <= b <= 256 and engine.max_batch == b
    frames = [np.zeros((1, 32, 32, 3), np.uint8)] * b
    assert len(engine.generate(frames, [(i, "describe the image.") for i in range(b)],
                               GenerationConfig(max_new_tokens=8))) == b
    with pytest.raises(ValueError, match="CPU"):
        Engine.load(str(tmp_path)).fit_batch()
