"""Frame sampling by time: which of a video's frames to run the backbone on.

Sampling maps target times to frame indices through the frames' real timestamps (from the container's
presentation times), never through an assumed constant frame rate, so variable-frame-rate files and files
whose header misstates the frame count are sampled correctly. Nothing is re-encoded.

Modes:
- `fps`: one frame per 1/fps seconds — the frame on screen at each time 0, 1/fps, 2/fps, ...;
- `every`: every k-th decoded frame (0, k, 2k, ...), whatever the frame rate;
- `num_frames`: N frames spread evenly over the video — the frames on screen at the centres of N
  equal time segments.
`max_seconds` keeps only the first S seconds (in every mode). A video frame is never taken twice: asking
for more frames than the video has (fps above the native rate, N above the frame count) gives each frame
once, so the cache holds only real, distinct frames with their real timestamps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

# Tolerance for comparing times: container timestamps are exact ticks, float seconds are not.
_EPS = 1e-6


@dataclass(frozen=True)
class SamplingConfig:
    """Which frames to take. Only the field of the chosen mode matters (see `effective`)."""

    mode: Literal["fps", "every", "num_frames"] = "every"
    fps: float = 1.0
    every: int = 1
    num_frames: int = 16
    max_seconds: float | None = None
    # What a predictor decodes of the sampled frames, not part of a cache's sampling: up to `view_frames` spread
    # over the video (the `full` view), or with `view_clips` = (clips, clip_frames, stride) the frames of those
    # evenly spaced clips (store/clips.py). Both None: every sampled frame (extraction).
    view_frames: int | None = None
    view_clips: tuple[int, int, int] | None = None
    # Or exactly these rows of the sampled frames (a fine-tuning clip, store/clips.py's clip_rows); rows past the
    # end are left out, so a consumer that expects frames checks what it got.
    view_rows: tuple[int, ...] | None = None


def effective(cfg: SamplingConfig) -> dict:
    """The settings that decide the sampled frames (the mode's own value and `max_seconds`).

    This is what the cache records and compares on resume, so changing an unused field is no change.
    """
    value = {"fps": cfg.fps, "every": cfg.every, "num_frames": cfg.num_frames}[cfg.mode]
    return {"mode": cfg.mode, cfg.mode: value, "max_seconds": cfg.max_seconds}


def check(cfg: SamplingConfig) -> None:
    """Refuse settings that cannot select any frame, naming the setting."""
    from vtn.errors import UserError

    if cfg.mode == "fps" and not cfg.fps > 0:
        raise UserError(f"sampling.fps must be > 0, got {cfg.fps}")
    if cfg.mode == "every" and cfg.every < 1:
        raise UserError(f"sampling.every must be >= 1, got {cfg.every}")
    if cfg.mode == "num_frames" and cfg.num_frames < 1:
        raise UserError(f"sampling.num_frames must be >= 1, got {cfg.num_frames}")
    if cfg.max_seconds is not None and not cfg.max_seconds > 0:
        raise UserError(f"sampling.max_seconds must be > 0, got {cfg.max_seconds}")


def video_duration(timestamps: np.ndarray) -> float:
    """Seconds from the first frame's start to the last frame's end.

    The last frame is shown for as long as the frame before it (the container's own last duration is
    not always reliable); a one-frame video lasts 0 s.
    """
    t = np.asarray(timestamps, dtype=np.float64)
    if len(t) < 2:
        return 0.0
    return float(t[-1] - t[0] + (t[-1] - t[-2]))


def sample(timestamps: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """Sorted, distinct indices (int64) of the frames to take, given every frame's start time in seconds.

    `timestamps` are in presentation order and start at 0 (the first frame). A non-empty video always
    gives at least one frame (the first).
    """
    t = np.asarray(timestamps, dtype=np.float64)
    n = len(t)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    limit = n if cfg.max_seconds is None else max(1, int(np.searchsorted(t, cfg.max_seconds - _EPS, side="left")))
    if cfg.mode == "every":
        idx = np.arange(0, limit, cfg.every, dtype=np.int64)
    else:
        end = video_duration(t) if limit == n else float(cfg.max_seconds)
        if cfg.mode == "fps":
            targets = np.arange(0.0, max(end, _EPS), 1.0 / cfg.fps)
        else:
            targets = (np.arange(cfg.num_frames) + 0.5) * (end / cfg.num_frames)
        # The frame on screen at time g is the last one that started at or before g.
        idx = np.searchsorted(t[:limit], targets + _EPS, side="right") - 1
        idx = np.unique(np.clip(idx, 0, limit - 1)).astype(np.int64)
    if cfg.view_rows is not None:
        rows = np.asarray(cfg.view_rows, dtype=np.int64)
        return idx[rows[(rows >= 0) & (rows < len(idx))]]
    if cfg.view_frames is None and cfg.view_clips is None:
        return idx
    from vtn.store.clips import view_rows

    return idx[view_rows(len(idx), cfg.view_clips, cfg.view_frames)]
