"""`convert` of a Qwen-VL into a LaVi (lavi.qwenvl.convert, lavi.qwenvl.lavi_model) on tiny random checkpoints: the
Qwen's decoder, tokenizer, chat template and ViT kept, a zero-initialised ViLN conditioner over the ViT's blocks, frames
at their own size with a varying number of visual tokens per item, masked."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lavi.core.rope import rope_cos_sin
from lavi.core.model import attention_mask
from tests.qwenvl_fixture import KINDS, image, make_qwenvl

transformers = pytest.importorskip("transformers")
PROMPT = "what colour is the square?"


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    return {k: make_qwenvl(tmp_path_factory.mktemp(k) / "qwen", k, seed=3) for k in KINDS}


@pytest.fixture(scope="module")
def lavi_dirs(qwen_dirs, tmp_path_factory):
    from lavi.qwenvl.convert import convert

    out = {}
    for k, d in qwen_dirs.items():
        out[k] = tmp_path_factory.mktemp(f"lavi-{k}") / "lavi"
        convert(d, out[k], num_stages=2, cond_dim=16, cond_heads=2)
    return out


def _text_logits(decoder, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder alone on one row of text ids (T,): plain positions unless given."""
    t = ids.shape[0]
    positions = torch.arange(t)[None] if positions is None else positions
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    logits, _ = decoder(decoder.embed_tokens(ids[None]), positions, mask)
    return logits[0]


@pytest.mark.parametrize("interleaved", [False, True])
def test_mrope_with_equal_axes_is_exactly_the_plain_rotary(interleaved):
    """A LaVi's context is text only, so its M-RoPE positions are equal on all three axes: the rotation must then be
    the plain rotary to the bit (a section that takes an axis's angle from the wrong frequency, or an interleave
    that shifts one, would turn text positions and break the decoder the LaVi inherits)."""
    positions = torch.tensor([[0, 1, 2, 3, 7, 8], [0, 0, 0, 1, 2, 3]])
    for head_dim, section in ((8, (2, 1, 1)), (128, (16, 24, 24)), (128, (24, 20, 20))):
        plain = rope_cos_sin(positions, head_dim, 10000.0)
        mrope = rope_cos_sin(positions[None].expand(3, -1, -1), head_dim, 10000.0, section, interleaved)
        assert all(torch.equal(a, b) for a, b in zip(plain, mrope))
        shifted = positions[None].repeat(3, 1, 1)
        shifted[1] += 1  # a real M-RoPE position (an image's rows) is not the plain rotary: the check can fail
        assert not torch.equal(rope_cos_sin(shifted, head_dim, 10000.0, section, interleaved)[0], plain[0])


@pytest.mark.parametrize("kind", KINDS)
def test_converted_lavi_starts_as_the_qwen_decoder_on_text_alone(kind, qwen_dirs, lavi_dirs):
    """`convert` keeps the Qwen's decoder (its M-RoPE config carried), tokenizer and chat template and adds a
    zero-initialised conditioner: given two images of different sizes, the LaVi's logits equal the Qwen decoder's on
    the text-only turn exactly, and transformers' Qwen-VL on the same ids; it loads through lavi.families as a LaVi."""
    from lavi.families import LAVI, family_at, load_model
    from lavi.qwenvl import checkpoint as qwen_checkpoint
    from lavi.qwenvl.lavi_model import QwenLaVi
    from lavi.serving.engine import Engine

    qwen = qwen_checkpoint.load(qwen_dirs[kind], dtype=torch.float32)
    assert family_at(lavi_dirs[kind]).name == LAVI
    lavi = load_model(lavi_dirs[kind])
    assert isinstance(lavi, QwenLaVi) and lavi.config.decoder == qwen.config.decoder
    assert lavi.config.decoder.mrope_section == (2, 1, 1)
    ids = Engine.load(str(lavi_dirs[kind])).encode_prompt(PROMPT)
    assert qwen.config.image_token_id not in ids and len(ids) > 5
    x = torch.tensor([ids, ids])
    vis = lavi.encode_frames([image((24, 40), 0), image((16, 56), 1)], [("image", (24, 40)), ("image", (16, 56))])
    assert vis.mask.sum(1).tolist() == [24 * 40 // 64, 16 * 56 // 64]
    with torch.no_grad():
        got = lavi(x, torch.ones_like(x, dtype=torch.bool), vis)
        ref = _text_logits(qwen.decoder, x[0])
        hf = transformers.AutoModelForImageTextToText.from_pretrained(qwen_dirs[kind], dtype=torch.float32).eval()
        hf_logits = hf(input_ids=x[:1]).logits[0]
    assert torch.equal(got[0], ref) and torch.equal(got[1], ref)
    torch.testing.assert_close(got[0], hf_logits, rtol=1e-4, atol=1e-4)


def _trained(lavi):
    """The conditioner's output heads made non-zero, as training leaves them: vision now moves the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lavi.viln.named_parameters():
            if "o_proj" in name:
                p.normal_(0, 0.3)
    return lavi


@pytest.mark.parametrize("kind", KINDS)
def test_items_with_different_token_counts_are_masked(kind, lavi_dirs):
    """Items of different sizes have their own number of visual tokens, padded to the batch's most: each row's logits
    in a batch equal the row's alone (padding keys that leaked into the conditioner's attention would change the
    smaller item's), and a video's temporal patches each add their tokens. The heads are made non-zero first, and
    the images are seen to matter, so equality is not the zero-init's."""
    from lavi.families import load_model

    lavi = _trained(load_model(lavi_dirs[kind]))
    imgs = [image((8, 8), 4), image((40, 24), 5), image((56, 48), 6)]
    media = [("image", im.shape[:2]) for im in imgs]
    ids = torch.tensor([[5, 9, 11, 4, 7]] * 3)
    valid = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        together = lavi(ids, valid, lavi.encode_frames(imgs, media))
        alone = [lavi(ids[:1], valid[:1], lavi.encode_frames([im], [m]))[0] for im, m in zip(imgs, media)]
        video = lavi.encode_frames([np.stack([image((16, 24), s) for s in range(3)])], [("video", (16, 24))])
    for row, ref in zip(together, alone):
        torch.testing.assert_close(row, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)
    assert video.mask.shape == (1, 2 * 16 * 24 // 64) and bool(video.mask.all())  # 3 frames: 2 temporal patches


@pytest.mark.parametrize("kind", KINDS)
def test_converted_lavi_round_trips_and_keeps_the_qwen_tower(kind, qwen_dirs, lavi_dirs):
    """The checkpoint holds the Qwen's ViT blocks (bit-exact) and reloads to the same visual state; no merger is
    kept (nothing of the LaVi puts visual tokens in the context)."""
    from lavi.core import checkpoint
    from lavi.qwenvl import checkpoint as qwen_checkpoint

    qwen = qwen_checkpoint.load(qwen_dirs[kind], dtype=torch.float32)
    lavi = checkpoint.load(lavi_dirs[kind])
    own = lavi.vision.state_dict()
    assert own and not any("merger" in k for k in own)
    assert all(torch.equal(v, qwen.vision.state_dict()[k]) for k, v in own.items())
    img = [image((24, 16), 7)]
    again = checkpoint.load(lavi_dirs[kind])
    a, b = lavi.encode_frames(img, [("image", (24, 16))]), again.encode_frames(img, [("image", (24, 16))])
    assert all(torch.equal(x, y) for (ka, va), (kb, vb) in zip(a.cond_kv, b.cond_kv) for x, y in ((ka, kb), (va, vb)))


def test_converted_lavi_captions_an_image_in_the_engine(qwen_dirs, lavi_dirs):
    """Engine.load of the converted directory is the LaVi engine with the Qwen's dynamic-resolution contract (what the
    decode workers resize to, as the driver reads it from the config files), and captions images of their own sizes;
    at zero init the caption does not depend on the image."""
    from lavi.families import family_at, LAVI
    from lavi.qwenvl.processor_config import ProcessorConfig
    from lavi.serving.engine import Engine
    from lavi.serving.steps import GenerationConfig

    d = lavi_dirs["qwen2_vl"]
    engine = Engine.load(str(d), max_batch=4)
    assert type(engine) is Engine
    qwen_contract = ProcessorConfig.read("qwen2_vl", lambda f: json.loads((qwen_dirs["qwen2_vl"] / f).read_text())
                                         if (qwen_dirs["qwen2_vl"] / f).exists() else None).contract
    info = family_at(d).describe(json.loads((d / "config.json").read_text()), lambda f: None, "x")
    assert info.family == LAVI and info.dynamic == qwen_contract and engine.dynamic == qwen_contract
    imgs = [image((24, 40), 8), image((56, 16), 9)]
    out = engine.generate(imgs, [(0, PROMPT), (1, PROMPT)], GenerationConfig(max_new_tokens=6),
                          media=[("image", (24, 40)), ("image", (56, 16))])
    assert len(out) == 2 and all(c.num_generated_tokens > 0 for c in out)
    assert out[0].text == out[1].text


def test_convert_command_takes_a_qwen_vl(qwen_dirs, tmp_path):
    """`lavi-label convert QWEN_DIR --out LAVI_DIR` converts through the family registry's CONVERT hook, and the
    result can be converted no further."""
    from click.testing import CliRunner

    from jobs.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(qwen_dirs["qwen2_5_vl"]), "--out", str(tmp_path / "lavi"), "--stages",
                               "2", "--cond-dim", "16", "--cond-heads", "2"])
    assert res.exit_code == 0, res.output
    assert "zero-initialised" in res.output
    config = json.loads((tmp_path / "lavi" / "config.json").read_text())
    assert config["processor"]["model_type"] == "qwen2_5_vl" and config["num_stages"] == 2
    res = runner.invoke(main, ["convert", str(tmp_path / "lavi"), "--out", str(tmp_path / "again")])
    assert res.exit_code == 2 and "Qwen-VL" in res.output


def test_converted_lavi_trains_on_images_and_videos_of_their_own_sizes(lavi_dirs, tmp_path):
    """`lavi.training.train` takes a Qwen-VL tower's LaVi: batches of an image and a video at their own sizes are cut
    into the tower's patches (collate), the conditioner's heads learn (no longer zero: vision now moves the logits),
    and the checkpoint it writes reloads through lavi.families as that LaVi."""
    from lavi.families import load_model
    from lavi.qwenvl.lavi_model import QwenLaVi
    from lavi.training.train import Example, TrainConfig, train

    model = load_model(lavi_dirs["qwen2_vl"])
    clip = np.stack([image((16, 24), s) for s in range(4)])
    examples = [Example(frames=image((24, 40), 1)[None], pairs=((PROMPT, "a red circle"),), media="image"),
                Example(frames=clip, pairs=(("describe the video.", "two blue triangles"),), media="video")]
    summary = train(model, lavi_dirs["qwen2_vl"], lambda step: examples,
                    TrainConfig(steps=3, lr=5e-2, warmup=1, log_every=1, checkpoint_every=3), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "train_state.json").read_text())["step"] == 3 and summary
    trained = load_model(tmp_path / "out")
    assert isinstance(trained, QwenLaVi)
    heads = [p for n, p in trained.viln.named_parameters() if "o_proj" in n]
    assert any(bool(p.abs().sum() > 0) for p in heads)
    ids = torch.tensor([[5, 9, 11, 4, 7]])
    valid = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        a = trained(ids, valid, trained.encode_frames([image((24, 40), 1)], [("image", (24, 40))]))
        b = trained(ids, valid, trained.encode_frames([image((24, 40), 2)], [("image", (24, 40))]))
    assert not torch.allclose(a, b)

