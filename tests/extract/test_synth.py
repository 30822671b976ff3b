import av
import decord
import numpy as np

from vtn import synth


def _frames(cls, n=16, duration=1.6):
    bg = np.full((48, 64, 3), 30, np.uint8)
    return [synth.render_frame(cls, (k + 0.5) * duration / n, duration, 64, 48, bg) for k in range(n)]


def test_classes_show_the_same_frames_in_different_orders():
    # Sampled evenly, every class gives the same multiset of frames, so mean-pooling cannot tell them apart.
    reference = _frames(synth.CLASSES[0])
    for cls in synth.CLASSES[1:]:
        frames = _frames(cls)
        assert sorted(f.tobytes() for f in frames) == sorted(f.tobytes() for f in reference)
        assert any(not np.array_equal(a, b) for a, b in zip(frames, reference))  # ...in another order


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
