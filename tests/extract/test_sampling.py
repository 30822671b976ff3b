"""Sampling by time, unit level and end to end (stored timestamps and frame indices match the container)."""

from dataclasses import replace

import av
import numpy as np
import pytest

from vtn.extract.sampling import SamplingConfig, sample
from vtn.store import open_cache

BACKBONE = ["--backbone", "resnet18", "--random-init", "--image-size", "64"]


def test_every_fps_num_frames_on_regular_timestamps():
    t = np.arange(50) / 25.0  # 2 s at 25 fps
    np.testing.assert_array_equal(sample(t, SamplingConfig(mode="every", every=10)), [0, 10, 20, 30, 40])
    np.testing.assert_array_equal(sample(t, SamplingConfig(mode="fps", fps=5)), np.arange(0, 50, 5))
    # 4 frames at the centres of 4 half-second segments: 0.25, 0.75, 1.25, 1.75 s.
    np.testing.assert_array_equal(sample(t, SamplingConfig(mode="num_frames", num_frames=4)), [6, 18, 31, 43])
    np.testing.assert_array_equal(sample(t, SamplingConfig(mode="fps", fps=2, max_seconds=1.0)), [0, 12])


def test_variable_rate_uses_real_times_and_never_repeats_a_frame():
    t = np.array([0.0, 0.01, 0.02, 0.5, 0.9, 1.0])
    # On screen at 0, 0.25, 0.5, 0.75, 1.0 s: frames 0, 2, 3, 3, 5 -> each once.
    np.testing.assert_array_equal(sample(t, SamplingConfig(mode="fps", fps=4)), [0, 2, 3, 5])
    np.testing.assert_array_equal(sample(t, SamplingConfig(mode="num_frames", num_frames=100)), np.arange(6))
    assert len(sample(t[:1], SamplingConfig(mode="num_frames", num_frames=3))) == 1


def _container_times(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        pts = sorted(p.pts for p in c.demux(s) if p.pts is not None and p.size)
        return (np.array(pts, dtype=np.float64) - pts[0]) * float(s.time_base)


@pytest.mark.parametrize("flags", [["--every", "3"], ["--fps", "7"], ["--num-frames", "5"], ["--fps", "4", "--max-seconds", "0.8"]])
def test_stored_timestamps_match_the_container(videos, tmp_path, flags, vtn):
    out = tmp_path / "cache"
    vtn("extract", videos, "--out", out, *BACKBONE, *flags, "--workers", "1", "--quiet", check_rc=0)
    cache = open_cache(str(out))
    mode = {"--every": "every", "--fps": "fps", "--num-frames": "num_frames"}[flags[0]]
    cfg = SamplingConfig(mode=mode, **{mode: type(getattr(SamplingConfig, mode))(flags[1])},
                         max_seconds=float(flags[3]) if len(flags) > 2 else None)
    assert cache.attrs["sampling"]["mode"] == mode
    for vid in cache.ids:
        v = cache.video(vid)
        times = _container_times(videos / vid)
        expected = sample(np.round(times, 6), cfg)
        np.testing.assert_array_equal(v.frame_indices, expected)
        np.testing.assert_allclose(v.timestamps, times[expected], atol=1e-6)
        assert v.num_frames == len(times)
        if cfg.max_seconds:
            assert v.timestamps.max() < cfg.max_seconds


def test_containers_without_a_frame_count_get_real_counts_and_times(tmp_path, vtn):
    """Matroska and MPEG-TS headers carry no frame count (PyAV reads 0); counts and times come from the packets."""
    from vtn import synth

    rng = np.random.default_rng(3)
    frames = [np.full((48, 64, 3), 4 * i, np.uint8) for i in range(64)]
    for name, vfr in [("a.mkv", True), ("b.ts", True), ("c.mkv", False)]:
        times = synth.frame_times(2.4, 25, vfr, rng)
        synth.write_video(tmp_path / "in" / name, frames[: len(times)], times, 25, vfr=vfr)
        with av.open(str(tmp_path / "in" / name)) as c:
            assert c.streams.video[0].frames == 0  # the header does not say
    vtn("extract", tmp_path / "in", "--out", tmp_path / "cache", *BACKBONE, "--fps", "10", "--workers", "1",
        "--quiet", check_rc=0)
    cache = open_cache(str(tmp_path / "cache"))
    assert sorted(cache.ids) == ["a.mkv", "b.ts", "c.mkv"]
    for vid in cache.ids:
        v = cache.video(vid)
        times = _container_times(tmp_path / "in" / vid)
        expected = sample(np.round(times, 6), SamplingConfig(mode="fps", fps=10.0))
        assert v.num_frames == len(times)
        np.testing.assert_array_equal(v.frame_indices, expected)
        np.testing.assert_allclose(v.timestamps, times[expected], atol=1e-6)


def test_a_mode_added_to_the_registry_is_sampled_checked_recorded_and_accepted_by_the_config(monkeypatch):
    from vtn.config import ConfigError, merge
    from vtn.errors import UserError
    from vtn.extract import sampling
    from vtn.extract.config import ExtractConfig

    with pytest.raises(ConfigError, match=r"sampling.mode: 'last' is not one of \['fps', 'every', 'num_frames'\]"):
        merge(ExtractConfig(), {"sampling": {"mode": "last"}})
    # The last N frames, N in the num_frames field.
    monkeypatch.setitem(sampling.MODES, "last", sampling.Mode(
        "num_frames", lambda v: v >= 2, ">= 2", lambda t, end, n: np.arange(max(0, len(t) - n), len(t)),
        lambda frames, seconds, n: float(min(frames, n))))
    cfg = merge(ExtractConfig(), {"sampling": {"mode": "last", "num_frames": 3}}).sampling
    np.testing.assert_array_equal(sample(np.arange(10) / 5, cfg), [7, 8, 9])
    np.testing.assert_array_equal(sample(np.arange(10) / 5, replace(cfg, max_seconds=1.0)), [2, 3, 4])
    assert sampling.effective(cfg) == {"mode": "last", "num_frames": 3, "max_seconds": None}
    assert sampling.estimate(cfg, 100, 4.0) == 3.0
    with pytest.raises(UserError, match=r"^sampling.num_frames must be >= 2, got 1$"):
        sampling.check(replace(cfg, num_frames=1))


@pytest.mark.parametrize("cfg, message", [
    (SamplingConfig(mode="fps", fps=0.0), "sampling.fps must be > 0, got 0.0"),
    (SamplingConfig(mode="fps", fps=float("nan")), "sampling.fps must be > 0, got nan"),
    (SamplingConfig(mode="every", every=0), "sampling.every must be >= 1, got 0"),
    (SamplingConfig(mode="num_frames", num_frames=0), "sampling.num_frames must be >= 1, got 0"),
    (SamplingConfig(mode="every", max_seconds=0.0), "sampling.max_seconds must be > 0, got 0.0"),
])
def test_settings_that_select_no_frame_are_refused_naming_the_setting(cfg, message):
    from vtn.errors import UserError
    from vtn.extract.sampling import check

    with pytest.raises(UserError) as raised:
        check(cfg)
    assert str(raised.value) == message
    check(replace(cfg, fps=1.0, every=1, num_frames=1, max_seconds=None))


def test_estimates_from_a_header_per_mode():
    from vtn.extract.sampling import estimate

    assert estimate(SamplingConfig(mode="every", every=4), 250, 10.0) == 62.5
    assert estimate(SamplingConfig(mode="every", every=400), 250, 10.0) == 1.0
    assert estimate(SamplingConfig(mode="fps", fps=2), 250, 10.0) == 20.0
    assert estimate(SamplingConfig(mode="fps", fps=50), 250, 10.0) == 250
    assert estimate(SamplingConfig(mode="num_frames", num_frames=16), 250, 10.0) == 16.0
