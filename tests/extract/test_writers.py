"""`vtn extract` beside other writers: one job per set of videos, --overwrite that deletes only a cache, a
resume that may not mix settings, a full disk."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_vtn

from vtn.store import CacheWriter, open_cache
from vtn.store.verify import verify

FAST = ["--backbone", "resnet18", "--image-size", "32", "--random-init", "--num-frames", "2", "--quiet"]


@pytest.fixture(scope="module")
def cache(videos, tmp_path_factory):
    """A finished cache of the 4 val videos, copied per test."""
    out = tmp_path_factory.mktemp("writers") / "c"
    run_vtn("extract", videos / "val", "--out", out, *FAST, check_rc=0)
    return out


@pytest.fixture
def copy(cache, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(cache, dst)
    return dst


def _live_job(out):
    """A writer claiming every video of `out`, as a running `vtn extract` holds it."""
    c = open_cache(str(out))
    return CacheWriter(str(out), feature_dim=c.feature_dim, class_names=c.class_names, share=(0, 1))


def test_a_second_job_on_a_live_cache_is_refused(videos, copy, vtn):
    live = _live_job(copy)
    proc = vtn("extract", videos / "val", "--out", copy, *FAST, check_rc=2)
    assert "another writer is writing the same videos" in proc.stderr and "--shard" in proc.stderr
    proc = vtn("extract", videos / "val", "--out", copy, *FAST, "--overwrite", check_rc=2)  # case 7
    assert "a writer is live on this cache" in proc.stderr
    live.close()
    assert len(open_cache(str(copy))) == 4 and verify(str(copy), progress=False)[0] == []
    proc = vtn("extract", videos / "val", "--out", copy, *FAST, check_rc=0)
    assert "4 already in the cache" in proc.stderr


@pytest.mark.slow
def test_a_job_launched_twice_stores_each_video_once(videos, tmp_path):
    out = tmp_path / "c"
    jobs = [subprocess.Popen([sys.executable, "-m", "vtn", "extract", videos, "--out", out, *FAST],
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(j.wait(timeout=300), j.stderr.read()) for j in jobs]
    assert sorted(rc for rc, _ in results) in ([0, 0], [0, 2]), results
    for rc, err in results:
        assert rc == 0 or "another writer is writing the same videos" in err
    cache = open_cache(str(out))
    assert len(cache) == len(set(cache.ids)) == 12
    assert verify(str(out), progress=False)[0] == []


def test_overwrite_removes_only_a_cache(videos, copy, vtn):
    (copy / "notes.txt").write_text("mine")
    (copy / "run").mkdir()
    (copy / "run" / "config.yaml").write_text("x: 1")
    proc = vtn("extract", videos / "val", "--out", copy, *FAST, "--overwrite", check_rc=2)
    assert "notes.txt, run" in proc.stderr and "move them out" in proc.stderr
    assert (copy / "notes.txt").read_text() == "mine" and (copy / "run" / "config.yaml").exists()
    assert len(open_cache(str(copy))) == 4
    (copy / "notes.txt").unlink()
    shutil.rmtree(copy / "run")
    vtn("extract", videos / "val", "--out", copy, *FAST, "--overwrite", check_rc=0)
    assert len(open_cache(str(copy))) == 4


def test_shard_with_overwrite_is_refused(videos, copy, vtn):
    proc = vtn("extract", videos / "val", "--out", copy, *FAST, "--shard", "1/4", "--overwrite", check_rc=2)
    assert "--shard 1/4 with --overwrite" in proc.stderr and "rm -r" in proc.stderr
    assert len(open_cache(str(copy))) == 4


def test_a_resume_may_not_mix_precision_or_id_root(videos, copy, tmp_path, vtn):
    proc = vtn("extract", videos / "val", "--out", copy, *FAST, "--amp", "bf16", check_rc=2)
    assert "precision.amp: cache has 'none', this job has 'bf16'" in proc.stderr
    assert open_cache(str(copy)).attrs["precision"] == {"amp": "none", "compile": False}
    # The same videos under another root would get other ids: the cache would hold each twice.
    shutil.copytree(videos, tmp_path / "other")
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label,split\n" + "".join(
        f"other/val/{p.relative_to(videos / 'val')},{p.parent.name},val\n" for p in sorted((videos / "val").rglob("*.mp4"))))
    proc = vtn("extract", manifest, "--root", tmp_path / "other" / "val", "--out", copy, *FAST, check_rc=2)
    assert "root: cache has" in proc.stderr


def test_disk_full_is_one_line_and_resumable(videos, tmp_path, vtn):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=240k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a small tmpfs (root)")
    try:
        out = mnt / "c"
        args = ["extract", videos / "train", "--out", out, "--backbone", "resnet18", "--image-size", "32",
                "--random-init", "--fps", "30", "--quiet", "--set", "runtime.commit_every=0"]
        # Fresh processes (a timeout asks for one), as a job meets a full disk: no handle of this one holds space.
        proc = vtn(*args, check_rc=2, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "the disk is full" in lines[0] and "run the same command again" in lines[0], lines
        kept = len(open_cache(str(out)))
        vtn(*args, check_rc=2, timeout=300)  # still full: no empty part is left behind
        parts = [p for p in Path(out, "parts").iterdir() if p.is_dir()]
        assert len(parts) == 1 and verify(str(out), progress=False)[0] == []
        assert len(open_cache(str(out))) == kept
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)])  # lazy: this process may still hold a shard file open
