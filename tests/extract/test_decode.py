"""Which decoder reads a video: decord for small ones, PyAV where decord's read-ahead could hold too much."""

import numpy as np
import pytest

import vtn.extract.decode as decode
from vtn import synth
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
    monkeypatch.setattr(decode.DecordReader, "max_bytes", info.num_frames * info.width * info.height * 3 - 1)
    info2, idx2, frames2 = _read(path)
    assert info2.backend == "pyav" and info2.num_frames == info.num_frames
    np.testing.assert_array_equal(idx2, idx)
    np.testing.assert_array_equal(info2.timestamps, info.timestamps)
    assert np.abs(frames2.astype(int) - frames.astype(int)).mean() < 1.0  # both libavcodec; RGB conversion may round apart


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotated_videos_come_out_upright_from_both_decoders(tmp_path, monkeypatch, degrees):
    frames = np.zeros((4, 32, 64, 3), np.uint8)
    frames[:, :8, :16] = 255  # a white block in the top-left corner
    path = synth.set_rotation(synth.write_video(tmp_path / "phone.mp4", list(frames), [i / 10 for i in range(4)], 10),
                              degrees)
    info, _, by_decord = _read(path)
    monkeypatch.setattr(decode.DecordReader, "max_bytes", 0)
    info2, _, by_pyav = _read(path)
    assert (info.backend, info2.backend) == ("decord", "pyav")
    expected = np.rot90(frames[0], -degrees // 90)  # shown turned clockwise
    for got in (by_decord, by_pyav):
        assert got.shape[1:] == expected.shape
        assert np.abs(got[0].astype(int) - expected.astype(int)).mean() < 8  # lossy H.264 of a hard edge


def test_a_one_frame_video_has_the_containers_frame_rate_and_duration(tmp_path, monkeypatch):
    import av

    path = synth.write_video(tmp_path / "one.mp4", [np.zeros((48, 64, 3), np.uint8)], [0.0], 25)
    with av.open(str(path)) as container:
        rate, seconds = float(container.streams.video[0].average_rate), container.duration / 1e6
    info = next(decode.decode_video(path, SamplingConfig(mode="every", every=1)))
    monkeypatch.setattr(decode.DecordReader, "max_bytes", 0)
    info2 = next(decode.decode_video(path, SamplingConfig(mode="every", every=1)))
    assert (info.backend, info2.backend) == ("decord", "pyav")
    for got in (info, info2):
        assert got.num_frames == 1 and (got.fps, got.duration) == (rate, seconds) == (25.0, 0.04)


class _Grey:
    """A reader registered by a test: every file is a 3-frame video of grey 7s (or, failing, no video at all)."""

    backend, library, max_bytes, fails = "grey", "numpy", None, False

    def __init__(self, path, threads=1, alive=None):
        if self.fails:
            raise decode.NotAVideo(f"{path}: not grey")
        self.info = decode._info([0.0, 0.1, 0.2], 8, 6, self.backend, 10.0)

    def read(self, indices, chunk_bytes=decode.DEFAULT_CHUNK_BYTES):
        yield decode.Chunk(indices, self.info.timestamps[indices], np.full((len(indices), 6, 8, 3), 7, np.uint8))


def test_a_reader_added_to_the_registry_is_tried_first_recorded_and_used_for_figures(videos, monkeypatch):
    from vtn.evaluate.frames import read_frames

    path = next(videos.rglob("*.mp4"))
    assert decode.decoder_attrs()["primary"] == "decord" and decode.decoder_attrs()["fallback"] == "pyav"
    monkeypatch.setattr(decode, "READERS", (_Grey, *decode.READERS))
    decode.load_readers()
    info, idx, frames = _read(path)
    assert info.backend == "grey" and idx.tolist() == [0, 2] and (frames == 7).all()
    assert (read_frames(path, np.array([1]), height=6)[0] == 7).all()
    assert decode.decoder_attrs()["primary"] == "grey" and decode.decoder_attrs()["fallback"] == "decord, pyav"
    # One that cannot read the file hands it to the next in order.
    monkeypatch.setattr(_Grey, "fails", True)
    assert _read(path)[0].backend == "decord"
