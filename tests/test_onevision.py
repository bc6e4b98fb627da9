"""LLaVA-OneVision in our engine against transformers' LlavaOnevisionForConditionalGeneration and its processor,
on tiny random checkpoints written by `save_pretrained` (tests/onevision_fixture.py). fp32, CPU, seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lavi.onevision import anyres
from lavi.onevision.model import pixels
from onevision_fixture import PINPOINTS, make_onevision
from workers.anyres import anyres_tiles

transformers = pytest.importorskip("transformers")

# (height, width): base resolution, wide, tall, tiny, larger than the largest pinpoint, odd sizes
from lavi.serving.steps import GenerationConfig

GEN = GenerationConfig(max_new_tokens=12)
SIZES = [(35, 35), (30, 97), (101, 33), (5, 9), (400, 260), (64, 70), (71, 36)]


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    return make_onevision(tmp_path_factory.mktemp("ov") / "tiny-ov")


@pytest.fixture(scope="module")
def hf_model(ov_dir):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(ov_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(ov_dir):
    from lavi.onevision import checkpoint as onevision_checkpoint

    return onevision_checkpoint.load(ov_dir)


def _image(size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    img[: size[0] // 2] //= 2  # some structure, so resampling matters
    return img


def _reference_pixels(ov_dir, img: np.ndarray) -> torch.Tensor:
    from PIL import Image
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    proc = LlavaOnevisionImageProcessorPil.from_pretrained(ov_dir)
    return proc(images=Image.fromarray(img), return_tensors="pt")["pixel_values"][0]


def _reference_tokens(ov_dir, size: tuple[int, int]) -> int:
    """The processor's own count of <image> tokens (LlavaOnevisionProcessor._get_number_of_features; the
    processor itself cannot be built here: its video processor needs torchvision)."""
    from types import SimpleNamespace

    from transformers import LlavaOnevisionProcessor

    ns = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=PINPOINTS), num_image_tokens=25,
                         vision_aspect_ratio="anyres_max_2")
    ns._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(ns, *a)
    return LlavaOnevisionProcessor._get_number_of_features(ns, *size, 35, 35)


@pytest.mark.parametrize("size", SIZES)
def test_anyres_pixels_equal_the_reference_processor(ov_dir, size):
    """Our uint8 tiles, scaled and normalised, are the pixels LlavaOnevisionImageProcessor makes: a wrong best
    resolution, fit, padding side, crop order, resampling filter or rescale arithmetic breaks equality."""
    img = _image(size, seed=sum(size))
    ref = _reference_pixels(ov_dir, img)
    from lavi.onevision.config import OneVisionConfig

    c = OneVisionConfig.from_dir(ov_dir)
    ours = pixels(anyres_tiles(img, c.pinpoints, c.tile_size, c.resample), c)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("size", SIZES)
def test_image_token_count_equals_the_processors(ours, ov_dir, size):
    """The number of visual tokens an image becomes (base, unpadded grid, newlines, anyres_max shrink) is what
    the processor expands <image> into; a mismatch makes transformers refuse the prompt."""
    c = ours.config
    tiles = pixels(anyres_tiles(_image(size, 0), c.pinpoints, c.tile_size, c.resample), c)
    with torch.no_grad():
        n = ours.image_tokens(tiles, size).shape[0]
    assert n == _reference_tokens(ov_dir, size) == anyres.image_tokens(size, c.pinpoints, c.tile_size, c.side, c.max_tiles)


def _prompt_ids(ov_dir, prompt: str, media: str) -> list[int]:
    """Our rendering and tokenisation of one user turn (the checkpoint's template, its tokenizer)."""
    import json

    from tokenizers import Tokenizer

    from lavi.serving.chat_template import ChatTemplate, find_template, special_tokens

    cfg = json.loads((ov_dir / "tokenizer_config.json").read_text())
    text = ChatTemplate(find_template(ov_dir), special_tokens(cfg)).render(prompt, media)
    return Tokenizer.from_file(str(ov_dir / "tokenizer.json")).encode(text).ids


def _logits(model, embeds: torch.Tensor) -> torch.Tensor:
    t = embeds.shape[0]
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    logits, _ = model.decoder(embeds[None], torch.arange(t)[None], mask)
    return logits[0]


def test_prompt_renders_as_the_tokenizers_chat_template(ov_dir):
    """Our jinja rendering equals transformers' apply_chat_template for one image (or video) then the text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ov_dir)
    for media in ("image", "video"):
        msgs = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": "what is it?"}]}]
        ref = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert _prompt_ids(ov_dir, "what is it?", media) == tok(ref)["input_ids"]


def _assert_image_logits_match(model, ref_model, ckpt, size: tuple[int, int], seed: int, exact: bool = False) -> None:
    c = model.config
    img = _image(size, seed=seed)
    ids = _prompt_ids(ckpt, "describe the image.", "image")
    with torch.no_grad():
        feats = model.image_tokens(pixels(anyres_tiles(img, c.pinpoints, c.tile_size, c.resample), c), size)
        got = _logits(model, model.splice(ids, feats))
        k = ids.index(c.image_token_id)
        x = torch.tensor([ids[:k] + [c.image_token_id] * feats.shape[0] + ids[k + 1:]])
        ref = ref_model(input_ids=x, pixel_values=_reference_pixels(ckpt, img)[None],
                        image_sizes=torch.tensor([size])).logits[0]
    if exact:
        assert torch.equal(got, ref), (size, (got.float() - ref.float()).abs().max().item())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", SIZES)
def test_image_logits_equal_transformers(ours, hf_model, ov_dir, size):
    """fp32 logits of a prompt with one image, at every position, equal LlavaOnevisionForConditionalGeneration's:
    a wrong feature layer, projector, crop layout, unpadding, newline or splice position changes them."""
    _assert_image_logits_match(ours, hf_model, ov_dir, size, seed=7)


@pytest.mark.parametrize("variant", [dict(feature_layer=[-3, -1]), dict(tie=True),
                                     dict(feature_layer=-2, max_tiles=9)])
def test_architecture_variants_match_transformers(variant, tmp_path):
    """The options a checkpoint may set: several feature layers concatenated, tied embeddings, a middle layer
    with anyres_max_9: logits equal transformers' for a wide image (each option read wrong shifts or resizes the
    visual tokens)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from lavi.onevision import checkpoint as onevision_checkpoint

    d = make_onevision(tmp_path / "ov", seed=1, **variant)
    ref_model = LlavaOnevisionForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    _assert_image_logits_match(onevision_checkpoint.load(d), ref_model, d, (30, 97), seed=2)


def test_unsupported_options_are_refused_by_name(ov_dir):
    """What the loader does not implement is refused with a message naming it, not run wrongly."""
    import json

    from lavi.onevision.config import OneVisionConfig, UnsupportedCheckpoint

    hf = json.loads((ov_dir / "config.json").read_text())
    pre = json.loads((ov_dir / "preprocessor_config.json").read_text())
    for change, name in ((dict(vision_feature_select_strategy="default"), "vision_feature_select_strategy"),
                         (dict(projector_hidden_act="mish"), "projector_hidden_act"),
                         (dict(vision_aspect_ratio="pad"), "vision_aspect_ratio"),
                         (dict(text_config={**hf["text_config"], "use_sliding_window": True}), "use_sliding_window")):
        with pytest.raises(UnsupportedCheckpoint, match=name):
            OneVisionConfig.from_hf({**hf, **change}, pre)
    with pytest.raises(UnsupportedCheckpoint, match="do_center_crop"):
        OneVisionConfig.from_hf(hf, {**pre, "do_center_crop": True})


def test_video_logits_equal_transformers(ours, hf_model, ov_dir):
    """A clip of frames (given as pixels: the video processor needs torchvision, absent here): pooled 2x2 with
    rounding up, one newline, spliced at <video>; logits equal transformers'."""
    c = ours.config
    frames = torch.randn(4, 3, 35, 35, generator=torch.Generator().manual_seed(3))
    ids = _prompt_ids(ov_dir, "describe the video.", "video")
    with torch.no_grad():
        feats = ours.video_tokens(frames)
        assert feats.shape[0] == anyres.video_tokens(4, c.side) == 4 * 9 + 1
        got = _logits(ours, ours.splice(ids, feats))
        k = ids.index(c.video_token_id)
        expanded = ids[:k] + [c.video_token_id] * feats.shape[0] + ids[k + 1:]
        ref = hf_model(input_ids=torch.tensor([expanded]), pixel_values_videos=frames[None]).logits[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_bf16_logits_are_bit_identical_to_transformers(ov_dir):
    """A hub checkpoint is bf16 and runs in bf16 where the CPU computes it (or on a GPU): at these sizes logits equal
    transformers' bf16 forward bit for bit for images (one downscaled) and a clip. Guards against roundings of our
    own: rotary positions computed in float32 (transformers rounds each product in bf16), the
    processor's pixels in the permuted layout (another convolution kernel), one feature layer copied before the
    projector (another product kernel); each moved the logits by up to 0.05."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from lavi.onevision import checkpoint as onevision_checkpoint

    ours = onevision_checkpoint.load(ov_dir, dtype=torch.bfloat16)
    ref_model = LlavaOnevisionForConditionalGeneration.from_pretrained(ov_dir, dtype=torch.bfloat16).eval()
    for size in [(35, 35), (30, 97), (400, 260)]:
        _assert_image_logits_match(ours, ref_model, ov_dir, size, seed=7, exact=True)
    frames = torch.randn(4, 3, 35, 35, generator=torch.Generator().manual_seed(3))
    ids = _prompt_ids(ov_dir, "describe the video.", "video")
    with torch.no_grad():
        feats = ours.video_tokens(frames)
        got = _logits(ours, ours.splice(ids, feats))
        k = ids.index(ours.config.video_token_id)
        expanded = ids[:k] + [ours.config.video_token_id] * feats.shape[0] + ids[k + 1:]
        ref = ref_model(input_ids=torch.tensor([expanded]), pixel_values_videos=frames[None]).logits[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref), (got.float() - ref.float()).abs().max().item()


@pytest.fixture(scope="module")
def engine(ov_dir):
    from lavi.onevision.engine import OneVisionEngine

    return OneVisionEngine.load(str(ov_dir), max_batch=8)


def _tiles(engine, img):
    c = engine.config
    return anyres_tiles(img, c.pinpoints, c.tile_size, c.resample)


@pytest.mark.parametrize("size", [(35, 35), (30, 97), (400, 260), (5, 9)])
def test_greedy_generation_is_token_identical_to_transformers_generate(engine, hf_model, ov_dir, size):
    """Our static-cache prefill + decode loop picks the same greedy tokens as transformers' generate() on the
    same image and prompt (a cache slot, RoPE position or splice off by one diverges within a few tokens)."""
    img = _image(size, seed=11)
    prompt = "describe the image."
    [got] = engine.generate([_tiles(engine, img)], [(0, prompt)], GEN, media=[("image", size)])
    ids = engine.encode_prompt(prompt, "image")
    c = engine.config
    n = anyres.image_tokens(size, c.pinpoints, c.tile_size, c.side, c.max_tiles)
    k = ids.index(c.image_token_id)
    expanded = torch.tensor([ids[:k] + [c.image_token_id] * n + ids[k + 1:]])
    with torch.no_grad():
        out = hf_model.generate(input_ids=expanded, attention_mask=torch.ones_like(expanded),
                                pixel_values=_reference_pixels(ov_dir, img)[None], image_sizes=torch.tensor([size]),
                                max_new_tokens=GEN.max_new_tokens, do_sample=False)
    ref = out[0, expanded.shape[1]:].tolist()
    ref = ref[: ref.index(c.eos_token_id)] if c.eos_token_id in ref else ref
    assert ref and got.text == engine.tokenizer.decode(ref)
    assert got.num_generated_tokens == len(ref) + int(got.finished)


def test_batched_equals_one_by_one_with_mixed_sizes(engine):
    """Images of different sizes (different visual token counts, so different left padding) and a video in one
    batch give each row the text it gets alone: padding never leaks into attention or RoPE."""
    sizes = [(35, 35), (30, 97), (101, 33), (400, 260)]
    visuals = [_tiles(engine, _image(s, seed=i)) for i, s in enumerate(sizes)]
    media = [("image", s) for s in sizes]
    frames = np.random.default_rng(5).integers(0, 256, (3, 35, 35, 3), dtype=np.uint8)
    visuals.append(frames)
    media.append(("video", (35, 35)))
    requests = [(i, q) for i in range(len(visuals)) for q in ("describe the image.", "what colour is the square?")]
    work = engine.generator.work
    before = (work.prefills, work.prefill_tokens)
    batched = engine.generate(visuals, requests, GEN, media=media)
    prefills, tokens = work.prefills - before[0], work.prefill_tokens - before[1]
    alone = [engine.generate([visuals[i]], [(0, q)], GEN, media=[media[i]])[0] for i, q in requests]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert len({g.text for g in batched}) > 1  # the inputs matter
    contexts = [engine._visual_tokens(visuals[i], media[i]) + len(engine.encode_prompt(q, media[i][0])) - 1
                for i, q in requests]
    # prefilled in groups of similar length (lavi.serving.steps.prefill_groups), not all padded to the longest
    assert 1 < prefills < len(requests) and tokens < len(requests) * max(contexts)


def test_engine_load_takes_a_onevision_directory_and_refuses_other_model_types(ov_dir, tmp_path):
    """`Engine.load` (what the labeler and eval call) opens a LLaVA-OneVision directory; another model_type gets
    one line naming what it found and what is supported, not a KeyError."""
    import json

    from lavi.core.checkpoint import CheckpointError
    from lavi.serving.engine import Engine
    from lavi.onevision.engine import OneVisionEngine

    assert isinstance(Engine.load(str(ov_dir)), OneVisionEngine)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    with pytest.raises(CheckpointError, match="'mllama'.*supported: a LaVi checkpoint or a LLaVA-OneVision"):
        Engine.load(str(tmp_path))


def test_converted_lavi_starts_as_the_onevision_decoder_on_text_alone(ours, ov_dir, tmp_path):
    """`convert` keeps the tower, decoder, tokenizer and chat template and adds a zero-initialised conditioner:
    with an image given, its logits equal the LLaVA-OneVision decoder's on the text-only turn, exactly (a
    non-zero head, a wrong weight copy or another prompt format breaks equality); it reloads as a LaVi."""
    from lavi.core import checkpoint
    from lavi.onevision.convert import convert
    from lavi.serving.engine import Engine

    convert(ov_dir, tmp_path / "lavi", num_stages=2, cond_dim=16, cond_heads=2)
    engine = Engine.load(str(tmp_path / "lavi"))
    lavi = checkpoint.load(tmp_path / "lavi")
    ids = engine.encode_prompt("what colour is the square?")
    assert ours.config.image_token_id not in ids and len(ids) > 5
    x = torch.tensor([ids])
    frames = torch.randn(1, 1, 3, 35, 35)
    with torch.no_grad():
        got = lavi(x, torch.ones_like(x, dtype=torch.bool), lavi.encode(frames))
        ref = _logits(ours, ours.decoder.embed_tokens(x[0]))
    assert torch.equal(got[0], ref)
    assert engine.eos_id == ours.config.eos_token_ids


def test_convert_command_writes_a_loadable_lavi_and_refuses_a_non_onevision(ov_dir, tmp_path):
    """`lavi-label convert DIR --out LAVI_DIR` works from the command line; a LaVi directory as the source is
    refused with a one-line usage error, not a traceback."""
    from click.testing import CliRunner

    from jobs.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(ov_dir), "--out", str(tmp_path / "lavi"), "--stages", "2",
                               "--cond-dim", "16", "--cond-heads", "2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "lavi" / "model.safetensors").exists() and "zero-initialised" in res.output
    res = runner.invoke(main, ["convert", str(tmp_path / "lavi"), "--out", str(tmp_path / "again")])
    assert res.exit_code == 2 and "llava_onevision" in res.output


@pytest.mark.timeout(300)
def test_lavi_label_run_with_a_onevision_directory_writes_transformers_greedy_texts(ray_local, ov_dir, hf_model,
                                                                                   tmp_path):
    """`run --model OV_DIR` end to end (listing, decode workers cutting anyres tiles, the labeler, Parquet): each
    image's caption equals transformers' greedy text on the same file, for images of many sizes batched
    together; a video is labelled too. Guards the decode contract (tiles, no JPEG draft), the sizes the
    labeler hands the engine and the driver's reading of a OneVision config."""
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.config import RunConfig
    from pipeline.driver import run
    from media import mp4

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sizes = {f"img{i}.png": s for i, s in enumerate([(35, 35), (30, 97), (101, 33), (400, 260), (64, 70)])}
    for name, size in sizes.items():
        Image.fromarray(_image(size, seed=size[0])).save(corpus / name)
    mp4(corpus / "clip.mp4", seconds=1.0, size=48)
    prompt, n = "describe the image.", 10
    summary = run(RunConfig(inputs=(str(corpus),), out=str(tmp_path / "out"), model=str(ov_dir), prompt=prompt,
                            max_new_tokens=n, frames=3))
    assert summary["status"].get("error", 0) == 0, summary
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert set(rows) == {*sizes, "clip.mp4"} and rows["clip.mp4"]["text"] is not None
    from lavi.onevision.engine import OneVisionEngine

    engine = OneVisionEngine.load(str(ov_dir))
    c = engine.config
    for name, size in sizes.items():
        img = np.asarray(Image.open(corpus / name).convert("RGB"))
        ids = engine.encode_prompt(prompt, "image")
        k = ids.index(c.image_token_id)
        tokens = anyres.image_tokens(size, c.pinpoints, c.tile_size, c.side, c.max_tiles)
        x = torch.tensor([ids[:k] + [c.image_token_id] * tokens + ids[k + 1:]])
        with torch.no_grad():
            out = hf_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                    pixel_values=_reference_pixels(ov_dir, img)[None], image_sizes=torch.tensor([size]))
        ref = out[0, x.shape[1]:].tolist()
        ref = ref[: ref.index(c.eos_token_id)] if c.eos_token_id in ref else ref
        assert rows[name]["text"] == engine.tokenizer.decode(ref), name


def test_saved_onevision_loads_in_transformers_with_the_same_weights(ours, hf_model, ov_dir, tmp_path):
    """`onevision_checkpoint.save` writes what transformers loads (the hub layout and a config.json it reads):
    every weight comes back equal and the reloaded model's logits equal the original's (a renamed key would
    be re-initialised at random, a wrong config field would change shapes or the anyres rules)."""
    import shutil

    from transformers import LlavaOnevisionForConditionalGeneration

    from lavi.onevision import checkpoint as onevision_checkpoint

    onevision_checkpoint.save(ours, tmp_path / "saved")
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        shutil.copy(ov_dir / f, tmp_path / "saved" / f)
    again = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    ref = hf_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.state_dict().items())
    _assert_image_logits_match(onevision_checkpoint.load(tmp_path / "saved"), again, tmp_path / "saved", (101, 33), 4)
