"""Open descriptors stay bounded whatever the number of shard files (a Kinetics-sized cache has thousands)."""

import json
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from store_helpers import CLASSES, D, add, feats

import vtn.store.rows as rows
import vtn.store.writer as writer
from vtn.store import CacheWriter, open_cache

HERE = Path(__file__).parent


def small_shards(monkeypatch, url: str, videos: int, shard: int, length: tuple[int, int]) -> list[tuple[str, int]]:
    """A cache whose shards hold `shard` rows (1 chunk), so a few thousand rows make thousands of files."""
    monkeypatch.setattr(writer, "CHUNK_ROWS", shard)
    monkeypatch.setattr(writer, "rows_per_shard", lambda dim, itemsize: shard)
    rng = np.random.default_rng(0)
    plan = [(f"{CLASSES[i % 3]}/clip_{i:04d}.mp4", int(rng.integers(*length))) for i in range(videos)]
    with CacheWriter(url, feature_dim=D, class_names=CLASSES) as w:
        for i, (vid, n) in enumerate(plan):
            add(w, vid, n, i % 3, "val" if i % 4 == 0 else "train")
    return plan


def shard_files(url: str) -> int:
    return sum(len(names) for d, _, names in os.walk(url) if os.sep + "c" + os.sep in d + os.sep)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1


def test_threaded_reads_of_many_shards_keep_at_most_the_cap_open(tmp_path, monkeypatch):
    url = str(tmp_path / "c.zarr")
    plan = small_shards(monkeypatch, url, 12, 8, (30, 60))
    assert shard_files(url) > 3 * 40
    monkeypatch.setattr(rows.HANDLES, "cap", 4)
    before = open_fds()
    cache = open_cache(url)
    with ThreadPoolExecutor(4) as pool:  # shared handles under concurrent reads: each read gets its own file's rows
        got = list(pool.map(lambda v: cache.features(v[0]), plan * 3))
    for (vid, n), x in zip(plan * 3, got):
        assert np.array_equal(x, feats(vid, n))
    split = cache.load_split(None, threads=4)
    assert np.array_equal(split.features[split.video_rows(5)], feats(*plan[5]))
    assert open_fds() - before <= 4


@pytest.mark.slow  # ~30 s on 2 loaded cores: writing 2,000 shard files, then a child process with loader workers
def test_a_cache_of_thousands_of_shards_loads_streams_and_verifies_under_ulimit_128(tmp_path, monkeypatch):
    url = str(tmp_path / "c.zarr")
    small_shards(monkeypatch, url, 40, 8, (100, 200))
    assert shard_files(url) >= 2000
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))  # noqa: E731
    proc = subprocess.run([sys.executable, str(HERE / "fds_proc.py"), url, "2"], cwd=HERE, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for stage in ("load", "stream", "verify"):
        assert out[stage]["ok"], out[stage]["error"]
        assert out[stage]["after"] <= out["before"] + 64 + 8, out  # the cap under ulimit -n 128


def test_the_cap_on_open_shard_files_follows_the_descriptor_limit(monkeypatch):
    for soft, cap in ((128, 64), (1024, 128), (4096, 512), (20000, 1024), (resource.RLIM_INFINITY, 1024)):
        monkeypatch.setattr(resource, "getrlimit", lambda _, soft=soft: (soft, soft))
        assert rows._open_files() == cap
