"""The report page: made at the end of a real `lavi-label run`, looked at in a real headless chromium.

The browser (tests/browser.py) is Debian's chromium, started by the test on 127.0.0.1 and ended by its PID.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.output import REPORT_NAME, Output
from pipeline.report import write_report
from shapes.corpus import write_corpus
from tests.browser import Browser

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def labelled(ray_local, tiny_model, tmp_path_factory):
    """A finished run's output (images, a video cut into clips, a missing file), made by the CLI."""
    root = tmp_path_factory.mktemp("report")
    manifest = Path(write_corpus(str(root / "corpus"), 7, 1, seed=9).removeprefix("file://"))
    with manifest.open("a") as f:
        f.write(json.dumps({"uri": str(root / "corpus" / "images" / "gone.png")}) + "\n")
    out = root / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-m", "jobs.run", str(manifest), "--out", str(out), "--model", tiny_model,
                           "--max-new-tokens", "6", "--clip-seconds", "1", "--address", ray_local],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"report: file://{out}/{REPORT_NAME}" in done.stdout, done.stdout
    return out


def test_the_report_of_a_run_loads_in_a_browser_with_its_gallery_and_errors(labelled, tmp_path):
    """Guards against a report that is not made by `run`, breaks the readers of the output directory, throws in
    the browser, shows another number of rows than it says, drops the error rows or their grouping, has broken
    thumbnails, a filter that does nothing, or renders blank."""
    from PIL import Image

    rows = pq.read_table(labelled).to_pylist()  # the page beside the Parquet must not break readers
    assert len(pd.read_parquet(labelled)) == len(rows)
    errors = [r for r in rows if r["status"] == "error"]
    assert len(errors) == 1 and errors[0]["error_stage"] == "read"
    page = (labelled / REPORT_NAME).read_text()
    assert "http://" not in page and "https://" not in page  # self-contained: nothing loaded from anywhere
    with Browser() as browser:
        browser.open((labelled / REPORT_NAME).as_uri())
        cards = browser.evaluate("document.querySelectorAll('#gallery .card').length")
        assert cards == len(rows)  # under the 48-row sample: every row
        assert browser.evaluate("document.querySelectorAll('#gallery .card[data-status=error]').length") == 1
        framed = browser.evaluate("Array.from(document.querySelectorAll('#gallery img')).map(i => i.naturalWidth)")
        videos = sum(r["media_type"] == "video" for r in rows)
        assert len(framed) == (len(rows) - 1 - videos) + 4 * videos and min(framed) > 0  # 4 frames per clip
        assert browser.evaluate("document.body.innerText").count("not found") == 2  # its card and its group
        browser.evaluate("document.querySelector('#filters button[data-filter=error]').click()")
        shown = browser.evaluate("Array.from(document.querySelectorAll('#gallery .card'))"
                                 ".filter(c => c.offsetParent !== null).length")
        assert shown == 1
        shot = np.asarray(Image.open(io.BytesIO(browser.screenshot())).convert("RGB"))
        assert browser.problems == []
    assert shot.shape[0] > 800 and shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 200


def test_a_report_of_an_output_in_object_storage(labelled, s3_server):
    """Guards against a report that only works on local outputs."""
    fs = s3_server.fs()
    base = f"{s3_server.bucket}/report-out"
    for path in labelled.glob("*.parquet"):
        fs.put_file(str(path), f"{base}/{path.name}")
    fs.put_file(str(labelled / "_summary.json"), f"{base}/_summary.json")
    uri = write_report(f"s3://{base}", s3_server.storage_options, sample=3)
    assert uri == f"s3://{base}/{REPORT_NAME}"
    page = fs.cat_file(f"{base}/{REPORT_NAME}").decode()
    assert page.count("<div class=card ") == 3 and "Gallery: 3 of" in page
    assert Output(f"s3://{base}", s3_server.storage_options).scan().rows == len(pq.read_table(labelled))
