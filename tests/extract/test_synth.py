import av
import decord
import numpy as np
import pytest

from vtn.extract import synth


@pytest.mark.parametrize("a,b", [("left_to_right", "right_to_left"), ("red_then_green", "green_then_red")])
def test_classes_differ_only_in_time_order(a, b):
    # A frame of one class at time t is the frame of its twin at time D - t: the same frames, reversed.
    bg = np.full((48, 64, 3), 30, np.uint8)
    for t in (0.1, 0.37, 0.8, 1.3):
        np.testing.assert_array_equal(synth.render_frame(a, t, 1.5, 64, 48, bg), synth.render_frame(b, 1.5 - t, 1.5, 64, 48, bg))
    assert not np.array_equal(synth.render_frame(a, 0.2, 1.5, 64, 48, bg), synth.render_frame(b, 0.2, 1.5, 64, 48, bg))


def test_dataset_is_real_h264_with_varied_rates_sizes_and_vfr(videos):
    paths = sorted(videos.rglob("*.mp4"))
    assert len(paths) == 12
    rates, sizes, vfr = set(), set(), 0
    for p in paths:
        with av.open(str(p)) as c:
            s = c.streams.video[0]
            assert s.codec_context.name == "h264"
            sizes.add((s.codec_context.width, s.codec_context.height))
        vr = decord.VideoReader(str(p))
        gaps = np.diff(vr.get_frame_timestamp(np.arange(len(vr)))[:, 0])
        if gaps.max() - gaps.min() > 1e-3:
            vfr += 1
        else:
            rates.add(round(1 / gaps.mean()))
    assert vfr == 3 and len(rates) >= 2 and len(sizes) >= 2


def test_bad_files_are_written(bad_files):
    assert set(bad_files) == set(synth.BAD_KINDS)
    assert bad_files["zero_byte"].stat().st_size == 0
