"""Training: a short CPU run learns, checkpoints round-trip, resume continues, Parquet data works."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from jobs.cli import main
from lavi.core import checkpoint
from lavi.training.collate import Example, cells_to_patches, collate
from lavi.training.losses import length_groups, lm_loss, losses
from lavi.core.model import LaVi
from lavi.training.shared_prefix import forward_shared
from lavi.tiny_models import save_word_tokenizer, tiny_config
from lavi.serving.tokenizer import Tokenizer
from lavi.training.train import TrainConfig, init_from_scratch, lr_at, train
from shapes import render, spec
from shapes.batches import GRID_CLASSES, ShapesData, focus_cells, focus_spans, grid_labels
from shapes.corpus import encode_image
from shapes.render import sample_image, sample_video
from shapes.score import parse_caption
from shapes.spec import vocabulary


def _small_shapes(step: int, grid: bool = False, focus: bool = False, questions: int = 1) -> list[Example]:
    """shapes-v1 examples shrunk to the tiny test model's 32 px input (the cell labels stay true)."""
    from PIL import Image
    out = []
    for e in ShapesData(seed=0, images=6, videos=2, questions=questions, augment=False, grid=grid, focus=focus)(step):
        frames = np.stack([np.asarray(Image.fromarray(f).resize((32, 32), Image.BILINEAR)) for f in e.frames])
        out.append(Example(frames, e.pairs, e.grid, e.focus))
    return out


def _with_grid(step: int) -> list[Example]:
    return _small_shapes(step, grid=True)


def test_short_training_lowers_loss_and_round_trips(tmp_path):
    """Guards against a training loop that does not learn (wrong label shift, frozen params, bad LR)
    and against checkpoints that lose what was trained."""
    tok = save_word_tokenizer(vocabulary(), tmp_path / "tok")
    torch.manual_seed(0)
    model = LaVi(tiny_config(tok.get_vocab_size()))
    init_from_scratch(model)
    logs: list[dict] = []
    cfg = TrainConfig(steps=40, lr=3e-3, warmup=5, log_every=5, checkpoint_every=20)
    train(model, tmp_path / "tok", _small_shapes, cfg, tmp_path / "ck", on_log=logs.append)
    assert logs[-1]["loss"] < 0.6 * logs[0]["loss"], logs
    loaded = checkpoint.load(tmp_path / "ck")
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "ck" / "train_state.json").read_text())["step"] == 40


def test_grid_probe_learns_the_cells_and_stays_out_of_the_checkpoint(tmp_path):
    """Guards against the training-only grid probe not training the ViT (loss flat: wrong targets or a hook
    on a layer that never runs) and against its head leaking into the model's checkpoint."""
    tok = save_word_tokenizer(vocabulary(), tmp_path / "tok")
    torch.manual_seed(0)
    model = LaVi(tiny_config(tok.get_vocab_size()))
    init_from_scratch(model)
    logs: list[dict] = []
    cfg = TrainConfig(steps=40, lr=3e-3, warmup=5, log_every=1, checkpoint_every=40, grid_weight=1.0,
                      grid_classes=GRID_CLASSES)
    train(model, tmp_path / "tok", _with_grid, cfg, tmp_path / "ck", on_log=logs.append)
    assert logs[-1]["grid_loss"] < 0.7 * logs[0]["grid_loss"], logs
    assert set(checkpoint.load(tmp_path / "ck").state_dict()) == set(model.state_dict())
    assert not model.vision.encoder.layers[-1]._forward_hooks  # the hook is gone after training


def test_vision_phase_trains_the_vit_alone_then_the_main_phase_trains_all(tmp_path):
    """Guards against a vision phase that moves the decoder or the fusion (its loss must reach the ViT only),
    that does not train the ViT, or a main phase that does not take over after it (with its own warmup)."""
    tok = save_word_tokenizer(vocabulary(), tmp_path / "tok")
    torch.manual_seed(0)
    model = LaVi(tiny_config(tok.get_vocab_size()))
    init_from_scratch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs: list[dict] = []
    snapshots: dict[int, dict] = {}

    def on_log(rec: dict) -> None:
        logs.append(rec)
        snapshots[rec["step"]] = {k: v.clone() for k, v in model.state_dict().items()}

    cfg = TrainConfig(steps=30, vision_steps=20, lr=3e-3, warmup=5, log_every=1, checkpoint_every=30,
                      grid_weight=1.0, grid_classes=GRID_CLASSES)
    assert lr_at(0, cfg) == lr_at(20, cfg) == 3e-3 / 5 and lr_at(19, cfg) < lr_at(24, cfg) == 3e-3
    seen: list[int] = []
    train(model, tmp_path / "tok", _with_grid, cfg, tmp_path / "ck", on_log=on_log,
          vision_data=lambda step: seen.append(step) or _with_grid(step))
    assert seen == list(range(20))
    mid = snapshots[20]  # the end of the vision phase
    moved = {k for k in before if not torch.equal(before[k], mid[k])}
    assert moved and all(k.startswith("vision.") for k in moved), sorted(moved)
    assert [r["phase"] for r in logs] == ["vision"] * 20 + ["main"] * 10
    assert logs[19]["grid_loss"] < 0.7 * logs[0]["grid_loss"] and "loss" not in logs[0]
    after = model.state_dict()
    assert not torch.equal(after["decoder.embed_tokens.weight"], mid["decoder.embed_tokens.weight"])
    with pytest.raises(ValueError, match="grid_weight"):
        TrainConfig(steps=30, vision_steps=10)


def test_grid_labels_follow_the_objects():
    """Guards against cell labels that disagree with the truth (wrong cell, wrong class index, a frame's
    labels taken from the first frame): every object is in its cell, every other cell is empty."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        item = sample_image(rng)
        g = grid_labels(item.placed, [0])[0]
        want = {cell: (1 + list(spec.COLOURS).index(c), 1 + spec.SHAPES.index(s), 1 + list(spec.SIZES).index(z))
                for c, s, z, cell in item.objects}
        assert {i: tuple(g[i]) for i in range(9) if g[i, 0] != 0} == want
    rng = np.random.default_rng(6)
    edges = [round(k * spec.CELL_SIDE) for k in range(4)]  # pixel centres of cell k: [edges[k], edges[k + 1])
    straddled = 0
    for _ in range(30):  # moving objects: every cell that shows part of one is labelled with it, or ignored
        video = sample_video(rng, ramp=0.0, draw=[0, 7, 15])  # hard edges: an object's pixels are its colour
        g = grid_labels(video.placed, [0, 7, 15])
        for j, frame in enumerate(video.frames):
            for cell in range(9):
                r, c = divmod(cell, 3)
                px = frame[edges[r]:edges[r + 1], edges[c]:edges[c + 1]].reshape(-1, 3)
                shown = [p for p in video.placed if (px == p.rgb).all(1).any()]
                label = tuple(g[j, cell])
                if label[0] == 0:
                    assert not shown, (cell, j)
                elif label[0] > 0:
                    assert len(shown) == 1 and label == (1 + list(spec.COLOURS).index(shown[0].colour),
                                                         1 + spec.SHAPES.index(shown[0].shape),
                                                         1 + list(spec.SIZES).index(shown[0].size)), (cell, j)
            straddled += sum((g[j, :, 0] > 0).sum() > len(video.placed) for j in range(3))
    assert straddled > 5  # objects over cell borders were labelled in more than one cell


@pytest.mark.parametrize("grid,vision", [(0.0, 0), (1.0, 0), (1.0, 2)])
def test_resume_continues_from_the_checkpoint(tmp_path, grid, vision):
    """Guards against a resume that restarts from step 0 or drops the optimizer state (or the grid probe's
    weights, or the phase it was in): 3 steps + 3 resumed steps must equal 6 steps in one go."""
    tok_dir = tmp_path / "tok"
    save_word_tokenizer(vocabulary(), tok_dir)

    def fresh() -> LaVi:
        torch.manual_seed(0)
        m = LaVi(tiny_config(len(vocabulary()) + 4))
        init_from_scratch(m)
        return m

    cfg = TrainConfig(steps=6, lr=2e-3, warmup=2, checkpoint_every=3, log_every=3, grid_weight=grid,
                      grid_classes=GRID_CLASSES, vision_steps=vision)
    data = _with_grid if grid else _small_shapes
    whole = fresh()
    train(whole, tok_dir, data, cfg, tmp_path / "whole", vision_data=_with_grid)
    half = fresh()
    train(half, tok_dir, data, TrainConfig(**{**cfg.__dict__, "steps": 3}), tmp_path / "split", vision_data=_with_grid)
    first = json.loads((tmp_path / "split" / "train_state.json").read_text())["wall_s"]
    resumed = checkpoint.load(tmp_path / "split").train()
    train(resumed, tok_dir, data, cfg, tmp_path / "split", resume=True, vision_data=_with_grid)
    a, b = whole.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    total = json.loads((tmp_path / "split" / "train_state.json").read_text())["wall_s"]
    assert 0 < first < total  # the training time of both sessions, not only the last one's


def test_train_command_on_a_parquet_of_targets(tmp_path):
    """Guards against the Parquet data path (uri or bytes, prompt, target) being broken or unreadable."""
    rng = np.random.default_rng(0)
    uris, blobs = [], []
    for i in range(4):
        item = sample_image(rng)
        data, ext = encode_image(item.pixels, rng)
        path = tmp_path / f"img{i}.{ext}"
        path.write_bytes(data)
        uris.append(str(path))
        blobs.append(data)
    table = pa.table({"uri": uris + [None] * 4, "bytes": [None] * 4 + blobs,
                      "prompt": ["describe the image."] * 8, "target": ["a small red circle in the center."] * 8})
    pq.write_table(table, tmp_path / "train.parquet")
    out = tmp_path / "ck"
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--data", str(tmp_path / "train.parquet"),
                                       "--steps", "2", "--batch-items", "4", "--warmup", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists() and "step 2/2" in result.output


def test_train_command_on_shapes_with_a_vision_phase_and_frame_counts(tmp_path):
    """Guards against the shapes path of `lavi-label train` (vision phase, focus, frames per clip) being broken,
    a model whose default and max frames are not those it was trained on, and bad flags reaching training."""
    out = tmp_path / "ck"
    args = ["train", "--out", str(out), "--steps", "3", "--vision-steps", "2", "--grid-probe", "1", "--focus", "1",
            "--images", "2", "--videos", "1", "--questions", "1", "--vision-images", "2", "--vision-videos", "1",
            "--frames", "3,2", "--warmup", "1", "--threads", "1", "--checkpoint-every", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "step 2/3 vision" in result.output.replace("  ", " ") and "step 3/3 main" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["default_frames"] == 3 and config["max_frames"] == 3
    assert [r["phase"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())][-1] == "main"
    for bad, message in ((["--frames", "x"], "--frames"), (["--grid-probe", "0"], "--vision-steps")):
        result = CliRunner().invoke(main, args[:-4] + ["--no-resume", "--out", str(tmp_path / "bad")] + bad)
        assert result.exit_code == 2 and message in result.output, result.output


def test_resumed_train_command_keeps_one_log_record_per_step_and_sums_its_sessions(tmp_path):
    """Guards against a resumed run's log holding the redone steps twice (records written after the last
    checkpoint of a killed session) and its summary giving only the last session's time."""
    out = tmp_path / "ck"
    args = ["train", "--out", str(out), "--images", "1", "--videos", "1", "--questions", "1", "--frames", "2",
            "--warmup", "1", "--threads", "1", "--checkpoint-every", "2"]
    assert CliRunner().invoke(main, args + ["--steps", "2"]).exit_code == 0
    first = json.loads((out / "train_summary.json").read_text())["wall_s"]
    with (out / "train_log.jsonl").open("a") as f:  # what a session killed after step 3 would have left
        f.write(json.dumps({"step": 3, "phase": "main", "loss": 9.0}) + "\n")
    result = CliRunner().invoke(main, args + ["--steps", "4"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["wall_s"] > first and summary["wall_s"] > summary["session_wall_s"]


def test_train_command_fine_tunes_from_a_checkpoint(tmp_path):
    """Guards against --init losing the checkpoint it starts from (weights, tokenizer, its frames per clip) or
    training a model of another fusion than the one asked for."""
    ck, tuned = tmp_path / "ck", tmp_path / "tuned"
    base = ["train", "--images", "1", "--videos", "1", "--questions", "1", "--warmup", "1", "--threads", "1"]
    result = CliRunner().invoke(main, base + ["--out", str(ck), "--steps", "2", "--frames", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, base + ["--out", str(tuned), "--init", str(ck), "--steps", "1", "--lr", "1e-9",
                                              "--frames", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tuned / "config.json").read_text()) == json.loads((ck / "config.json").read_text())
    assert (tuned / "tokenizer.json").read_text() == (ck / "tokenizer.json").read_text()
    a, b = checkpoint.load(ck).state_dict(), checkpoint.load(tuned).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # started from ck: one step at lr 1e-9 moves nothing
    assert json.loads((tuned / "train_state.json").read_text())["step"] == 1
    result = CliRunner().invoke(main, base + ["--out", str(tmp_path / "x"), "--init", str(ck), "--fusion", "llava-ov"])
    assert result.exit_code == 2 and "--fusion viln" in result.output, result.output


def test_train_command_puts_a_new_fusion_on_a_lavis_backbones(tmp_path):
    """Guards against `--init LAVI --fusion vlora --freeze-backbones` (VLoRA on a trained LaVi's decoder and ViT)
    training anything but the new generator, or losing the LaVi's tokenizer and frames per clip."""
    ck, vl = tmp_path / "ck", tmp_path / "vl"
    base = ["train", "--images", "1", "--videos", "1", "--questions", "1", "--warmup", "1", "--threads", "1"]
    assert CliRunner().invoke(main, base + ["--out", str(ck), "--steps", "2", "--frames", "2"]).exit_code == 0
    result = CliRunner().invoke(main, base + ["--out", str(vl), "--init", str(ck), "--fusion", "vlora",
                                              "--freeze-backbones", "--steps", "2", "--lr", "1e-2", "--frames", "2"])
    assert result.exit_code == 0, result.output
    a, b = checkpoint.load(ck), checkpoint.load(vl)
    assert b.config.fusion == "vlora" and b.config.default_frames == a.config.default_frames == 2
    assert (vl / "tokenizer.json").read_text() == (ck / "tokenizer.json").read_text()
    sa, sb = a.state_dict(), b.state_dict()
    backbone = [k for k in sa if k.startswith(("decoder.", "vision."))]
    assert backbone and all(torch.equal(sa[k], sb[k]) for k in backbone)  # frozen: bit for bit the LaVi's
    assert any(v.abs().sum() > 0 for k, v in sb.items() if k.startswith("vlora.B."))  # the generator trained


def test_eval_command_scores_models_on_both_renderers_and_writes_the_card(tmp_path):
    """Guards `lavi-label eval` (the model card's figures): a split from each renderer, every model on each,
    the JSON, and the card's section replaced in place (a rerun leaves one copy, the prose around it kept)."""
    ck = tmp_path / "ck"
    train_args = ["train", "--out", str(ck), "--steps", "2", "--images", "2", "--videos", "1", "--questions", "1",
                  "--frames", "2", "--warmup", "1", "--threads", "1", "--checkpoint-every", "2"]
    assert CliRunner().invoke(main, train_args).exit_code == 0
    card = tmp_path / "CARD.md"
    card.write_text("# card\nprose before\n<!-- eval:begin -->\nold figures\n<!-- eval:end -->\nprose after\n")
    args = ["eval", "--model", str(ck), "--model", str(ck), "--images", "3", "--videos", "2", "--device", "cpu",
            "--out", str(tmp_path / "eval.json"), "--card", str(card)]
    for _ in range(2):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert [(r["renderer"], r["path"]) for r in doc["results"]] == [(x, str(ck)) for x in ("shapes", "shapes", "pil", "pil")]
    for r in doc["results"]:
        f = r["figures"]
        assert all(0 <= f[k] <= 1 for k in ("image_caption_f1", "video_caption_f1", "image_vqa_acc", "video_vqa_acc"))
        assert r["rows"] >= 2 * 5  # per item: its caption and at least one question
    text = card.read_text()
    assert text.count("<!-- eval:begin -->") == 1 and "old figures" not in text
    assert "prose before" in text and "prose after" in text and "independent implementation" in text
    assert text.count("| image caption object F1 | >= 0.95 |") == 2 and "trained 2 steps" in text
    # a model scored earlier joins the card without being scored again; another split is refused
    result = CliRunner().invoke(main, ["eval", "--model", str(ck), "--images", "3", "--videos", "2", "--device", "cpu",
                                       "--renderer", "shapes", "--include", str(tmp_path / "eval.json"),
                                       "--card", str(card), "--out", str(tmp_path / "both.json")])
    assert result.exit_code == 0, result.output
    both = json.loads((tmp_path / "both.json").read_text())["results"]
    assert [r["renderer"] for r in both] == ["pil", "pil", "shapes"]  # scored again on shapes: this run's result only
    # an include of an output that itself included the first: the first's results and command come once
    result = CliRunner().invoke(main, ["eval", "--model", str(ck), "--images", "3", "--videos", "2", "--device", "cpu",
                                       "--renderer", "pil", "--include", str(tmp_path / "eval.json"),
                                       "--include", str(tmp_path / "both.json"), "--out", str(tmp_path / "all.json")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "all.json").read_text())
    assert [r["renderer"] for r in doc["results"]] == ["shapes", "shapes", "shapes", "pil"]
    # (the CliRunner's commands are all this pytest's argv: the commands are checked on records of their own)
    from jobs.evaluate import merge_included

    a = {"results": [{"model": "a", "renderer": "shapes"}], "command": "lavi-label eval A"}
    b = {"results": a["results"] + [{"model": "b", "renderer": "shapes"}], "command": a["command"] + "; lavi-label eval B"}
    results, command = merge_included([a, b], [{"model": "c", "renderer": "shapes"}], "lavi-label eval C")
    assert [r["model"] for r in results] == ["a", "b", "c"]
    assert command == "lavi-label eval A; lavi-label eval B; lavi-label eval C"
    results, _ = merge_included([b], [{"model": "a", "renderer": "shapes", "f1": 1.0}], "lavi-label eval A again")
    assert results == [{"model": "b", "renderer": "shapes"}, {"model": "a", "renderer": "shapes", "f1": 1.0}], \
        "a model scored again is shown twice"
    result = CliRunner().invoke(main, ["eval", "--model", str(ck), "--images", "4", "--videos", "2",
                                       "--include", str(tmp_path / "eval.json")])
    assert result.exit_code == 2 and "another split" in result.output


def test_row_mean_loss_weighs_each_row_equally(tmp_path):
    """Guards against --loss-per row averaging over tokens after all (a long caption then outweighs a
    one-word answer): the loss equals the mean over rows of each row's mean token loss."""
    tok = save_word_tokenizer(vocabulary(), tmp_path / "tok")
    torch.manual_seed(0)
    model = LaVi(tiny_config(tok.get_vocab_size()))
    frames = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    example = Example(frames, (("describe the image.", "a small red circle at the top left."),
                               ("how many objects are there?", "one")))
    batch = collate([example], model, Tokenizer(tmp_path / "tok"))
    per_row = [lm_loss(model, dataclasses.replace(batch, rows=batch.rows[i:i + 1], ids=batch.ids[i:i + 1],
                                                  valid=batch.valid[i:i + 1], labels=batch.labels[i:i + 1]))
               for i in range(2)]
    torch.testing.assert_close(lm_loss(model, batch, row_mean=True), (per_row[0] + per_row[1]) / 2)
    by_token = lm_loss(model, batch)
    assert not torch.allclose(by_token, (per_row[0] + per_row[1]) / 2)  # the two weightings differ here


@pytest.mark.parametrize("fusion", ["viln", "concat", "vlora"])
@pytest.mark.parametrize("row_mean", [False, True])
def test_length_groups_leave_the_loss_unchanged(tmp_path, fusion, row_mean):
    """Guards against length grouping changing what is trained (a row lost, mis-weighted or given another
    item's frames): rows run in two length groups (short answers apart from long captions), and the loss
    must equal one forward over the whole batch padded to its longest row."""
    tok = save_word_tokenizer(vocabulary(), tmp_path / "tok")
    torch.manual_seed(0)
    model = LaVi(tiny_config(tok.get_vocab_size(), fusion))
    if model.viln is not None:  # non-zero outputs, so the image matters
        for head in model.viln.heads.values():
            torch.nn.init.normal_(head.o_proj.weight, std=0.05)
    if model.vlora is not None:
        for b in model.vlora.B.values():
            torch.nn.init.normal_(b, std=0.05)
    batch = collate(_small_shapes(0) + _small_shapes(1), model, Tokenizer(tmp_path / "tok"))
    assert len(length_groups(batch.valid.sum(1))) == 2  # the split actually happens on this batch
    vis = model.encode(batch.pixels, batch.frame_mask)
    logits = forward_shared(model, batch.ids, batch.valid, vis, batch.rows)
    tok_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none")
    scored = (batch.labels != -100).sum(1)
    ref = (tok_loss.sum(1) / scored).mean() if row_mean else tok_loss.sum() / scored.sum()
    torch.testing.assert_close(lm_loss(model, batch, row_mean), ref)


def test_focus_cells_name_the_object_each_question_asks_about():
    """Guards against focus targets on the wrong object or cell (the loss would then teach the head to look
    away from what the question names), counts that miss objects, and targets for absent objects."""
    rng = np.random.default_rng(3)
    for item in [sample_image(rng) for _ in range(30)] + [sample_video(rng) for _ in range(10)]:
        idx = [0] if len(item.placed[0].centres) == 1 else [0, 5, 10, 15]
        for q, a in item.qa:
            cells = focus_cells(q, item.placed, idx)
            if a in ("no", "zero"):
                assert cells is None, q
                continue
            assert cells is not None and cells.shape == (len(idx), 9), q
            if "many" in q:
                if len(idx) == 1:  # image objects have cells of their own
                    assert cells[0].sum() == spec.NUMBER_WORDS.index(a), q
                continue
            assert (cells.sum(1) >= 1).all() and (len(idx) > 1 or cells.sum() == 1), q
            named = [p for p in item.placed if p.colour in q.split() or p.shape in q.rstrip("?").split()]
            target = [p for p in named if all(w in (p.colour, p.shape) for w in q.rstrip("?").split()
                                              if w in spec.COLOURS or w in spec.SHAPES)]
            assert len(target) == 1, q
            assert all(cells[j, render.cell_of(*target[0].centres[i])] for j, i in enumerate(idx)), q
            if q.startswith("where"):
                assert spec.CELL_ANSWER[int(cells[0].argmax())] == a


def test_caption_focus_spans_cover_each_object_phrase_with_its_cells():
    """Guards against caption focus targets that pair a phrase with another object's cells (the head would
    learn to look at the wrong object while the words are written) or spans that cut phrases."""
    rng = np.random.default_rng(4)
    for item in [sample_image(rng) for _ in range(30)] + [sample_video(rng) for _ in range(10)]:
        video = len(item.placed[0].centres) > 1
        idx = [0, 5, 10, 15] if video else [0]
        spans = focus_spans(spec.VIDEO_PROMPT if video else spec.IMAGE_PROMPT, item.caption, item.placed, idx)
        assert len(spans) == len(item.placed)
        truth = parse_caption(item.caption, "video" if video else "image")
        for (start, end, cells), p, obj in zip(spans, item.placed, truth):
            assert parse_caption(item.caption[start:end], "video" if video else "image") == [obj]
            assert obj[:3] == (p.size, p.colour, p.shape)
            assert all(cells[j, render.cell_of(*p.centres[i])] for j, i in enumerate(idx))
            assert video or cells.sum() == 1
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_collate_marks_the_positions_that_predict_each_span(tmp_path):
    """Guards against focus targets off by one position (on the token itself rather than the position that
    predicts it) or on prompt, punctuation and EOS positions."""
    tok_dir = tmp_path / "tok"
    save_word_tokenizer(vocabulary(), tok_dir)
    tok = Tokenizer(tok_dir)
    model = LaVi(tiny_config(tok.tok.get_vocab_size()))
    examples = _small_shapes(0, focus=True, questions=3)
    batch = collate(examples, model, tok)
    words = [[tok.tok.id_to_token(int(i)) for i in row] for row in batch.ids]
    r = 0
    for e in examples:
        for (prompt, target), spans in zip(e.pairs, e.focus):
            marked = [words[r][j + 1] for j in range(batch.ids.shape[1] - 1) if batch.focus[r, j].any()]
            assert marked == [w for a, b, _ in spans for w in spec.tokenize_words(target[a:b])], (prompt, target)
            r += 1


@pytest.mark.parametrize("fusion", ["viln", "concat"])
def test_focus_loss_teaches_head_0_to_find_the_named_object(tmp_path, fusion):
    """Guards against a focus loss that is recorded on the wrong positions or tokens (it would not fall),
    that changes the model's outputs, or that leaves recording switched on after a step."""
    tok = save_word_tokenizer(vocabulary(), tmp_path / "tok")
    torch.manual_seed(0)
    model = LaVi(tiny_config(tok.get_vocab_size(), fusion))
    init_from_scratch(model)
    data = lambda step: _small_shapes(step, grid=True, focus=True, questions=4)  # noqa: E731
    batch = collate(data(0), model, Tokenizer(tmp_path / "tok"))
    assert batch.focus is not None and batch.focus.any(-1).any(-1).sum() >= 8
    plain, _ = losses(model, batch, row_mean=True)
    with_focus, foc = losses(model, batch, row_mean=True, focus=True)
    torch.testing.assert_close(plain, with_focus)
    assert foc is not None and foc > 0
    logs: list[dict] = []
    cfg = TrainConfig(steps=40, lr=3e-3, warmup=5, log_every=1, checkpoint_every=40, focus_weight=1.0, row_mean=True)
    train(model, tmp_path / "tok", data, cfg, tmp_path / "ck", on_log=logs.append)
    first, last = np.mean([r["focus_loss"] for r in logs[:5]]), np.mean([r["focus_loss"] for r in logs[-5:]])
    assert last < 0.7 * first, (first, last)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the recording hooks are gone after each step


def test_cells_to_patches_maps_each_patch_to_the_cell_of_its_centre():
    """Guards against focus targets on the wrong visual tokens (a transposed or off-by-one cell-to-patch map)."""
    cells = np.zeros((1, 9), dtype=bool)
    cells[0, 4] = True  # the centre cell
    assert cells_to_patches(cells, 3).reshape(3, 3).tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    four = cells_to_patches(cells, 4).reshape(4, 4)  # 32 px in 8 px patches: centres 4, 12, 20, 28 -> cells 0, 1, 1, 2
    assert four.tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
