"""Which decoder reads a video: decord for small ones, PyAV where decord's read-ahead could hold too much."""

import numpy as np

import vtn.extract.decode as decode
from vtn.extract.sampling import SamplingConfig


def _read(path):
    events = list(decode.decode_video(path, SamplingConfig(mode="every", every=2)))
    info, chunks = events[0], events[1:]
    return info, np.concatenate([c.frame_indices for c in chunks]), np.concatenate([c.frames for c in chunks])


def test_videos_too_big_for_decords_read_ahead_go_to_pyav_with_the_same_frames(videos, monkeypatch):
    path = next(videos.rglob("*.mp4"))
    info, idx, frames = _read(path)
    assert info.backend == "decord"
    # The same file, as if it were long: every frame decoded would not fit in the budget.
    monkeypatch.setattr(decode, "DECORD_MAX_BYTES", info.num_frames * info.width * info.height * 3 - 1)
    info2, idx2, frames2 = _read(path)
    assert info2.backend == "pyav" and info2.num_frames == info.num_frames
    np.testing.assert_array_equal(idx2, idx)
    np.testing.assert_array_equal(info2.timestamps, info.timestamps)
    assert np.abs(frames2.astype(int) - frames.astype(int)).mean() < 1.0  # both libavcodec; RGB conversion may round apart
