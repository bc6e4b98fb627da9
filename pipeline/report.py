"""`OUT/_report.html`: one self-contained page about an output (any fsspec URI), for a person to look at.

Its name starts with `_` because readers of the output directory (pyarrow, pandas, HF datasets, Spark) skip such
paths and would fail on any other file that is not Parquet: `pd.read_parquet(OUT)` must keep working.

Sections: the run's figures (`_summary.json`), status counts, a gallery of a sample of rows (thumbnails of the
frames the model saw, the prompt, the text, the status; filter by status), errors grouped by stage and message
with counts, rows/s over the run (from the rows' `created_at`), and the distribution of text lengths. The part
files are read a file at a time, and only what the page shows is kept: counts, the error groups and the sample
(the rows of smallest sha1(row_id): the same sample on every report of the same output). Thumbnails are the
sample rows' own items fetched and decoded again with the run's clip settings (the decoder's isolated child,
as in a run), so a video row shows the frames at its `frame_timestamps_s`; charts are inline SVG, images data
URIs; the page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import heapq
import html
import io
import json
import logging
import math
from typing import Any

import numpy as np

from pipeline.output import REPORT_NAME, Output
from schemas.manifest import make_item
from schemas.rows import CAPTION, DECODE, ERROR, LIST, OK, READ, TRUNCATED, VIDEO
from workers.storage import read_parquet_file

log = logging.getLogger(__name__)
_COLUMNS = ["row_id", "item_id", "uri", "media_type", "clip_index", "frame_timestamps_s", "width", "height", "task",
            "prompt", "text", "status", "error_stage", "error", "num_generated_tokens", "created_at"]
_STRIP = 4  # frames shown per video row


class _Stats:
    """What the page shows, gathered file by file."""

    def __init__(self, sample: int):
        self.sample = sample
        self.heap: list[tuple[int, int, dict]] = []  # (-key, seq, row): the `sample` smallest keys
        self.status: collections.Counter = collections.Counter()
        self.errors: dict[tuple[str, str], list] = {}  # (stage, message) -> [count, an example uri]
        self.lengths: list[int] = []  # words per text (bounded: one int per text row)
        self.times: list[float] = []  # created_at, seconds since the epoch
        self.rows = 0

    def add(self, row: dict) -> None:
        self.rows += 1
        self.status[row["status"]] += 1
        if row["status"] == ERROR:
            message = (row["error"] or "").strip().splitlines()[0][:200] if row["error"] else ""
            group = self.errors.setdefault((row["error_stage"] or "?", message), [0, row["uri"]])
            group[0] += 1
        if row["text"] is not None:
            self.lengths.append(len(row["text"].split()))
        if row["created_at"] is not None:
            self.times.append(row["created_at"].timestamp())
        key = int(hashlib.sha1(row["row_id"].encode()).hexdigest()[:15], 16)
        entry = (-key, self.rows, row)
        if len(self.heap) < self.sample:
            heapq.heappush(self.heap, entry)
        elif entry > self.heap[0]:
            heapq.heapreplace(self.heap, entry)

    def sampled(self) -> list[dict]:
        return [row for _, _, row in sorted(self.heap, key=lambda e: (e[2]["uri"], e[2]["clip_index"] or 0,
                                                                        e[2]["prompt"]))]


def write_report(out: str, storage_options: dict[str, Any] | None = None, sample: int = 48,
                 thumb_size: int = 160, decode_timeout_s: float = 30.0, to: str | None = None) -> str:
    """Write OUT/_report.html, or the URI `to` (see the module doc); returns its URI."""
    output = Output(out, storage_options)
    stats = _Stats(sample)
    for path in output.part_paths():
        with output.fs.open(path, "rb") as f:
            for row in read_parquet_file(f, _COLUMNS).to_pylist():
                stats.add(row)
    summary = output.read_summary() or {}
    rows = stats.sampled()
    thumbs = _thumbnails(rows, summary.get("generation") or {}, storage_options, thumb_size, decode_timeout_s)
    page = _page(out, summary, stats, rows, thumbs)
    if to is not None:
        from pipeline.storage import filesystem

        fs, path = filesystem(to, storage_options)
        fs.pipe_file(path, page.encode("utf-8"))
        return fs.unstrip_protocol(path)
    output.fs.pipe_file(output.path(REPORT_NAME), page.encode("utf-8"))
    return output.uri_of(output.path(REPORT_NAME))


def _thumbnails(rows: list[dict], generation: dict, storage_options: dict | None, size: int,
                timeout_s: float) -> dict[str, list[str]]:
    """row_id -> JPEG data URIs of the frames the model saw (none for rows whose item never decoded). A video row's
    frames are decoded again at its own timestamps, by seeking (a long video is never read whole)."""
    from workers.decode import DecodeSettings, fetch_and_decode
    from workers.fetch import FetchError
    from workers.frames import DecodeError
    from workers.isolate import IsolationError, guarded
    from workers.seek import decode_at

    decoded: dict[tuple[str, int], list[dict]] = {}
    out: dict[str, list[str]] = {}
    for row in rows:
        if row["status"] == ERROR and row["error_stage"] in (LIST, READ, DECODE):
            continue
        times = row["frame_timestamps_s"] or ()
        settings = DecodeSettings(image_size=size, frames_per_clip=max(1, len(times)),
                                  clip_seconds=generation.get("clip_seconds") or 0.0,
                                  max_clips=generation.get("max_clips"), timeout_s=timeout_s,
                                  storage_options=dict(storage_options or {}))
        if row["media_type"] == VIDEO and times:
            picks = np.linspace(0, len(times) - 1, min(_STRIP, len(times))).round().astype(int)
            try:
                frames = guarded(decode_at, row["uri"], settings.storage_options, [times[i] for i in picks], size,
                                 settings=settings)
            except (FetchError, DecodeError, IsolationError) as err:
                log.info("no thumbnails for %s: %s", row["uri"], err)
                continue
            out[row["row_id"]] = [_jpeg(f) for f in frames]
            continue
        key = (row["item_id"], settings.frames_per_clip)
        if key not in decoded:
            item = make_item(row["uri"], [{"task": CAPTION, "prompt": None}], row["media_type"])
            decoded[key] = fetch_and_decode(item, settings)
        clip = next((c for c in decoded[key] if c["clip_index"] == row["clip_index"] and c["status"] == OK), None)
        if clip is None:
            continue
        pixels = np.asarray(clip["frames"])  # (frames, height, width, 3) uint8
        picks = np.linspace(0, len(pixels) - 1, min(_STRIP, len(pixels))).round().astype(int)
        out[row["row_id"]] = [_jpeg(pixels[i]) for i in picks]
    return out


def _jpeg(frame: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame[..., :3])).save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _bars(values: list[float], labels: list[str], title: str, empty: str = "nothing to show", width: int = 640,
          height: int = 180) -> str:
    """An inline SVG bar chart."""
    if not values:
        return f"<p class=empty>{html.escape(title)}: {html.escape(empty)}</p>"
    top = max(values) or 1.0
    bar = width / len(values)
    parts = [f'<svg class=chart viewBox="0 0 {width} {height + 30}" role=img aria-label="{html.escape(title)}">']
    for i, (v, label) in enumerate(zip(values, labels)):
        h = height * v / top
        parts.append(f'<rect x="{i * bar + 1:.1f}" y="{height - h:.1f}" width="{max(bar - 2, 1):.1f}" '
                     f'height="{h:.1f}"><title>{html.escape(label)}: {v:g}</title></rect>')
    step = max(1, len(labels) // 8)
    for i in range(0, len(labels), step):
        parts.append(f'<text x="{i * bar + bar / 2:.1f}" y="{height + 18}">{html.escape(labels[i])}</text>')
    parts.append(f'<text x="{width - 4}" y="12" class=top>max {top:g}</text></svg>')
    return "".join(parts)


def _throughput(times: list[float]) -> tuple[list[float], list[str]]:
    """Rows/s over the run, in up to 40 equal buckets of created_at (rows of one labeler block share a time)."""
    if len(set(times)) < 2:
        return [], []
    start, end = min(times), max(times)
    n = min(40, len(set(times)))
    width = (end - start) / n
    counts = np.histogram(times, bins=n, range=(start, end))[0]
    return [round(c / width, 2) for c in counts], [f"{i * width:.0f}s" for i in range(n)]


def _lengths(lengths: list[int]) -> tuple[list[float], list[str]]:
    if not lengths:
        return [], []
    top = max(lengths)
    n = min(20, top + 1)
    edges = np.linspace(0, top + 1, n + 1)
    counts = np.histogram(lengths, bins=edges)[0]
    return [float(c) for c in counts], [f"{int(edges[i])}" for i in range(n)]


def _card(row: dict, thumbs: list[str]) -> str:
    status = row["status"]
    images = "".join(f'<img src="{t}" alt="frame">' for t in thumbs) or "<div class=noframe>no frames</div>"
    where = html.escape(row["uri"].rsplit("/", 1)[-1])
    clip = f" · clip {row['clip_index']}" if row["clip_index"] is not None else ""
    body = (f'<p class=text>{html.escape(row["text"])}</p>' if row["text"] is not None
            else f'<p class=errtext>{html.escape(row["error_stage"] or "")}: {html.escape(row["error"] or "")}</p>')
    return (f'<div class=card data-status="{status}"><div class=frames>{images}</div>'
            f'<p class=meta><span class="badge s-{status}">{status}</span> {where}{clip} · {row["media_type"]}</p>'
            f'<p class=prompt>{html.escape(row["task"])}: {html.escape(row["prompt"])}</p>{body}</div>')


_STYLE = """\
body{font:14px system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
.figs{display:flex;flex-wrap:wrap;gap:10px} .fig{background:#fff;border:1px solid #ddd;padding:8px 12px}
.fig b{display:block;font-size:16px} .fig span{color:#666;font-size:12px}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
.badge{padding:1px 6px;border-radius:3px;color:#fff;background:#888}
.s-ok{background:#2e7d32} .s-truncated{background:#ef6c00} .s-error{background:#c62828}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;padding:8px} .card.hidden{display:none}
.frames{display:flex;gap:2px;min-height:60px} .frames img{flex:1;min-width:0;height:auto}
.noframe{flex:1;background:#eee;color:#999;display:flex;align-items:center;justify-content:center}
.meta{font-size:12px;color:#555} .prompt{color:#555;font-style:italic} .errtext{color:#c62828}
.chart{width:100%;max-width:720px;background:#fff;border:1px solid #ddd} .chart rect{fill:#1565c0}
.chart text{font-size:10px;text-anchor:middle;fill:#555} .chart text.top{text-anchor:end}
button{margin:0 6px 10px 0} .empty{color:#888}
"""
_SCRIPT = """\
document.querySelectorAll("#filters button").forEach(function (button) {
  button.addEventListener("click", function () {
    const want = button.dataset.filter;
    document.querySelectorAll("#gallery .card").forEach(function (card) {
      card.classList.toggle("hidden", want !== "all" && card.dataset.status !== want);
    });
  });
});
"""  # the gallery's status filter


def _page(out: str, summary: dict, stats: _Stats, rows: list[dict], thumbs: dict[str, list[str]]) -> str:
    """The report's one HTML page: the run's figures, its statuses, a gallery of `rows` (filtered by status), the
    errors grouped by stage and message, and the rows/s and text-length charts."""
    run = summary.get("this_run") or {}
    figures = [("rows", stats.rows), ("items", summary.get("items", "?")), ("clips", summary.get("clips", "?")),
               ("model", summary.get("model", "?")), ("job", summary.get("job_id", "?")),
               ("wall", f"{run['wall_s']:.1f} s" if "wall_s" in run else "?"),
               ("items/s", run.get("items_per_s", "?")), ("tokens/s", run.get("tokens_per_s", "?")),
               ("complete", "yes" if summary.get("complete") else "no (no _summary.json)")]
    head = "".join(f"<div class=fig><b>{html.escape(str(v))}</b><span>{k}</span></div>" for k, v in figures)
    statuses = [s for s in (OK, TRUNCATED, ERROR) if stats.status.get(s)] + sorted(
        s for s in stats.status if s not in (OK, TRUNCATED, ERROR))
    status_rows = "".join(f"<tr><td><span class='badge s-{s}'>{s}</span></td><td>{stats.status[s]}</td>"
                          f"<td>{stats.status[s] / max(stats.rows, 1):.1%}</td></tr>" for s in statuses)
    groups = sorted(stats.errors.items(), key=lambda kv: (-kv[1][0], kv[0]))
    error_rows = "".join(f"<tr><td>{html.escape(stage)}</td><td>{html.escape(msg)}</td><td>{n}</td>"
                         f"<td>{html.escape(uri)}</td></tr>" for (stage, msg), (n, uri) in groups[:100])
    errors = (f"<table><tr><th>stage</th><th>message</th><th>rows</th><th>e.g.</th></tr>{error_rows}</table>"
              if groups else "<p class=empty>no error rows</p>")
    buttons = "".join(f'<button data-filter="{s}">{s} ({sum(r["status"] == s for r in rows)})</button>'
                      for s in statuses)
    cards = "".join(_card(r, thumbs.get(r["row_id"], [])) for r in rows)
    rate, rate_labels = _throughput(stats.times)
    length, length_labels = _lengths(stats.lengths)
    data = json.dumps({"rows": stats.rows, "sample": len(rows)})
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>lavi-label report: {html.escape(out)}</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<style>
{_STYLE}</style></head><body>
<h1>lavi-label report</h1><p>{html.escape(out)}</p>
<div class=figs>{head}</div>
<h2>Status</h2><table><tr><th>status</th><th>rows</th><th>share</th></tr>{status_rows}</table>
<h2>Gallery: {len(rows)} of {stats.rows} rows</h2>
<div id=filters><button data-filter="all">all ({len(rows)})</button>{buttons}</div>
<div class=gallery id=gallery>{cards}</div>
<h2>Errors by stage and message</h2>{errors}
<h2>Rows/s over the run</h2>{_bars(rate, rate_labels, "rows per second", "all rows have one time (a short run)")}
<h2>Text length (words)</h2>{_bars(length, length_labels, "rows by words in text")}
<script>
const report = {data};
{_SCRIPT}</script>
</body></html>
"""
