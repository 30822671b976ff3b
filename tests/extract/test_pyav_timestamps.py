"""PyAV gives every frame its own presentation time and its place among the frames the decoder outputs.

The files are ones where counting packets goes wrong: an MP4 edit list that hides the first frames (the
decoder drops them), and two frames sharing one pts. Each frame's time is checked against the frames' own
pts read independently, and its picture against the source frame it must be.
"""

from fractions import Fraction

import av
import numpy as np
import pytest

import vtn.extract.decode as decode
from vtn import synth
from vtn.extract.sampling import SamplingConfig

FRAMES = 40
SKIP = 3  # frames before the edit list's start


def _own_times(path):
    """Every presented frame's pts in seconds from the first, as PyAV's decoder outputs them."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = np.array([f.pts for f in container.decode(stream)])
        tb = float(stream.time_base)
    return np.round(pts * tb - pts[0] * tb, 6)


def _pyav(path, cfg, monkeypatch):
    monkeypatch.setattr(decode.DecordReader, "max_bytes", 0)  # as for a long file: PyAV reads it
    events = list(decode.decode_video(path, cfg))
    info, chunks = events[0], events[1:]
    assert info.backend == "pyav"
    return (info, np.concatenate([c.frame_indices for c in chunks]), np.concatenate([c.timestamps for c in chunks]),
            np.concatenate([c.frames for c in chunks]))


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory):
    return synth.write_trimmed_video(tmp_path_factory.mktemp("ts") / "trimmed.mp4", synth.counting_frames(FRAMES),
                                     skip=SKIP)


@pytest.mark.parametrize("cfg", [SamplingConfig(mode="every", every=1), SamplingConfig(mode="num_frames", num_frames=5)])
def test_frames_an_edit_list_hides_are_not_counted_and_every_frame_keeps_its_own_time(trimmed, cfg, monkeypatch):
    own = _own_times(trimmed)
    assert len(own) == FRAMES - SKIP  # the file really hides frames: the decoder drops them
    info, idx, times, frames = _pyav(trimmed, cfg, monkeypatch)
    assert info.num_frames == len(own)
    np.testing.assert_array_equal(info.timestamps, own)
    np.testing.assert_array_equal(times, own[idx])
    assert abs(info.fps - 25) < 0.01 and abs(info.duration - len(own) / 25) < 1e-6
    # Frame i is the i-th shown one: source frame SKIP + i (brightness 10 + 5 * its number).
    np.testing.assert_allclose(frames.reshape(len(idx), -1).mean(axis=1), 10 + 5 * (SKIP + idx), atol=2)


def test_two_frames_with_one_pts_are_both_kept_and_no_later_time_shifts(tmp_path, monkeypatch):
    path = synth.write_repeated_pts_video(tmp_path / "repeated.mkv", synth.counting_frames(30), at=6)
    own = _own_times(path)
    assert len(own) == 30 and own[6] == own[5]  # the file really repeats a pts
    info, idx, times, frames = _pyav(path, SamplingConfig(mode="every", every=1), monkeypatch)
    assert info.num_frames == 30
    np.testing.assert_array_equal(info.timestamps, own)
    np.testing.assert_array_equal(idx, np.arange(30))
    np.testing.assert_array_equal(times, own)
    np.testing.assert_allclose(frames.reshape(30, -1).mean(axis=1), 10 + 5 * idx, atol=2)


def test_plain_b_frame_mp4_times_match_decords(tmp_path, monkeypatch):
    # The common case, an edit list that only offsets B-frame reordering: both decoders agree on every time.
    path = synth.write_trimmed_video(tmp_path / "bframes.mp4", synth.counting_frames(30), skip=0)
    by_decord = list(decode.decode_video(path, SamplingConfig(mode="every", every=1)))[0]
    info, idx, times, _ = _pyav(path, SamplingConfig(mode="every", every=1), monkeypatch)
    assert by_decord.backend == "decord"
    np.testing.assert_array_equal(info.timestamps, by_decord.timestamps)
    np.testing.assert_array_equal(times, _own_times(path))
    np.testing.assert_array_equal(times, np.round(np.arange(30) * float(Fraction(1, 25)), 6))
