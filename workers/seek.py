"""A clip group's frames, decoded by seeking over a file object: the streamed decode of a long video.

`decode_group` opens the input (workers.stream), seeks to the keyframe before the group's first sampled time and
decodes forward, keeping only the sampled frames (resized at once); across a gap of more than SEEK_GAP_S between
two sampled times it seeks again instead of decoding through it. So a group reads the byte range of its own span
(plus the lead-in from the keyframe before it), and all the groups of a video read it about once. The frame given
for a time t is the one on screen at t (the last frame starting at or before t), as in workers.video, whose
clip and sampling rules these are. Runs in the isolated child, one call per group, with the group's timeout.
"""

from __future__ import annotations

import numpy as np

from workers.frames import Clip, DecodeError, Fit, clean_message
from workers.fetch import DEFAULT_RETRIES
from workers.stream import DECODE_FETCH, InputFile, Reads, open_input
from workers.video import _av, _frames, _to_input, sample_times

# Seek rather than decode through a gap longer than this. Decoding through a short gap costs less than a seek that
# lands on a keyframe behind the decoder (it redoes the frames since that keyframe); clips of a few seconds sample
# frames well under a second apart and never seek inside a group.
SEEK_GAP_S = 4.0
_EPS = 1e-6


def decode_group(uri: str, storage_options: dict | None, t0: float, clips: list[tuple[int, float, float]],
                 frames_per_clip: int, fit: Fit, max_fetch: int = DECODE_FETCH,
                 retries: int = DEFAULT_RETRIES) -> tuple[list[Clip], Reads]:
    """(clips with their frames (F, S, S, 3) uint8, what was read) for clips [(index, start_s, end_s), ...] of one
    video, times in seconds from its first frame (t0 on the stream's clock, from the probe). Raises FetchError
    when the input cannot be read, DecodeError (row-ready) when it has no decodable frame there. `fit`: the square
    side S, or a callable that sizes the frames itself (a dynamic-resolution model's workers.dynamic.ClipFit).
    `max_fetch`: the largest range request (workers.stream.fetch_limit); `retries`: each fetch's, on transient
    errors."""
    plan = [(k, a, b, sample_times(a, b, frames_per_clip)) for k, a, b in clips]
    wanted = sorted({float(t) for *_, times in plan for t in times})
    with open_input(uri, storage_options, max_fetch, retries) as f:
        try:
            got = frames_at(f, wanted, t0, fit)
        finally:
            f.raise_read_error()
        read = f.reads
    out = []
    for k, a, b, times in plan:
        picked = [got[float(t)] for t in times]
        frames = np.stack([frame for frame, _ in picked])  # (F, S, S, 3) or (F, h, w, 3)
        out.append(Clip(k, float(a), float(b), [t for _, t in picked], frames))
    return out, read


def frames_at(f: InputFile, wanted: list[float], t0: float,
              fit: Fit) -> dict[float, tuple[np.ndarray, float]]:
    """{t: (the frame on screen at t, resized; its own time)} for sorted times t (seconds from the first frame).

    A time past the last decodable frame (a truncated file) gets the last frame decoded before it, with that
    frame's time. Raises DecodeError when no frame decodes at all."""
    av = _av()
    cursor = _Cursor(wanted, t0, fit)
    try:
        with av.open(f) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1
            while cursor.j < len(wanted):
                try:
                    container.seek(round((wanted[cursor.j] + t0) / stream.time_base), stream=stream, backward=True)
                except av.error.FFmpegError:  # past what the file holds (a truncated tail)
                    break
                if not cursor.decode_forward(container, stream):  # the end of the stream
                    break
            cursor.fill_tail()
    except av.error.FFmpegError as err:
        raise DecodeError(f"not a video: {clean_message(str(err))}") from err
    if len(cursor.got) < len(wanted):
        raise DecodeError("no decodable video frames in this part of the video")
    return cursor.got


class _Cursor:
    """The state of one pass over a video's wanted times: the next one (`j`), what is found (`got`), the last
    frame decoded (kept across seeks for a truncated tail) and the longest keyframe lead-in seen (`gop`)."""

    def __init__(self, wanted: list[float], t0: float, fit: Fit):
        self.wanted, self.t0, self.fit = wanted, t0, fit
        self.got: dict[float, tuple[np.ndarray, float]] = {}
        self.j = 0
        self.last = None  # (frame, time)
        self.gop = 0.0  # a seek landed this far before its target: gaps shorter than that are decoded through

    def _put(self, t: float, frame, frame_t: float, converted: list) -> None:
        if not converted or converted[0] is not frame:  # one resize for several times on one frame
            converted[:] = [frame, _to_input(frame, self.fit)]
        self.got[t] = (converted[1], frame_t)

    def decode_forward(self, container, stream) -> bool:
        """Decode from where a seek left the demuxer until every wanted time is in, a gap worth a seek, or the
        end (False). A gap ends the call only after its seek paid off, so every seek moves `j` on."""
        wanted, first, target = self.wanted, self.j, self.wanted[self.j]
        prev, converted = None, []
        for frame in _frames(container, stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * frame.time_base) - self.t0
            if prev is None:
                self.gop = max(self.gop, target - t)
            while self.j < len(wanted) and wanted[self.j] < t - _EPS:  # on screen then: the frame before this one
                source = prev if prev is not None else (frame, t)  # (or this one, when the seek landed after it)
                self._put(wanted[self.j], *source, converted)
                self.j += 1
            if self.j < len(wanted) and abs(wanted[self.j] - t) <= _EPS:
                self._put(wanted[self.j], frame, t, converted)
                self.j += 1
            prev = self.last = (frame, t)
            if self.j == len(wanted):
                return True
            if self.j > first and wanted[self.j] - t > max(SEEK_GAP_S, self.gop):
                return True
        return False

    def fill_tail(self) -> None:
        """Times past the last decodable frame get that frame."""
        converted: list = []
        for t in self.wanted[self.j:]:
            if self.last is not None:
                self._put(t, *self.last, converted)


def decode_at(uri: str, storage_options: dict | None, times: list[float], fit: Fit) -> list[np.ndarray]:
    """The frames of one video on screen at `times` (seconds from its first frame, as rows record them), resized:
    a row's frames decoded again (the report's thumbnails) without reading the whole file."""
    from workers.probe import probe_input

    with open_input(uri, storage_options, DECODE_FETCH) as f:
        try:
            t0 = probe_input(f).t0
            f.seek(0)
            got = frames_at(f, sorted(set(times)), t0, fit)
        finally:
            f.raise_read_error()
    return [got[t][0] for t in times]
