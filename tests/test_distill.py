"""`lavi-label distill`: the sample and its split, agreement, and the whole loop on a local Ray (teacher labels,
student training on them, student labels, distill.json), resumed."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.distill import sample_entries
from jobs.distill_score import agreement, output_rows, token_f1
from lavi.bundled import DEFAULT_MODEL


def _entries(n: int, start: int = 0) -> list[dict]:
    return [{"uri": f"file:///corpus/{i:05d}.png"} for i in range(start, start + n)]


def test_the_sample_is_deterministic_and_an_items_part_depends_on_it_alone():
    """Guards against a sample that changes between reruns (a resumed distillation would label other items) and a
    split that moves an item between train and held-out when the corpus grows (the student would be scored on
    items it learnt)."""
    a = sample_entries(iter(_entries(200)), 200, 0.2, seed=0)
    assert a == sample_entries(iter(_entries(200)), 200, 0.2, seed=0)
    assert 20 < len(a["held_out"]) < 60 and len(a["train"]) + len(a["held_out"]) == 200
    grown = sample_entries(iter(_entries(400)), 400, 0.2, seed=0)
    part = {e["uri"]: p for p, es in grown.items() for e in es}
    assert all(part[e["uri"]] == p for p, es in a.items() for e in es)
    small = sample_entries(iter(_entries(50)), 10, 0.2, seed=0)
    assert len(small["train"]) + len(small["held_out"]) == 10
    assert {e["uri"] for es in small.values() for e in es} != {e["uri"] for es in sample_entries(
        iter(_entries(50)), 10, 0.2, seed=1).values() for e in es}
    two = sample_entries(iter(_entries(2)), 2, 0.01, seed=0)
    assert len(two["train"]) == len(two["held_out"]) == 1


def test_agreement_joins_rows_by_item_clip_task_and_prompt():
    """Guards against agreement that pairs a teacher row with another row of the student, or scores a student error
    as agreeing."""
    def row(item, prompt, text, status="ok", task="vqa"):
        return {"item_id": item, "clip_index": None, "task": task, "prompt": prompt, "text": text, "status": status}

    teacher = [row("a", "q1", "red."), row("a", "q2", "two."), row("b", "q1", "blue."), row("c", "q1", None, "error")]
    student = [row("a", "q2", "two."), row("a", "q1", "red square."), row("b", "q1", None, "error")]
    got = agreement(teacher, student)["vqa"]
    assert got["rows"] == 3 and got["exact_match"] == pytest.approx(1 / 3)
    assert got["token_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert got["teacher_errors"] == 1 and got["student_errors"] == 1
    assert token_f1("A red circle.", "a red circle") == 1.0 and token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


@pytest.mark.timeout(900)
def test_distill_labels_trains_scores_and_resumes(ray_local, tmp_path):
    """Guards against the distillation loop being broken at any stage (the teacher's labels not reaching the
    student's training, the held-out part not labelled by both, the figures not written) and against a rerun
    redoing finished stages or silently mixing in other settings."""
    from shapes.corpus import write_corpus

    manifest = write_corpus(str(tmp_path / "corpus"), 8, 0, seed=5)
    student = tmp_path / "student-init"
    shutil.copytree(DEFAULT_MODEL, student)
    out = tmp_path / "distill"
    args = ["distill", manifest, "--teacher", DEFAULT_MODEL, "--student", str(student), "--out", str(out),
            "--sample", "6", "--held-out", "0.34", "--task", "caption", "--task", "vqa", "--steps", "2",
            "--lr", "1e-9", "--warmup", "1", "--batch-items", "4", "--threads", "1", "--timing-items", "2",
            "--device", "cpu", "--card", str(tmp_path / "CARD.md")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "distill.json").read_text())
    n_train, n_held = doc["sample"]["train"], doc["sample"]["held_out"]
    assert n_train + n_held == 6 and n_train and n_held
    teacher_train = [r for t in ("caption", "vqa") for r in output_rows(str(out / "teacher" / "train" / t))]
    teacher_ok = sum(r["status"] == "ok" for r in teacher_train)
    assert {r["item_id"] for r in teacher_train} and teacher_ok > 0
    data = json.loads((out / "student" / "train_summary.json").read_text())["data"]
    assert data["format"] == "pipeline output" and data["targets"] == teacher_ok
    caption = doc["agreement"]["caption"]
    assert caption["rows"] == n_held and caption["exact_match"] >= 0.8  # lr 1e-9: the student is the teacher
    assert doc["agreement"]["vqa"]["rows"] > n_held  # every item's questions
    gt = doc["ground_truth"]
    assert gt["teacher"]["image_caption_f1"] is not None and gt["ratio"]["image_caption_f1"] > 0.8
    assert doc["speed"]["teacher"]["captions"] == min(2, n_held) and doc["speed"]["student"]["captions_per_s"] > 0
    card = (tmp_path / "CARD.md").read_text()
    assert "<!-- distill:begin -->" in card and "captions/s" in card

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("complete (skipped)") == 6 and "is trained" in again.output
    other = CliRunner().invoke(main, args[:-2] + ["--sample", "5"])
    assert other.exit_code == 2 and "other settings" in other.output


@pytest.mark.timeout(900)
def test_distill_to_object_storage_writes_every_stage_there_and_resumes(ray_local, s3_server, tmp_path, monkeypatch):
    """Guards against `distill --out s3://...` failing at any stage (a work file written with open(), the student's
    checkpoint left on local disk, a finished stage's check that reads a local path) and against a rerun that redoes
    the stages it finds complete in the bucket."""
    from shapes.corpus import write_corpus

    # The student's training data, the teacher's labels in the bucket, is read by workers.train_data.TrainData, which
    # jobs.train_run.prepare builds without storage options: until it passes them, this driver reaches the bucket
    # through the environment (the pipeline's Ray workers, started before, through --storage-option alone).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    manifest = write_corpus(str(tmp_path / "corpus"), 6, 0, seed=5)
    student = tmp_path / "student-init"
    shutil.copytree(DEFAULT_MODEL, student)
    uri = f"s3://{s3_server.bucket}/distill-{tmp_path.name}"
    args = ["distill", manifest, "--teacher", DEFAULT_MODEL, "--student", str(student), "--out", uri,
            "--sample", "4", "--held-out", "0.5", "--steps", "2", "--lr", "1e-9", "--warmup", "1", "--batch-items", "2",
            "--threads", "1", "--timing-items", "1", "--device", "cpu", *s3_server.cli_options]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    fs, base = s3_server.fs(), uri[len("s3://"):]
    names = {p[len(base) + 1:] for p in fs.find(base)}
    assert {"distill.json", "distill_settings.json", "sample/train.jsonl", "sample/held_out.jsonl",
            "student/config.json", "student/model.safetensors", "student/train_state.json",
            "student/train_summary.json", "teacher/train/caption/_summary.json",
            "teacher/held_out/caption/_summary.json", "student_labels/held_out/caption/_summary.json"} <= names, names
    doc = json.loads(fs.cat_file(f"{base}/distill.json"))
    assert doc["student"] == f"{uri}/student" and f"distill.json: {uri}/distill.json" in result.output
    caption = doc["agreement"]["caption"]
    assert caption["rows"] == doc["sample"]["held_out"] and caption["exact_match"] >= 0.5  # lr 1e-9: the teacher
    assert doc["training"]["data"]["targets"] > 0

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("complete (skipped)") == 3 and "is trained" in again.output
