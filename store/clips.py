"""Which of a video's cached (or sampled) frames a clip or view uses. numpy only: stage one's decode workers use
it too, to decode no more frames than a predictor's views need."""

from __future__ import annotations

import numpy as np


def clip_rows(length: int, clip_frames: int | None, stride: int, max_frames: int | None,
              rng: np.random.Generator | None, view: tuple[int, int] | None = None) -> np.ndarray:
    """Which of a video's `length` cached frames a sample uses.

    Training (`rng` given): `clip_frames` frames `stride` apart from a random start; a video too short for
    that span keeps the clip length with the largest stride that fits (or every frame when it has fewer).
    Evaluation (`rng` None, `clip_frames` None): the whole video, one frame in `stride` (evenly spread, from the
    first frame to the last), at most `max_frames`.
    Multi-view evaluation (`rng` None, `view` = (k, n)): clip k of n clips whose starts are evenly spaced from
    the video's start to its end (n = 1: the centred clip).
    """
    if clip_frames is None:
        n = int(whole_frames(length, stride, max_frames))
        return np.arange(length) if n >= length else np.linspace(0, length - 1, n).round().astype(np.int64)
    if length <= clip_frames:
        return np.arange(length)
    stride = int(clip_stride(length, clip_frames, stride))
    span = (clip_frames - 1) * stride + 1
    if rng is not None:
        start = int(rng.integers(0, length - span + 1))
    elif view is not None and view[1] > 1:
        start = round(view[0] * (length - span) / (view[1] - 1))
    else:
        start = (length - span) // 2
    return start + np.arange(clip_frames) * stride


def clip_stride(length, clip_frames: int, stride: int):
    """The stride of a clip of `clip_frames` frames in a video of `length` frames (or an array of lengths):
    `stride`, or the largest that fits a shorter video, at least 1."""
    return np.maximum(1, np.minimum(stride, (np.asarray(length) - 1) // max(1, clip_frames - 1)))


def whole_frames(length, stride: int, max_frames: int | None):
    """How many frames a whole-video view of a video of `length` frames (or an array of lengths) holds: one in
    `stride`, at most `max_frames`."""
    n = -(-np.asarray(length) // max(1, stride))
    return n if max_frames is None else np.minimum(n, max_frames)


def view_rows(length: int, views: tuple[int, int, int] | None, max_frames: int, whole_stride: int = 1
              ) -> np.ndarray:
    """The rows of a video's `length` frames that a set of views uses, sorted and distinct: with `views` None
    the whole video, one frame in `whole_stride`, at most `max_frames` (the `full` view); with (clips,
    clip_frames, stride) the union of the evenly spaced clips."""
    if views is None:
        return clip_rows(length, None, whole_stride, max_frames, None)
    n, frames, stride = views
    return np.unique(np.concatenate([clip_rows(length, frames, stride, None, None, (k, n)) for k in range(n)]))


def uniform_rows(length: int, segments: int, rng: np.random.Generator | None) -> np.ndarray:
    """A uniform view of a video's `length` frames (TSN; MMAction2's UniformSampleFrames): the video cut into
    `segments` equal segments, one frame from each, at a random place in it (`rng` given) or its middle. Sorted and
    distinct, the first segment starting at frame 0 and the last ending at the last frame, so the view spans the
    whole video whatever its length; a video of no more than `segments` frames gives every frame."""
    if length <= segments:
        return np.arange(length)
    edges = np.floor(np.arange(segments + 1) * (length / segments)).astype(np.int64)  # each segment >= 1 frame
    lo, size = edges[:-1], np.diff(edges)
    if rng is None:
        return lo + (size - 1) // 2
    return lo + np.minimum((rng.random(segments) * size).astype(np.int64), size - 1)


def speed_factor(rng: np.random.Generator, speed: tuple[float, float]) -> float:
    """A training view's temporal scale, log-uniform in [speed[0], speed[1]] (1.0 when both are 1)."""
    lo, hi = speed
    return lo if lo == hi else float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
