"""S3 input, model and output on a real S3 server on loopback (SeaweedFS, moto as fallback)."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig
from pipeline.storage_options import parse_storage_options
from pipeline.driver import run
from pipeline.output import Output
from pipeline.sink import ParquetSink
from pipeline.sources import PromptSpec, iter_items
from schemas.rows import LABEL_SCHEMA
from shapes.corpus import write_corpus
from workers.model_cache import local_model_dir

pytestmark = pytest.mark.timeout(300)


def test_server_enforces_credentials(s3_server):
    """Guards against a fixture whose S3 accepts anything: tests would not notice credentials that
    never reach the workers."""
    import s3fs

    fs = s3_server.fs()
    fs.pipe_file(f"{s3_server.bucket}/probe/x.txt", b"hi")
    assert fs.cat_file(f"{s3_server.bucket}/probe/x.txt") == b"hi"
    if s3_server.kind == "seaweedfs":
        wrong = s3fs.S3FileSystem(key=s3_server.key, secret="wrong", skip_instance_cache=True,
                                  client_kwargs={"endpoint_url": s3_server.endpoint})
        with pytest.raises(PermissionError):
            wrong.cat_file(f"{s3_server.bucket}/probe/x.txt")


def test_cli_style_options_reach_s3(s3_server):
    """Guards against --storage-option KEY=VALUE flags not turning into working s3fs options."""
    options = parse_storage_options(tuple(s3_server.cli_options[1::2]))
    assert options == s3_server.storage_options


def test_walk_prefix_and_commit_on_s3(s3_server, tmp_path):
    """Guards against s3:// prefixes not walked recursively, uris without the s3:// scheme, and the commit
    stage's temp-then-move commit, the driver's assembly of units cut between blocks, or a resume's scan of a
    shard's files failing on object storage."""
    fs = s3_server.fs()
    root = f"{s3_server.bucket}/walk"
    for key in ("a.png", "sub/b.mp4", "sub/deeper/c.jpeg", "sub/readme.md"):
        fs.pipe_file(f"{root}/{key}", b"x")
    items = list(iter_items([f"s3://{root}"], PromptSpec(), s3_server.storage_options))
    assert [i["uri"] for i in items] == [f"s3://{root}/{k}" for k in ("a.png", "sub/b.mp4", "sub/deeper/c.jpeg")]
    from tests.test_pipeline_sink import META, SHARD0, _rows

    from pipeline.resume import read_committed
    from workers.commit import CommitSpec, commit_rows

    out = f"s3://{s3_server.bucket}/sink-out"
    spec = CommitSpec(out=out, storage_options=s3_server.storage_options, metadata=META, rows_per_file=1)
    a = _rows("s3://x/a.mp4", 2, ["q?"])
    records, rest = commit_rows(a.slice(0, 1), spec)
    assert records == [] and rest.num_rows == 1
    sink = ParquetSink(spec)
    sink.add(rest)
    assert len(sink.add(a.slice(1))) == 1
    assert len(commit_rows(_rows("s3://x/b.mp4", 1, ["q?"]), spec)[0]) == 1
    sink.close()
    output = Output(out, s3_server.storage_options)
    state = output.scan()
    assert state.rows == 3 and len(state.files) == 2 and all(f.startswith("s3://") for f in state.files)
    assert read_committed(output, 0, SHARD0.split("-")[1]).totals["rows"] == 3
    # (SeaweedFS may keep listing an emptied prefix: look for files, not for an empty listing)
    assert [p for p in fs.find(f"{s3_server.bucket}/sink-out/_tmp") if p.endswith(".parquet")] == []


def test_model_directory_from_s3_is_cached(s3_server, tiny_model, tmp_path):
    """Guards against --model s3://... failing in actors, re-downloading weights on every actor start, or a
    cached copy losing the directory's name (a LLaVA-OneVision's rows would carry a hash as model)."""
    fs = s3_server.fs()
    remote = f"{s3_server.bucket}/models/tiny"
    fs.put(tiny_model.rstrip("/") + "/", remote, recursive=True)
    local = local_model_dir(f"s3://{remote}", s3_server.storage_options, cache_root=str(tmp_path / "cache"))
    assert sorted(os.listdir(local)) == sorted(os.listdir(tiny_model) + [".complete"])
    assert os.path.basename(local) == "tiny"  # a model named after its directory (LLaVA-OneVision) keeps its name
    fs.rm(remote, recursive=True)  # a second call must not touch the remote
    assert local_model_dir(f"s3://{remote}", s3_server.storage_options, cache_root=str(tmp_path / "cache")) == local


def test_s3_to_s3_end_to_end(ray_local, s3_server, tiny_model, tmp_path):
    """Guards against credentials/endpoint not reaching decode tasks and labeler actors, model
    download from S3 failing in actors, and S3 output unreadable by pyarrow, pandas and HF datasets."""
    fs = s3_server.fs()
    opts = s3_server.storage_options
    manifest = write_corpus(f"s3://{s3_server.bucket}/corpus", 2, 1, seed=4, storage_options=opts)
    fs.put(tiny_model.rstrip("/") + "/", f"{s3_server.bucket}/models/e2e", recursive=True)
    out = f"s3://{s3_server.bucket}/labels"
    config = RunConfig(inputs=(manifest,), out=out, task="vqa", questions=("how many objects are there?",),
                       model=f"s3://{s3_server.bucket}/models/e2e", max_new_tokens=3,
                       storage_options=tuple(s3_server.cli_options[1::2]))
    summary = run(config)
    assert summary["rows"] >= 3 and summary["status"].get("error", 0) == 0
    assert Output(out, opts).read_summary()["rows"] == summary["rows"]
    files = sorted(fs.glob(f"{s3_server.bucket}/labels/part-*.parquet"))
    table = pq.read_table(files, filesystem=fs)
    assert table.schema.remove_metadata().equals(LABEL_SCHEMA) and table.num_rows == summary["rows"]
    assert all(u.startswith("s3://") for u in table.column("uri").to_pylist())

    import datasets
    import pandas as pd

    assert len(pd.read_parquet(f"s3://{files[0]}", storage_options=opts)) > 0
    hf = datasets.load_dataset("parquet", data_files=f"{out}/*.parquet", split="train", storage_options=opts,
                               cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == table.num_rows


def test_long_video_on_s3_is_read_by_range_requests(ray_local, s3_server, tiny_model, tmp_path):
    """Guards against a video on object storage being downloaded whole (or once per clip group): its probe, one
    sparse clip and all its groups through the pipeline read what they need by range requests."""
    import media

    from workers.probe import probe_uri
    from workers.seek import decode_group

    size = media.long_mp4(tmp_path / "long.mp4", 60, pad_bytes_per_s=100_000)
    fs = s3_server.fs()
    fs.put_file(str(tmp_path / "long.mp4"), f"{s3_server.bucket}/videos/long.mp4")
    uri, opts = f"s3://{s3_server.bucket}/videos/long.mp4", s3_server.storage_options
    probe = probe_uri(uri, opts)
    assert probe.duration_s == 60.0 and probe.bytes_read < size / 20
    clips, read = decode_group(uri, opts, probe.t0, [(0, 0.0, 60.0)], 8, 16)
    assert len(clips[0].timestamps_s) == 8 and read.bytes < size / 2
    out = tmp_path / "out"
    summary = run(RunConfig(inputs=(uri,), out=str(out), model=tiny_model, max_new_tokens=2, clip_seconds=5.0,
                            clips_per_group=3, storage_options=tuple(s3_server.cli_options[1::2])))
    assert summary["rows"] == summary["clips"] == 12 and summary["status"].get("error", 0) == 0
    assert 0.9 * size < summary["this_run"]["bytes_read"] < 1.2 * size, (summary["this_run"]["bytes_read"], size)
