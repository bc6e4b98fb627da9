"""`lavi-label distill` with a Qwen-VL teacher and its `convert`ed LaVi student, end to end on tiny models: a teacher
whose rows end (tests.qwenvl_fixture.make_fixed_answer_qwenvl: one fixed word, then EOS, whatever the image), checked
against transformers' generate and our engine, then the whole loop on a local Ray."""
from __future__ import annotations

import json

import pytest
import torch

from tests.qwenvl_fixture import image, make_fixed_answer_qwenvl, reference_ids, reference_pixels

transformers = pytest.importorskip("transformers")
ANSWER = "square"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_fixed_answer_qwenvl(tmp_path_factory.mktemp("teacher") / "qwen", "qwen2_vl", answer=ANSWER, seed=3)


def test_fixed_answer_teacher_answers_its_word_then_eos(teacher):
    """Guards against a test teacher that does not end its rows (a random tiny Qwen never emits EOS, so every label is
    truncated and distill has nothing to train on) or whose answer depends on the image or prompt: transformers'
    generate and our Qwen-VL engine both answer the word, then EOS, for images of other sizes and other prompts."""
    from lavi.qwenvl.engine import QwenVLEngine
    from lavi.serving.steps import GenerationConfig

    tok = transformers.AutoTokenizer.from_pretrained(teacher)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(teacher, dtype=torch.float32).eval()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    cases = [((24, 40), 0, "describe the image."), ((56, 48), 1, "how many shapes are there?")]
    for size, seed, prompt in cases:
        pixels, grid = reference_pixels(teacher, image(size, seed))
        ids = reference_ids(teacher, "image", grid[0].tolist(), prompt=prompt)
        out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          pixel_values=pixels, image_grid_thw=grid, max_new_tokens=8, do_sample=False)
        new = out[0, len(ids):].tolist()
        assert new[-1] == eos and tok.decode(new[:-1]) == ANSWER, tok.decode(new)
    engine = QwenVLEngine.load(str(teacher), max_batch=4)
    imgs = [image(size, seed) for size, seed, _ in cases]
    got = engine.generate(imgs, [(i, p) for i, (_, _, p) in enumerate(cases)], GenerationConfig(max_new_tokens=8),
                          media=[("image", im.shape[:2]) for im in imgs])
    assert [(c.text.strip(), c.finished) for c in got] == [(ANSWER, True)] * 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_distill_from_a_qwen_teacher_to_its_converted_student(ray_local, teacher, tmp_path):
    """Guards against `distill --teacher QWEN_DIR --student LAVI_DIR` being broken at any stage for the Qwen-VL family:
    the Qwen labelling the sample through the pipeline (its rows ok), the converted LaVi not training on those rows
    (frames at the Qwen's dynamic resolution), the held-out part not labelled by both and scored, the figures not
    written. At lr 1e-9 the student is the zero-initialised LaVi, i.e. the Qwen's decoder on the text alone, which
    answers the same word: it agrees with the teacher on every held-out row."""
    from click.testing import CliRunner

    from jobs.cli import main
    from jobs.distill_score import output_rows
    from shapes.corpus import write_corpus

    tasks = ("caption", "vqa")
    manifest = write_corpus(str(tmp_path / "corpus"), 6, 0, seed=5)
    student = tmp_path / "student-init"
    res = CliRunner().invoke(main, ["convert", str(teacher), "--out", str(student), "--stages", "2",
                                    "--cond-dim", "16", "--cond-heads", "2"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "distill"
    args = ["distill", manifest, "--teacher", str(teacher), "--student", str(student), "--out", str(out),
            "--sample", "6", "--held-out", "0.34", *[f for t in tasks for f in ("--task", t)], "--steps", "2",
            "--lr", "1e-9", "--warmup", "1", "--batch-items", "4", "--threads", "1", "--timing-items", "2",
            "--device", "cpu", "--max-new-tokens", "8", "--card", str(tmp_path / "CARD.md")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "distill.json").read_text())
    n_train, n_held = doc["sample"]["train"], doc["sample"]["held_out"]
    assert n_train + n_held == 6 and n_train and n_held
    teacher_train = [r for t in tasks for r in output_rows(str(out / "teacher" / "train" / t))]
    assert len({r["item_id"] for r in teacher_train}) == n_train
    assert all(r["status"] == "ok" and r["text"].strip() == ANSWER for r in teacher_train)
    data = json.loads((out / "student" / "train_summary.json").read_text())["data"]
    assert data["format"] == "pipeline output" and data["targets"] == len(teacher_train)
    assert json.loads((out / "student" / "train_state.json").read_text())["step"] == 2
    student_rows = output_rows(str(out / "student_labels" / "held_out" / "caption"))
    assert len(student_rows) == n_held and all(r["status"] == "ok" for r in student_rows)
    caption, vqa = doc["agreement"]["caption"], doc["agreement"]["vqa"]
    assert caption["rows"] == n_held and caption["exact_match"] == 1.0  # lr 1e-9: the Qwen's decoder, same word
    assert vqa["rows"] > n_held and vqa["exact_match"] == 1.0  # every item's questions
    assert doc["training"]["data"]["targets"] == len(teacher_train) and "ground_truth" in doc
    assert doc["speed"]["teacher"]["captions"] == min(2, n_held) and doc["speed"]["student"]["captions_per_s"] > 0
    card = (tmp_path / "CARD.md").read_text()
    assert "<!-- distill:begin -->" in card and "captions/s" in card
