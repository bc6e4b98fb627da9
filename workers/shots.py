"""`--clips shots`: clip boundaries where the shots change, found by PySceneDetect's content detector.

A long video is cut into windows (pipeline units, planned by workers.split) that are detected in parallel. One
window: `detect_cuts` seeks to its start over the file object (workers.stream) and decodes every frame of it,
shrunk to DETECT_WIDTH pixels wide (what PySceneDetect's SceneManager does by default before its detectors), into
`ContentDetector.process_frame` with its timecode from the frame's own timestamp; the cuts it returns are the
first frames of new shots. `shot_clips` then bounds them: shots shorter than the minimum merge into their shorter
neighbour, shots longer than the maximum split into equal parts. A window's edges are clip boundaries too (the
shot that spans one is split there, as a long shot would be). Runs in the isolated child with the unit's timeout.
"""

from __future__ import annotations

import math
from fractions import Fraction

from workers.frames import DecodeError, clean_message
from workers.fetch import DEFAULT_RETRIES
from workers.stream import DECODE_FETCH, Reads, open_input
from workers.video import _av, _frames

DETECT_WIDTH = 256
THRESHOLD = 27.0  # ContentDetector's default: the weighted HSV change between two frames that makes a cut


def detect_cuts(uri: str, storage_options: dict | None, t0: float, start_s: float, end_s: float,
                max_fetch: int = DECODE_FETCH, threshold: float = THRESHOLD,
                retries: int = DEFAULT_RETRIES) -> tuple[list[float], Reads]:
    """(shot changes in (start_s, end_s), in seconds from the video's first frame; what was read). Raises FetchError
    when the input cannot be read, DecodeError when the window has no decodable frame. `max_fetch`: the largest
    range request (workers.stream.fetch_limit)."""
    from scenedetect.common import FrameTimecode, Timecode
    from scenedetect.detectors import ContentDetector

    detector = ContentDetector(threshold=threshold, min_scene_len=0)  # our own bounds apply (shot_clips)
    av = _av()
    cuts: list[float] = []
    seen = 0
    with open_input(uri, storage_options, max_fetch, retries) as f:
        try:
            with av.open(f) as container:
                stream = container.streams.video[0]
                stream.thread_count = 1
                rate = Fraction(stream.guessed_rate or stream.average_rate or 25)
                container.seek(round((start_s + t0) / stream.time_base), stream=stream, backward=True)
                timecode = None
                for frame in _frames(container, stream):
                    if frame.pts is None:
                        continue
                    t = float(frame.pts * frame.time_base) - t0
                    if t < start_s - 1e-6:  # the lead-in from the keyframe before the window
                        continue
                    if t >= end_s - 1e-6:
                        break
                    seen += 1
                    height = max(2, round(frame.height * DETECT_WIDTH / max(frame.width, 1) / 2) * 2)
                    small = frame.reformat(width=min(DETECT_WIDTH, frame.width), height=min(height, frame.height),
                                           format="bgr24").to_ndarray()
                    timecode = FrameTimecode(Timecode(pts=frame.pts, time_base=Fraction(frame.time_base)), fps=rate)
                    cuts += [c.seconds - t0 for c in detector.process_frame(timecode, small)]
                if timecode is not None:
                    cuts += [c.seconds - t0 for c in detector.post_process(timecode)]
        except av.error.FFmpegError as err:
            f.raise_read_error()
            raise DecodeError(f"not a video: {clean_message(str(err))}") from err
        f.raise_read_error()
        read = f.reads
    if not seen:
        raise DecodeError("no decodable video frames in this part of the video")
    return sorted(c for c in set(cuts) if start_s + 1e-6 < c < end_s - 1e-6), read


def shot_clips(cuts: list[float], start_s: float, end_s: float, min_s: float,
               max_s: float) -> list[tuple[float, float]]:
    """[(start, end), ...] covering [start_s, end_s): the pieces between cuts, bounded (see the module doc).

    Merging first: the shortest piece under min_s joins its shorter neighbour, until none is left (or one piece);
    then each piece over max_s is split into ceil(length / max_s) equal parts."""
    edges = [start_s, *sorted(c for c in cuts if start_s < c < end_s), end_s]
    pieces = [[a, b] for a, b in zip(edges, edges[1:])]
    while len(pieces) > 1:
        i = min(range(len(pieces)), key=lambda k: (pieces[k][1] - pieces[k][0], k))
        if pieces[i][1] - pieces[i][0] >= min_s:
            break
        left = pieces[i - 1][1] - pieces[i - 1][0] if i > 0 else math.inf
        right = pieces[i + 1][1] - pieces[i + 1][0] if i + 1 < len(pieces) else math.inf
        other = i - 1 if left <= right else i + 1
        lo, hi = min(i, other), max(i, other)
        pieces[lo:hi + 1] = [[pieces[lo][0], pieces[hi][1]]]
    out = []
    for a, b in pieces:
        n = max(1, math.ceil((b - a) / max_s - 1e-9))
        out += [(a + (b - a) * k / n, a + (b - a) * (k + 1) / n) for k in range(n)]
    return out
