"""`--clips shots`: clip boundaries where the shots change, found by PySceneDetect's content detector.

A long video is cut into windows (pipeline units, planned by workers.split) that are detected in parallel. One
window: `detect_cuts` seeks to its start over the file object (workers.stream) and decodes every frame of it,
shrunk to DETECT_WIDTH pixels wide (what PySceneDetect's SceneManager does by default before its detectors), into
`ContentDetector.process_frame` with its timecode from the frame's own timestamp; the cuts it returns are the
first frames of new shots. `shot_clips` then bounds them: shots shorter than the minimum merge into their shorter
neighbour, shots longer than the maximum split into equal parts. A window's edges are clip boundaries too (the
shot that spans one is split there, as a long shot would be), and the piece of that shot on either side of the
edge never merges across a cut, however short (`shot_clips`'s open_start / open_end). Runs in the isolated child
with the unit's timeout.
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


def shot_clips(cuts: list[float], start_s: float, end_s: float, min_s: float, max_s: float,
               open_start: bool = False, open_end: bool = False) -> list[tuple[float, float]]:
    """[(start, end), ...] covering [start_s, end_s): the pieces between cuts, bounded (see the module doc).

    Merging first: the shortest piece under min_s joins its shorter neighbour, until none is left (or one piece);
    then each piece over max_s is split into ceil(length / max_s) equal parts. open_start / open_end: start_s /
    end_s is a window edge inside the video, not its start / end, so the shot there may go on past it; the piece
    at that edge is then kept as it is, neither merged nor merged into.

    Why kept, even under min_s: that piece is the part of its shot on this side of the edge, and nothing else in
    this window is in that shot, so a merge here can only cross a detected cut (a cut 1 s after a window edge gave a
    clip from the edge to 9.5 s past it, over the cut). Its own shot's other part is in the neighbouring window,
    another decode task and commit unit, detected on its own (and resumed on its own: a committed window is not
    redone); joining the two would need both windows to agree on cuts each detects separately, and any
    disagreement would cover seconds twice or not at all. So the window edge stays a clip boundary, every second
    is still in exactly one clip, and only a shot that spans a window edge may give a clip under min_s."""
    edges = [start_s, *sorted(c for c in cuts if start_s < c < end_s), end_s]
    pieces = [[a, b] for a, b in zip(edges, edges[1:])]

    def length(k: int) -> float:
        return pieces[k][1] - pieces[k][0]

    def free(k: int) -> bool:  # in range and not the piece at an open edge
        return 0 <= k < len(pieces) and not ((k == 0 and open_start) or (k == len(pieces) - 1 and open_end))

    while True:
        short = [k for k in range(len(pieces)) if free(k) and length(k) < min_s and (free(k - 1) or free(k + 1))]
        if not short:
            break
        i = min(short, key=lambda k: (length(k), k))
        left = length(i - 1) if free(i - 1) else math.inf
        right = length(i + 1) if free(i + 1) else math.inf
        other = i - 1 if left <= right else i + 1
        lo, hi = min(i, other), max(i, other)
        pieces[lo:hi + 1] = [[pieces[lo][0], pieces[hi][1]]]
    out = []
    for a, b in pieces:
        n = max(1, math.ceil((b - a) / max_s - 1e-9))
        out += [(a + (b - a) * k / n, a + (b - a) * (k + 1) / n) for k in range(n)]
    return out
