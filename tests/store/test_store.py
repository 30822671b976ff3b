import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from store_helpers import CLASSES, D, add, feats, plan

import vtn.store.index as store_index
from vtn.store import CacheWriter, StoreError, consolidate, open_cache
from vtn.store.verify import verify

HERE = Path(__file__).parent


def assert_matches_plan(url, videos):
    cache = open_cache(url)
    assert sorted(cache.ids) == sorted(v[0] for v in videos)
    for vid, length, label, split in videos:
        v = cache.video(vid)
        assert v.features.dtype == np.float16
        assert np.array_equal(v.features.view(np.uint16), feats(vid, length).view(np.uint16))  # bitwise
        assert np.array_equal(v.timestamps, np.arange(length) / 12.5)
        assert np.array_equal(v.frame_indices, np.arange(length) * 2)
        assert (v.label, v.split, v.fps, v.num_frames) == (label, split, 25.0, length * 2)
    return cache


def test_round_trip_and_metadata(make_cache):
    url, videos = make_cache(40)
    cache = assert_matches_plan(url, videos)
    assert cache.class_names == CLASSES and cache.feature_dim == D and cache.dtype == np.float16
    assert cache.attrs["backbone"] == {"name": "test"} and cache.attrs["vtn_schema"] == 1
    assert list(cache.lengths) == [v[1] for v in videos]
    vid, length = videos[3][0], videos[3][1]
    assert np.array_equal(cache.features(vid, 2, 9), feats(vid, length)[2:9])
    assert np.array_equal(cache.features(vid, -3), feats(vid, length)[-3:])
    with pytest.raises(StoreError, match="no video with id 'nope'"):
        cache.video("nope")


def test_load_split_is_contiguous_and_equal(make_cache):
    url, videos = make_cache(30)
    data = open_cache(url).load_split("val")
    val = [v for v in videos if v[3] == "val"]
    assert data.ids == [v[0] for v in val]
    assert data.features.shape == (sum(v[1] for v in val), D) and data.features.flags.c_contiguous
    for i, (vid, length, label, _) in enumerate(val):
        assert np.array_equal(data.features[data.video_rows(i)], feats(vid, length))
        assert np.array_equal(data.frame_indices[data.video_rows(i)], np.arange(length) * 2)
        assert data.labels[i] == label


def test_plain_zarr_reads_the_documented_layout(make_cache):
    url, videos = make_cache(5)
    g = zarr.open_group(url, mode="r")
    idx = next(iter(g["index"].groups()))[1]
    ids = list(idx["id"][:])
    i = ids.index(videos[2][0])
    part = g["parts"][str(idx["part"][i])]
    s, n = int(idx["start"][i]), int(idx["length"][i])
    assert np.array_equal(part["features"][s:s + n], feats(videos[2][0], videos[2][1]))


def test_index_tail_is_visible_without_consolidation(tmp_path, monkeypatch):
    monkeypatch.setattr(store_index, "OLD_INDEX_KEPT_S", 0.0)  # no reader to wait for
    url = str(tmp_path / "c.zarr")
    w = CacheWriter(url, feature_dim=D, class_names=CLASSES)
    add(w, "a/1.mp4", 5, 0, "train")
    w.close()  # consolidated: one video
    w = CacheWriter(url, feature_dim=D, class_names=CLASSES)
    add(w, "a/2.mp4", 7, 1, "train")
    w.flush()  # committed but not consolidated
    assert sorted(open_cache(url).ids) == ["a/1.mp4", "a/2.mp4"]
    assert w.committed_ids() == {"a/1.mp4", "a/2.mp4"}
    w.close()
    assert len(list(zarr.open_group(url, mode="r")["index"].group_keys())) == 1  # older index removed


def test_a_consolidation_keeps_a_recent_older_index_for_readers_still_reading_it(tmp_path, monkeypatch):
    # Three shard tasks closing together: one task's consolidation read the index another's had just replaced,
    # and that other task deleted it under the reader (KeyError: 'part'). A recent older index now stays.
    url = str(tmp_path / "c.zarr")
    for i in range(2):
        with CacheWriter(url, feature_dim=D, class_names=CLASSES) as w:
            add(w, f"a/{i}.mp4", 5, 0, "train")
    old, new = sorted(zarr.open_group(url, mode="r")["index"].group_keys())
    root = zarr.open_group(url, mode="r")
    ids = [root["index"][name]["id"][:].tolist() for name in (old, new)]
    assert ids == [["a/0.mp4"], ["a/0.mp4", "a/1.mp4"]]
    assert sorted(open_cache(url).ids) == ["a/0.mp4", "a/1.mp4"]  # the newest is the one read
    monkeypatch.setattr(store_index, "OLD_INDEX_KEPT_S", 0.0)  # once they are old, the next consolidation removes them
    consolidate(url)
    assert len(list(zarr.open_group(url, mode="r")["index"].group_keys())) == 1


def test_memory_url(tmp_path):
    url = "memory://vtn-test-cache"
    with CacheWriter(url, feature_dim=D, class_names=CLASSES) as w:
        add(w, "x/y.mp4", 300, 2, "train")
    v = open_cache(url).video("x/y.mp4")
    assert np.array_equal(v.features, feats("x/y.mp4", 300))


def test_existing_cache_with_other_settings_is_refused(make_cache):
    url, _ = make_cache(2)
    with pytest.raises(StoreError, match=r"\(backbone.name: cache has 'test', this job has 'other'\)"):
        CacheWriter(url, feature_dim=D, class_names=CLASSES, attrs={"backbone": {"name": "other"}}, identity=("backbone",))
    with pytest.raises(StoreError, match="feature_dim"):
        CacheWriter(url, feature_dim=D * 2, class_names=CLASSES)
    w = CacheWriter(url, feature_dim=8, class_names=["a"], overwrite=True)
    w.close()
    assert len(open_cache(url)) == 0


def test_other_settings_name_only_the_keys_that_differ(tmp_path):
    url = str(tmp_path / "c.zarr")
    backbone = {"name": "vit", "weights_sha256": "ab12" * 16, "preprocessing": {"size": [224, 224], "crop": 0.9}}
    sampling = {"mode": "fps", "fps": 2.0, "max_seconds": None}
    CacheWriter(url, feature_dim=D, class_names=CLASSES, attrs={"backbone": backbone, "sampling": sampling}).close()
    other = {"name": "vit", "weights_sha256": "cd34" * 16, "preprocessing": {"size": [224, 224], "crop": 1.0}}
    with pytest.raises(StoreError) as e:
        CacheWriter(url, feature_dim=D, class_names=CLASSES, identity=("backbone", "sampling"),
                    attrs={"backbone": other, "sampling": {**sampling, "fps": 4.0}})
    message = str(e.value)
    assert (f"(backbone.weights_sha256: cache has '{'ab12' * 16}', this job has '{'cd34' * 16}'; "
            "backbone.preprocessing.crop: cache has 0.9, this job has 1.0; "
            "sampling.fps: cache has 2.0, this job has 4.0)") in message
    assert "'name'" not in message and "size" not in message and "max_seconds" not in message  # no whole dicts
    with pytest.raises(StoreError, match=r"sampling.max_seconds: cache has None, this job has no such setting"):
        CacheWriter(url, feature_dim=D, class_names=CLASSES, identity=("sampling",),
                    attrs={"sampling": {"mode": "fps", "fps": 2.0}})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(features=np.zeros((4, D + 1))), r"'a/new.mp4'.*features must be \[T >= 1, 16\], got \[4, 17\]"),
        (dict(features=np.zeros((0, D))), r"'a/new.mp4'.*features must be"),
        (dict(features=np.full((4, D), np.nan)), r"'a/new.mp4'.*NaN or inf"),
        (dict(features=np.full((4, D), 1e6)), r"'a/new.mp4'.*overflow float16"),
        (dict(label=7), r"'a/new.mp4'.*unknown label 7"),
        (dict(timestamps=np.arange(3)), r"'a/new.mp4'.*4 feature rows but 3 timestamps"),
        (dict(video_id="left/clip_0000.mp4"), r"'left/clip_0000.mp4'.*duplicate id"),
        (dict(video_id="../escape.mp4"), r"'\.\./escape.mp4'.*relative path without '\.\.'"),
        (dict(video_id="/abs/path.mp4"), r"'/abs/path.mp4'.*relative path"),
    ],
)
def test_bad_input_is_refused_and_committed_videos_survive(make_cache, kwargs, match):
    url, videos = make_cache(6)
    w = CacheWriter(url, feature_dim=D, class_names=CLASSES, attrs={"backbone": {"name": "test"}})
    args = dict(video_id="a/new.mp4", features=np.ones((4, D)), timestamps=np.arange(4) / 25, frame_indices=np.arange(4))
    args.update(kwargs)
    with pytest.raises(StoreError, match=match):
        w.add(args["video_id"], args["features"], args["timestamps"], args["frame_indices"], label=kwargs.get("label", 0))
    w.close()
    assert_matches_plan(url, videos)
    assert verify(url, progress=False)[0] == []


def test_not_a_cache_and_other_schema(tmp_path, make_cache):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match=r"plain: not a vtn cache"):
        open_cache(str(tmp_path / "plain"))
    with pytest.raises(StoreError, match=r"plain: not a vtn cache"):
        CacheWriter(str(tmp_path / "plain"), feature_dim=D)
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(StoreError, match="foreign.zarr: not a vtn cache .*no 'vtn_schema'"):
        open_cache(str(tmp_path / "foreign.zarr"))
    url, _ = make_cache(1)
    zarr.open_group(url, mode="r+").attrs["vtn_schema"] = 99
    with pytest.raises(StoreError, match="cache schema version 99"):
        open_cache(url)


def _writer(url, first, last, name, *extra, env=None):
    return subprocess.Popen([sys.executable, str(HERE / "writer_proc.py"), url, str(first), str(last), name, *extra],
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, cwd=HERE,
                            env={**os.environ, **(env or {})})


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 7, 31])
def test_sigkill_mid_write_then_resume(tmp_path, k):
    """Killed in the middle of the commit of video k + 1 (its rows written, not yet visible: writer_proc's pause
    point), the cache holds exactly the first k videos, verifies clean, and a re-run completes it."""
    url, n = str(tmp_path / "c.zarr"), 60
    proc = _writer(url, 0, n, "w", env={"VTN_TEST_PAUSE_AT": str(k)})
    assert proc.stdout.readline().strip() == "ready"
    assert proc.stdout.readline().strip() == f"paused {k}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    videos = plan(n)
    assert len(open_cache(url)) == k
    assert_matches_plan(url, videos[:k])  # exactly the committed prefix, bitwise
    assert verify(url, progress=False)[0] == []
    resumed = _writer(url, 0, n, "resume")
    assert resumed.wait(timeout=120) == 0
    assert_matches_plan(url, videos)
    assert verify(url, progress=False)[0] == []


@pytest.mark.slow
def test_two_writer_processes_at_once(tmp_path):
    url = str(tmp_path / "c.zarr")
    a, b = _writer(url, 0, 30, "a", "no-consolidate"), _writer(url, 30, 60, "b", "no-consolidate")
    assert a.wait(timeout=120) == 0 and b.wait(timeout=120) == 0
    consolidate(url)
    assert_matches_plan(url, plan(60))
    parts = sorted(p.name for p in (Path(url) / "parts").iterdir() if p.is_dir())
    assert [p.split("-")[0] for p in parts] == ["a", "b"]  # one part per writer, never shared
    assert verify(url, progress=False)[0] == []


def _one_shard_file(url):
    return sorted(p for p in Path(url).glob("parts/*/features/c/*/*"))[0]


def test_verify_catches_deleted_chunk(make_cache):
    url, _ = make_cache(10)
    assert verify(url, progress=False)[0] == []
    _one_shard_file(url).unlink()
    problems = verify(url, progress=False)[0]
    assert any("is missing" in p and "features" in p for p in problems)


def test_verify_catches_corrupted_chunk(make_cache):
    url, _ = make_cache(10)
    shard = _one_shard_file(url)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(url, progress=False)[0]
    assert any("checksum mismatch" in p for p in problems)
    with pytest.raises(ValueError, match="checksum"):
        c = open_cache(url)
        for vid in c.ids:
            c.video(vid)


def test_verify_catches_nan_written_behind_our_back(make_cache):
    url, videos = make_cache(3)
    g = zarr.open_group(url, mode="r+")
    part = next(iter(g["parts"].groups()))[1]
    part["features"][1, 0] = np.nan
    assert any("NaN or inf" in p for p in verify(url, progress=False)[0])


def test_failures_are_recorded(tmp_path):
    url = str(tmp_path / "c.zarr")
    with CacheWriter(url, feature_dim=D, class_names=CLASSES) as w:
        add(w, "ok.mp4", 3, 0, "train")
        w.add_failure("bad.mp4", "DecodeError", "moov atom not found")
    assert open_cache(url).failures == [{"id": "bad.mp4", "error": "DecodeError", "message": "moov atom not found"}]
    with CacheWriter(url, feature_dim=D, class_names=CLASSES) as w:  # a retry that succeeds clears it
        add(w, "bad.mp4", 3, 0, "train")
    assert open_cache(url).failures == []
