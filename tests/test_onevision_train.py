"""Training a LLaVA-OneVision (tiny-shapes' concat counterpart): its batches, its prefix shortcut, its checkpoint
in transformers' hands, and the train command's `--fusion llava-ov`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from jobs.cli import main
from lavi.onevision import anyres
from lavi.onevision import checkpoint as onevision_checkpoint
from lavi.training.collate import Example, collate
from lavi.training.losses import encode, losses
from lavi.core.model import attention_mask
from lavi.onevision.model import pixels
from lavi.serving.prompts import ChatPrompts
from lavi.training.shared_prefix import forward_shared
from lavi.tiny_models import tiny_shapes_onevision
from lavi.serving.tokenizer import Tokenizer
from onevision_fixture import make_onevision
from shapes import render, spec
from shapes.batches import ShapesData
from shapes.spec import vocabulary
from workers.anyres import anyres_tiles

WEIGHTS = Path(__file__).resolve().parent.parent / "lavi" / "weights"


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    return make_onevision(tmp_path_factory.mktemp("ov") / "tiny-ov")


def _examples(rng: np.random.Generator) -> list[Example]:
    """Images of three sizes and a 3-frame clip, a few (prompt, target) pairs each."""
    out = []
    for size in ((35, 35), (30, 97), (80, 50)):
        out.append(Example(rng.integers(0, 256, (1, *size, 3), dtype=np.uint8),
                           (("describe the image.", "a red circle on the left"), ("how many shapes?", "two"))))
    out.append(Example(rng.integers(0, 256, (3, 35, 35, 3), dtype=np.uint8),
                       (("describe the video.", "a blue square"),), media="video"))
    return out


def test_training_rows_over_the_prefix_equal_the_full_spliced_sequence(ov_dir):
    """Training's shortcut (the template's head and the visual tokens as one prefix per item, its rows attending to
    it) gives the logits of the whole prompt, placeholder replaced, run through the decoder: the sequence the
    engine and transformers see. The fixture's Qwen2 template puts a system turn before the image, so the head
    is not empty."""
    model = onevision_checkpoint.load(ov_dir)
    c = model.config
    tok = Tokenizer(ov_dir)
    chat = ChatPrompts.load(ov_dir, tok)
    examples = _examples(np.random.default_rng(0))
    b = collate(examples, model, tok, chat, anyres_tiles)
    assert b.heads[0] and all(h == b.heads[0] for h in b.heads)
    with torch.no_grad():
        got = forward_shared(model, b.ids, b.valid, encode(model, b), b.rows)
        r = 0
        for e in examples:
            frames = anyres_tiles(e.frames[0], c.pinpoints, c.tile_size, c.resample) if e.kind == "image" \
                else e.frames
            x = pixels(frames, c)
            visual = model.image_tokens(x, e.frames.shape[1:3]) if e.kind == "image" else model.video_tokens(x)
            for prompt, target in e.pairs:
                p = chat.ids(prompt, e.kind)
                y = tok.encode(target) + [c.eos_token_id]
                embeds = model.splice(p + y, visual)[None]
                s = embeds.shape[1]
                valid = torch.ones(1, s, dtype=torch.bool)
                logits, _ = model.decoder(embeds, torch.arange(s)[None], attention_mask(valid, torch.arange(s), valid))
                n = int(b.valid[r].sum())
                assert n == len(p) - p.index(c.image_token_id if e.kind == "image" else c.video_token_id) - 1 + len(y)
                torch.testing.assert_close(got[r, :n], logits[0, s - n:], rtol=1e-4, atol=1e-5)
                r += 1
    assert r == len(b.ids)


def test_focus_targets_sit_on_the_objects_tokens_in_the_prefix(tmp_path):
    """Each caption phrase's focus lands on its object's tokens: the base view's patches and the crop grid's
    (newlines never), after the template's head; a clip's on its pooled cells, frame by frame."""
    model = tiny_shapes_onevision(vocabulary(), tmp_path)
    c = model.config
    tok = Tokenizer(tmp_path)
    data = ShapesData(seed=3, images=1, videos=1, questions=0, frames=(4,), focus=True, augment=False)
    b = collate(data(0), model, tok, ChatPrompts.load(tmp_path, tok), anyres_tiles)
    side = c.side
    assert b.focus.shape[-1] == max(len(h) for h in b.heads) + anyres.image_tokens((128, 128), c.pinpoints, 128, side, 9)
    img = b.focus[0][b.focus[0].any(-1)]  # positions predicting an object's words
    assert len(img)
    for row in img:
        base = row[:side * side].view(side, side)
        grid = row[side * side:side * side + side * (side + 1)].view(side, side + 1)
        assert torch.equal(grid[:, :side], base) and not grid[:, side].any() and base.sum() == 4  # its cell's 2x2
    vid = b.focus[1][b.focus[1].any(-1)]
    pooled = -(-side // 2)
    assert len(vid) and all(0 < int(row[:4 * pooled ** 2].sum()) <= 4 * 4 and not row[4 * pooled ** 2:].any()
                            for row in vid)
    lm, foc = losses(model, b, focus=True)
    assert torch.isfinite(lm) and foc is not None and torch.isfinite(foc)


def _widen(model: torch.nn.Module) -> None:
    """Random init is near-degenerate at tiny sizes: widen it so that the greedy tokens depend on the image."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15 if p.ndim > 1 else 0.05)


@pytest.fixture(scope="module")
def shapes_ov(tmp_path_factory):
    """tiny-shapes-llava-ov's architecture and assets with widened random weights, saved as training saves it."""
    d = tmp_path_factory.mktemp("shapes-ov") / "tiny-shapes-llava-ov"
    torch.manual_seed(0)
    model = tiny_shapes_onevision(vocabulary(), d / "_assets")
    _widen(model)
    onevision_checkpoint.save(model, d, assets=d / "_assets")
    return d


def _transformers_greedy(d: Path, item, kind: str, prompt: str, n: int) -> list[int]:
    """transformers on its own: AutoTokenizer and its chat template, LlavaOnevisionImageProcessor's pixels and the
    processor's own image token count (the processor object needs torchvision, so it is not built); a clip's
    frames scaled and normalised as the video processor does (rescale, normalise, no resize at 128 px)."""
    from types import SimpleNamespace

    from PIL import Image
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": kind}, {"type": "text", "text": prompt}]}],
                                   add_generation_prompt=True, tokenize=False)
    extra = {}
    if kind == "image":
        proc = LlavaOnevisionImageProcessorPil.from_pretrained(d)
        ns = SimpleNamespace(image_processor=proc, num_image_tokens=36, vision_aspect_ratio=model.config.vision_aspect_ratio)
        ns._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(ns, *a)
        count = LlavaOnevisionProcessor._get_number_of_features(ns, 128, 128, 128, 128)
        px = proc(images=Image.fromarray(item.pixels), return_tensors="pt")
        extra = {"pixel_values": px["pixel_values"], "image_sizes": px["image_sizes"]}
        text = text.replace("<image>", "<image>" * count)
    else:
        frames = torch.from_numpy(np.stack(item.frames)).permute(0, 3, 1, 2).float() / 255
        extra = {"pixel_values_videos": ((frames - 0.5) / 0.5)[None]}
        text = text.replace("<video>", "<video>" * (len(item.frames) * 9 + 1))
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             **extra)
    got = out[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return got[: next((i for i, t in enumerate(got) if t in eos), len(got))]


def _check_against_transformers(d: Path, count: int) -> None:
    from lavi.serving.engine import Engine
    from lavi.serving.steps import GenerationConfig

    engine = Engine.load(str(d))
    c = engine.config
    rng = np.random.default_rng(7)
    gen = GenerationConfig(max_new_tokens=24)
    for i in range(count):
        img = render.sample_image(rng)
        idx = [0, 5, 10, 15]
        vid = render.sample_video(rng, draw=idx)
        for kind, item, visual, prompt in (
                ("image", img, anyres_tiles(img.pixels, c.pinpoints, c.tile_size, c.resample), spec.IMAGE_PROMPT),
                ("video", vid, np.stack(vid.frames), spec.VIDEO_PROMPT)):
            [ours] = engine.generate([visual], [(0, prompt)], gen, media=[(kind, (128, 128))])
            ref = _transformers_greedy(d, item, kind, prompt, gen.max_new_tokens)
            assert ours.num_generated_tokens > 2 and ours.text == engine.tokenizer.decode(ref), (kind, i)


def test_a_saved_tiny_shapes_llava_ov_generates_in_transformers_what_our_engine_generates(shapes_ov):
    """transformers loads the checkpoint training writes (config, weights, tokenizer, chat template, preprocessor)
    and its greedy captions of shapes-v1 images and clips are ours, token for token."""
    _check_against_transformers(shapes_ov, 2)


def test_a_saved_llava_ov_keeps_its_frames_and_prompts_and_its_lavi_conversion_takes_them(shapes_ov, tmp_path):
    """Guards against a checkpoint trained here forgetting, once saved, the frames per clip it was trained on and
    the prompts it knows (a reloaded tiny-shapes-llava-ov asked "Describe the image." sees unknown words), and a
    `convert` of it prompting otherwise than its teacher; transformers still loads the config."""
    from transformers import AutoConfig

    from lavi.onevision.convert import convert
    from lavi.serving.engine import Engine

    engine = Engine.load(str(shapes_ov))
    assert (engine.default_frames, engine.config.max_frames) == (4, 16)
    assert engine.default_prompt("image") == spec.IMAGE_PROMPT and engine.default_prompt("video") == spec.VIDEO_PROMPT
    assert AutoConfig.from_pretrained(str(shapes_ov)).model_type == "llava_onevision"
    convert(str(shapes_ov), tmp_path / "lavi", num_stages=2, cond_dim=16, cond_heads=2)
    lavi = Engine.load(str(tmp_path / "lavi"))
    assert lavi.default_prompt("video") == spec.VIDEO_PROMPT and lavi.default_frames == 4


@pytest.mark.parametrize("name", ["tiny-shapes-llava-ov", "tiny-shapes-llava-ov-long"])
def test_the_bundled_tiny_shapes_llava_ovs_generate_in_transformers_what_our_engine_generates(name):
    _check_against_transformers(WEIGHTS / name, 3)


def test_train_command_trains_resumes_and_fine_tunes_a_llava_onevision(tmp_path):
    """`train --fusion llava-ov`: tiny-shapes' LLaVA-OneVision from scratch (a vision phase, then captions, VQA and
    the focus loss), a Hugging Face directory at every checkpoint, resumed where it stopped, fine-tuned with
    --init; it labels through the engine."""
    out = tmp_path / "ov"
    args = ["train", "--out", str(out), "--fusion", "llava-ov", "--images", "2", "--videos", "1", "--questions", "1",
            "--frames", "4,2", "--grid-probe", "1", "--focus", "1", "--vision-steps", "1", "--vision-images", "2",
            "--vision-videos", "1", "--warmup", "1", "--threads", "1", "--checkpoint-every", "2"]
    result = CliRunner().invoke(main, args + ["--steps", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava_onevision"
    result = CliRunner().invoke(main, args + ["--steps", "3"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "train_state.json").read_text())["step"] == 3
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    tuned = tmp_path / "tuned"
    result = CliRunner().invoke(main, ["train", "--out", str(tuned), "--fusion", "llava-ov", "--init", str(out),
                                       "--steps", "1", "--images", "1", "--videos", "1", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "x"), "--init", str(out), "--steps", "1"])
    assert result.exit_code == 2 and "--fusion llava-ov" in result.output
    from lavi.serving.engine import Engine
    engine = Engine.load(str(tuned))
    assert engine.name == "tuned" and engine.config.eos_token_id == Tokenizer(tuned).tok.token_to_id("<eos>")



def test_eval_labels_a_llava_onevision_through_its_anyres_decode(shapes_ov, tmp_path):
    """`lavi-label eval`'s labelling of a LLaVA-OneVision: its images are cut into anyres tiles by the decoder (not
    squeezed into frames), so every row comes out ok."""
    from jobs.evaluate import label_manifest, write_split
    from lavi.serving.engine import Engine
    from lavi.serving.steps import GenerationConfig
    from shapes.corpus import read_manifest

    entries = read_manifest(write_split(str(tmp_path / "split"), 2, 1, seed=5))
    rows = label_manifest(Engine.load(str(shapes_ov)), entries, 4, gen=GenerationConfig(max_new_tokens=4))
    assert len(rows) >= 3 * 2 and {r["status"] for r in rows} <= {"ok", "truncated"}, \
        {r["error_message"] for r in rows}
