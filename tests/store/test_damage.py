"""A damaged cache (a lost shard file or chunk, a flipped byte, a lost video-table chunk) is refused by every reader
with one message naming the part, the array and the rows, and pointing at `vtn store verify`; never read as fill
values (NaN features and timestamps, frame index -1, id "")."""

import re
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr
from cli_runner import run_vtn as vtn
from store_helpers import CLASSES, D

from vtn.store import CacheWriter, ClipDataset, StoreError, open_cache
from vtn.store.layout import ROW_ARRAYS
from vtn.store.rows import RowReader
from vtn.store.verify import verify


TINY_TRAIN = ["--set", "model.hidden_size=16", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
              "--set", "model.intermediate_size=32", "--set", "model.attention_window=4", "--frames", "8", "--batch-size", "4"]


def part_of(url) -> str:
    (part,) = [p.name for p in (Path(url) / "parts").iterdir() if p.is_dir()]
    return part


def shard_file(url, name) -> Path:
    (path,) = [p for p in (Path(url) / "parts").glob(f"*/{name}/c/**/*") if p.is_file()]
    return path


def assert_refused_by_every_reader(url, tmp_path, match):
    """In-memory load (what train does when the split fits), streaming, and `vtn store export`: each refuses."""
    with pytest.raises(StoreError, match=match):
        open_cache(url).load_split()
    stream = ClipDataset(open_cache(url), clip_frames=4)
    with pytest.raises(StoreError, match=match):
        for i in range(len(stream)):
            stream[i]
    out = tmp_path / "out.h5"
    r = vtn("store", "export", url, "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    error = r.stderr.strip().splitlines()[-1]  # one line, after the progress bar
    assert error.startswith("vtn store: error: ") and re.search(match, error), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".h5", ".partial")) == []  # nothing left


@pytest.mark.parametrize("name", ROW_ARRAYS)
def test_a_lost_shard_file_is_refused_by_every_reader(make_cache, tmp_path, name):
    url, _ = make_cache(10)
    shard_file(url, name).unlink()
    part = part_of(url)
    match = rf"parts/{part}/{name} rows \d+\.\.\d+ cannot be read: shard file .* is missing; .*`vtn store verify {re.escape(url)}`"
    assert_refused_by_every_reader(url, tmp_path, match)
    assert any(f"parts/{part}/{name}: shard file" in p for p in verify(url, progress=False)[0])


def test_a_lost_chunk_inside_a_shard_is_refused(make_cache):
    url, _ = make_cache(6)  # > 256 rows: two chunks in the one shard
    path = shard_file(url, "features")
    raw = bytearray(path.read_bytes())
    reader = RowReader(zarr.open_group(url, mode="r")["parts"][part_of(url)]["features"])
    n = reader.chunks_per_shard * 16 + 4
    index = np.frombuffer(bytes(raw[-n:-4]), dtype="<u8").reshape(-1, 2).copy()
    index[1] = 2**64 - 1  # the shard index says chunk 1 was never written
    raw[-n:] = index.tobytes() + google_crc32c.value(index.tobytes()).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"chunk 1 \(rows 256\.\.511\) is missing; the cache is damaged;"):
        open_cache(url).load_split()


def test_plain_zarr_arrays_refuse_a_lost_chunk_too(tmp_path):
    # Arrays with other codecs are read through zarr, which would give fill values for a chunk file that is gone.
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=(12, 3), chunks=(4, 3), dtype="f4")
    arr[:] = np.ones((12, 3))
    (tmp_path / "a.zarr" / "c" / "1" / "0").unlink()
    reader = RowReader(zarr.open_array(str(tmp_path / "a.zarr"), mode="r"))
    assert not reader.fast and np.array_equal(reader.read(0, 4), np.ones((4, 3)))
    with pytest.raises(StoreError, match=r"rows 4\.\.7 cannot be read: their chunk file is missing"):
        reader.read(2, 12)


def test_a_lost_shard_is_refused_by_vtn_train(make_cache, tmp_path):
    # Before: exit 0 with a NaN loss and the advice to lower optim.lr.
    url, _ = make_cache(12)
    shard_file(url, "features").unlink()
    r = vtn("train", url, "--out", str(tmp_path / "run"), *TINY_TRAIN)
    assert r.returncode == 2, r.stderr
    assert re.search(rf"vtn train: error: parts/{part_of(url)}/features rows \d+\.\.\d+ cannot be read: .*vtn store verify", r.stderr)
    assert "Traceback" not in r.stderr


def test_a_flipped_byte_is_one_message_and_export_leaves_no_partial(make_cache, tmp_path):
    url, _ = make_cache(10)
    path = shard_file(url, "features")
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    match = rf"parts/{part_of(url)}/features rows \d+\.\.\d+ cannot be read: .* chunk \d+ \(rows .*\): chunk checksum mismatch; .*vtn store verify"
    assert_refused_by_every_reader(url, tmp_path, match)


def test_a_lost_video_table_chunk_is_reported_and_refused(make_cache):
    # Before: verify exited 0 listing a video whose id is "", and extraction added its video again (a ghost).
    url, _ = make_cache(10)
    shutil.rmtree(Path(url) / "index")
    part = part_of(url)
    (Path(url) / "parts" / part / "id" / "c" / "0").unlink()
    problems = verify(url, progress=False)[0]
    assert f"parts/{part}/id: entries 0..9 of the video table are missing (chunk file absent)" in problems
    assert f"parts/{part}: entry 0 of the video table: video id '': must be a non-empty string" in problems
    r = vtn("store", "verify", url, "--quiet")
    assert r.returncode == 1 and "parts/" in r.stdout and "id '': must be a non-empty string" in r.stdout
    match = rf"parts/{part}/id: entries 0\.\.9 of the video table cannot be read: .*`vtn store verify {re.escape(url)}`"
    with pytest.raises(StoreError, match=match):
        open_cache(url)
    with pytest.raises(StoreError, match=match):  # a writer (extract's resume) refuses too: it adds no ghost
        CacheWriter(url, feature_dim=D, class_names=CLASSES, attrs={"backbone": {"name": "test"}})


def test_columns_all_fill_values_are_not_damage(tmp_path):
    # zarr writes no chunk whose values all equal the fill value: unlabeled videos (label -1, fps NaN) in a part,
    # and first-of-their-part videos (start 0) in the consolidated index, have no chunk, and that is no loss.
    url = str(tmp_path / "c.zarr")
    for i in range(2):
        with CacheWriter(url, feature_dim=D) as w:
            w.add(f"v{i}.mp4", np.ones((3, D)), np.arange(3.0), np.arange(3))
    c = open_cache(url)
    assert sorted(c.ids) == ["v0.mp4", "v1.mp4"] and list(c.labels) == [-1, -1] and list(c.index["start"]) == [0, 0]
    assert verify(url, progress=False)[0] == []
