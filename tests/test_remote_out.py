"""`--out` in object storage for `train`, `eval` and `convert` (jobs.outdir), on a real S3 server (SeaweedFS on
loopback); `distill`'s is in test_distill.py."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.outdir import Staged, join, read_json, write_text

CHECKPOINT = {"config.json", "model.safetensors", "tokenizer.json", "train_state.json", "train_state.safetensors"}


def _names(fs, base: str) -> set[str]:
    return {p[len(base) + 1:] for p in fs.find(base)}


def test_join_keeps_local_paths_as_pathlib_spells_them_and_uris_as_uris():
    """Guards against messages and doc fields that changed for a local --out when the commands took URIs ("x//a",
    "./x/a"), and against a URI joined into "s3:/bucket"."""
    assert join("./x/", "a", "b.json") == "x/a/b.json"
    assert join("s3://bucket/x/", "a", "b.json") == "s3://bucket/x/a/b.json"
    assert join("file:///tmp/x", "a") == "file:///tmp/x/a"


def test_staged_uploads_what_changed_marker_last_and_reads_it_back(s3_server, tmp_path, monkeypatch):
    """Guards against a remote out whose marker (train_state.json) lands before the files it stands for, uploads
    that repeat unchanged files at every checkpoint, and a pull that misses what a push wrote."""
    uri = f"s3://{s3_server.bucket}/staged-{tmp_path.name}"
    fs, base = s3_server.fs(), uri[len("s3://"):]
    a = Staged(uri, s3_server.storage_options)
    try:
        (a.dir / "sub").mkdir()
        for name in ("model.bin", "sub/tok.json", "state.json"):
            (a.dir / name).write_text(name)
        uploaded = []
        real = a.fs.put_file
        monkeypatch.setattr(a.fs, "put_file", lambda src, dst, **kw: (uploaded.append(dst.rsplit("/", 1)[1]),
                                                                      real(src, dst, **kw)))
        assert a.push(last=("state.json",)) == 3 and uploaded[-1] == "state.json"
        (a.dir / "state.json").write_text("state.json, step 2")
        assert a.push(last=("state.json",)) == 1  # only what changed
    finally:
        a.close()
    assert not a.dir.exists()
    assert {"model.bin", "sub/tok.json", "state.json"} <= _names(fs, base)
    b = Staged(uri, s3_server.storage_options)
    try:
        assert b.pull(skip=("sub",)) == 2 and (b.dir / "state.json").read_text() == "state.json, step 2"
        assert b.push() == 0  # pulled files are the remote copy
    finally:
        b.close()
    write_text(f"{uri}/doc.json", json.dumps({"a": 1}), s3_server.storage_options)
    assert read_json(f"{uri}/doc.json", s3_server.storage_options) == {"a": 1}
    assert read_json(f"{uri}/none.json", s3_server.storage_options) is None


@pytest.mark.timeout(300)
def test_train_to_s3_uploads_each_checkpoint_and_resumes_from_the_bucket(s3_server, tmp_path, monkeypatch):
    """Guards against `train --out s3://...` failing or leaving nothing in the bucket, against checkpoints uploaded
    only at the end (a run killed after its first checkpoint would leave nothing to resume), and against a rerun
    that starts over because the local temporary directory is gone rather than resuming from the bucket."""
    from lavi.core import checkpoint
    from lavi.training import train as loop

    uri = f"s3://{s3_server.bucket}/train-{tmp_path.name}"
    fs, base = s3_server.fs(), uri[len("s3://"):]
    args = ["train", "--out", uri, "--steps", "4", "--images", "1", "--videos", "1", "--questions", "1",
            "--frames", "2", "--warmup", "1", "--threads", "1", "--checkpoint-every", "2", "--log-every", "2",
            *s3_server.cli_options]
    real = loop.save_state

    def killed_at_step_4(out, model, opt, step, *a, **kw):
        if step == 4:
            raise RuntimeError("killed")
        real(out, model, opt, step, *a, **kw)

    monkeypatch.setattr(loop, "save_state", killed_at_step_4)
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, RuntimeError) and "killed" in str(result.exception), result.output
    assert CHECKPOINT <= _names(fs, base) and "train_summary.json" not in _names(fs, base)
    assert json.loads(fs.cat_file(f"{base}/train_state.json"))["step"] == 2

    monkeypatch.setattr(loop, "save_state", real)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"uploaded to {uri}" in result.output
    fs.invalidate_cache()  # this client listed the out after the first run
    summary = json.loads(fs.cat_file(f"{base}/train_summary.json"))
    assert summary["resumed_from"] == 2 and json.loads(fs.cat_file(f"{base}/train_state.json"))["step"] == 4
    assert [json.loads(line)["step"] for line in fs.cat_file(f"{base}/train_log.jsonl").decode().splitlines()] == [2, 4]
    local = tmp_path / "back"
    local.mkdir()
    for name in CHECKPOINT:
        fs.get_file(f"{base}/{name}", str(local / name))
    assert checkpoint.load(local).config.default_frames == 2


@pytest.mark.timeout(300)
def test_eval_writes_its_figures_to_s3_and_includes_them_from_there(s3_server, tmp_path):
    """Guards against `eval --out s3://...` failing after the scoring (the figures lost), and an --include of
    such an output that cannot be read back."""
    from lavi.bundled import DEFAULT_MODEL

    uri = f"s3://{s3_server.bucket}/eval-{tmp_path.name}/eval.json"
    common = ["eval", "--model", DEFAULT_MODEL, "--videos", "1", "--renderer", "shapes", "--device", "cpu",
              *s3_server.cli_options]
    result = CliRunner().invoke(main, common + ["--images", "2", "--out", uri])
    assert result.exit_code == 0, result.output
    doc = json.loads(s3_server.fs().cat_file(uri[len("s3://"):]))
    assert doc["split"]["images"] == 2 and [r["path"] for r in doc["results"]] == [DEFAULT_MODEL]
    # read back from the bucket: this split differs from that one's, refused before anything is scored
    result = CliRunner().invoke(main, common + ["--images", "3", "--include", uri])
    assert result.exit_code == 2 and "another split" in result.output, result.output
    result = CliRunner().invoke(main, common + ["--images", "3", "--include", uri + ".none"])
    assert result.exit_code == 2 and "does not exist" in result.output, result.output


@pytest.mark.timeout(300)
def test_convert_writes_the_lavi_checkpoint_to_s3(s3_server, tmp_path):
    """Guards against `convert --out s3://...` failing, or uploading a checkpoint that does not load as the LaVi
    it printed."""
    from onevision_fixture import make_onevision

    from lavi.core import checkpoint

    ov = make_onevision(tmp_path / "ov")
    uri = f"s3://{s3_server.bucket}/convert-{tmp_path.name}"
    result = CliRunner().invoke(main, ["convert", str(ov), "--out", uri, "--stages", "2", "--cond-dim", "16",
                                       "--cond-heads", "2", *s3_server.cli_options])
    assert result.exit_code == 0, result.output
    assert f"written to {uri}" in result.output
    fs, base = s3_server.fs(), uri[len("s3://"):]
    names = _names(fs, base)
    assert {"config.json", "model.safetensors", "converted_from.json"} <= names
    local = tmp_path / "back"
    local.mkdir()
    for name in names:
        fs.get_file(f"{base}/{name}", str(local / name))
    model = checkpoint.load(local)
    assert model.config.num_stages == 2 and model.config.cond_dim == 16
