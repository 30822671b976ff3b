"""Frame sampling by time: which of a video's frames to run the backbone on.

Sampling maps target times to frame indices through the frames' real timestamps (from the container's
presentation times), never through an assumed constant frame rate, so variable-frame-rate files and files
whose header misstates the frame count are sampled correctly. Nothing is re-encoded.

Modes (`MODES`, one entry each):
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
from typing import Any, Callable, Literal

import numpy as np

# Tolerance for comparing times: container timestamps are exact ticks, float seconds are not.
_EPS = 1e-6


@dataclass(frozen=True)
class Mode:
    """One sampling mode: the `SamplingConfig` field holding its value, the values it accepts, the frames it picks."""

    field: str  # the cache records the value under this name
    valid: Callable[[Any], bool]
    rule: str  # what `valid` asks, for the error message: "sampling.FIELD must be RULE"
    # (timestamps of the frames before max_seconds, their end in seconds, the value) -> sorted distinct indices
    pick: Callable[[np.ndarray, float, Any], np.ndarray]
    # (frames, seconds, value) -> about how many frames it picks, from a container header (balancing ranks)
    estimate: Callable[[float, float, Any], float]


def _on_screen(t: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The frames on screen at the times `targets`, each once."""
    # The frame on screen at time g is the last one that started at or before g.
    idx = np.searchsorted(t, targets + _EPS, side="right") - 1
    return np.unique(np.clip(idx, 0, len(t) - 1)).astype(np.int64)


# Every sampling mode, by name: adding one is an entry here (with its value field in SamplingConfig) and its flag
# in extract/cli.py, the name with dashes (--num-frames).
MODES: dict[str, Mode] = {
    "fps": Mode("fps", lambda v: v > 0, "> 0",
                lambda t, end, fps: _on_screen(t, np.arange(0.0, max(end, _EPS), 1.0 / fps)),
                lambda n, seconds, fps: max(1.0, min(n, seconds * fps))),
    "every": Mode("every", lambda v: v >= 1, ">= 1",
                  lambda t, end, k: np.arange(0, len(t), k, dtype=np.int64),
                  lambda n, seconds, k: max(1.0, n / k)),
    "num_frames": Mode("num_frames", lambda v: v >= 1, ">= 1",
                       lambda t, end, n: _on_screen(t, (np.arange(n) + 0.5) * (end / n)),
                       lambda n, seconds, count: float(min(n, count))),
}


@dataclass(frozen=True)
class SamplingConfig:
    """Which frames to take. Only the field of the chosen mode matters (see `effective`)."""

    # A name in MODES: the annotation is evaluated when a config is read, so it lists the modes registered then.
    mode: Literal[tuple(MODES)] = "every"
    fps: float = 1.0
    every: int = 1
    num_frames: int = 16
    max_seconds: float | None = None
    # What a predictor decodes of the sampled frames, not part of a cache's sampling: up to `view_frames` spread
    # over the video (the `full` view), or with `view_clips` = (clips, clip_frames, stride) the frames of those
    # evenly spaced clips (store/clips.py). Both None: every sampled frame (extraction).
    view_frames: int | None = None
    view_stride: int = 1  # the `full` view takes one sampled frame in this many (model.view_stride)
    view_clips: tuple[int, int, int] | None = None
    # Or exactly these rows of the sampled frames (a fine-tuning clip, store/clips.py's clip_rows); rows past the
    # end are left out, so a consumer that expects frames checks what it got.
    view_rows: tuple[int, ...] | None = None


def effective(cfg: SamplingConfig) -> dict:
    """The settings that decide the sampled frames (the mode's own value and `max_seconds`).

    This is what the cache records and compares on resume, so changing an unused field is no change.
    """
    field = MODES[cfg.mode].field
    return {"mode": cfg.mode, field: getattr(cfg, field), "max_seconds": cfg.max_seconds}


def check(cfg: SamplingConfig) -> None:
    """Refuse settings that cannot select any frame, naming the setting."""
    from vtn.errors import UserError

    mode = MODES[cfg.mode]
    value = getattr(cfg, mode.field)
    if not mode.valid(value):
        raise UserError(f"sampling.{mode.field} must be {mode.rule}, got {value}")
    if cfg.max_seconds is not None and not cfg.max_seconds > 0:
        raise UserError(f"sampling.max_seconds must be > 0, got {cfg.max_seconds}")


def estimate(cfg: SamplingConfig, frames: float, seconds: float) -> float:
    """About how many frames `cfg` picks of a video of `frames` frames over `seconds` (already cut to max_seconds),
    as a container header tells them: no decoding."""
    mode = MODES[cfg.mode]
    return mode.estimate(frames, seconds, getattr(cfg, mode.field))


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
    end = video_duration(t) if limit == n else float(cfg.max_seconds)
    mode = MODES[cfg.mode]
    idx = mode.pick(t[:limit], end, getattr(cfg, mode.field))
    if cfg.view_rows is not None:
        rows = np.asarray(cfg.view_rows, dtype=np.int64)
        return idx[rows[(rows >= 0) & (rows < len(idx))]]
    if cfg.view_frames is None and cfg.view_clips is None:
        return idx
    from vtn.store.clips import view_rows

    return idx[view_rows(len(idx), cfg.view_clips, cfg.view_frames, cfg.view_stride)]
