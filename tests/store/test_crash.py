"""Kills at controlled points (not timers): committed videos survive, verify is clean, a resumed writer completes."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from store_helpers import CLASSES, D, add, plan
from test_store import assert_matches_plan

from vtn.store import CacheWriter
from vtn.store.verify import verify

HERE = Path(__file__).parent


def _killed(url: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(HERE / "kill_proc.py"), url, *args], cwd=HERE,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, f"the writer was not killed at the kill point: {proc.stdout}{proc.stderr}"


def _resume_and_check(url: str, committed: int) -> None:
    videos = plan(12)
    assert_matches_plan(url, videos[:committed])  # every committed video, bitwise; nothing else
    assert verify(url, progress=False)[0] == []
    with CacheWriter(url, feature_dim=D, class_names=CLASSES, attrs={"backbone": {"name": "test"}}, name="resume") as w:
        done = w.committed_ids()
        for v in videos:
            if v[0] not in done:
                add(w, *v)
    assert_matches_plan(url, videos)
    assert verify(url, progress=False)[0] == []


def test_kill_mid_flush_rewriting_a_shard_keeps_committed_videos(tmp_path):
    # The second flush rewrites features shard 0, which holds the 6 committed videos; the writer dies with
    # half of that file written. With writes in place (zarr < 3.1.3) the committed rows were lost.
    url = str(tmp_path / "c.zarr")
    _killed(url, "flush")
    _resume_and_check(url, committed=6)


@pytest.mark.parametrize("arrays_before_kill", [0, 3])
def test_kill_while_creating_a_part_leaves_a_clean_cache(tmp_path, arrays_before_kill):
    # The second writer dies after its part group exists but before all its arrays do: the part holds nothing,
    # and verify must not report it (it once did, for ever).
    url = str(tmp_path / "c.zarr")
    _killed(url, "create", str(arrays_before_kill))
    second = [p for p in (Path(url) / "parts").iterdir() if p.name.startswith("second-")]
    assert len(second) == 1 and not (second[0] / "id").exists()  # the kill point was inside part creation
    _resume_and_check(url, committed=6)


@pytest.mark.parametrize("mode", ["commit", "consolidate"])
def test_kill_after_the_first_metadata_write_of_a_commit_or_an_index(tmp_path, mode):
    # A commit (the part's attributes) and a consolidation (the index's) are each one metadata write. zarr's
    # attrs.update writes once per key, so a kill after the first write left a part whose committed count
    # disagreed with its row count, or an index marked complete without its contents. One write: the commit
    # of videos 6..11 is whole.
    url = str(tmp_path / "c.zarr")
    _killed(url, mode)
    _resume_and_check(url, committed=12)


def test_files_left_by_a_metadata_write_killed_midway_are_read_past_without_warnings(make_cache):
    # zarr writes zarr.json through a temporary zarr.<hex>.partial beside it; a kill in between leaves that file
    # in the group's folder, and zarr then warned on every listing of the cache ("not recognized").
    url, videos = make_cache(6)
    for folder in ("parts", "index"):
        (Path(url) / folder / "zarr.0123abcd.partial").write_bytes(b'{"zarr_format": 3, "node_t')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_matches_plan(url, videos)
        assert verify(url, progress=False)[0] == []
