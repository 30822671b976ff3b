"""Scale-out: two torchrun processes (gloo on the CPU), or three job-array tasks, give the same cache contents as one process."""

import importlib.util
import os
import re
import signal
import subprocess
import sys

import pytest
from cli_runner import run_vtn

from vtn.store import open_cache

ARGS = ["--backbone", "resnet18", "--random-init", "--image-size", "64", "--num-frames", "6", "--batch-size", "8",
        "--workers", "1", "--quiet"]


def _resume_helpers():
    """The comparison helper lives with the resume test; test files are not importable as modules here."""
    spec = importlib.util.spec_from_file_location("resume_helpers", os.path.join(os.path.dirname(__file__), "test_resume.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    return helpers


def _extract_two_ranks(videos, out, *args) -> str:
    """`vtn extract` under torchrun with 2 ranks; asserts success and returns stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vtn", "extract", str(videos), "--out", str(out), *args]
    # Own session, so a hang is cleaned up with every rank and decode worker, not just the launcher.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


@pytest.fixture(scope="module")
def one(videos, tmp_path_factory):
    """The cache one process makes of the 12 videos: what every split of the work must equal."""
    out = tmp_path_factory.mktemp("one") / "cache"
    run_vtn("extract", videos, "--out", out, *ARGS, check_rc=0)
    return out


def test_two_ranks_equal_one_process(videos, one, tmp_path):
    helpers = _resume_helpers()
    two = tmp_path / "two"
    stderr = _extract_two_ranks(videos, two, *ARGS)
    assert "extracted 12 videos" in stderr
    cache = open_cache(str(two))
    parts = {p.name.split("-")[0] for p in (two / "parts").iterdir() if p.is_dir()}
    assert parts == {"rank0", "rank1"}  # each rank wrote its own part
    assert len(cache.ids) == 12
    helpers.assert_same_contents(one, two)


@pytest.mark.slow
def test_job_array_shards_started_together_equal_one_process(videos, one, tmp_path, vtn):
    helpers = _resume_helpers()
    sharded = tmp_path / "sharded"
    # Three independent tasks at once, as a job array starts them: they race to create the cache, then share it.
    tasks = [subprocess.Popen([sys.executable, "-m", "vtn", "extract", str(videos), "--out", str(sharded), *ARGS,
                               "--shard", f"{k}/3"], stderr=subprocess.PIPE, text=True) for k in range(3)]
    stderr = [t.communicate(timeout=240)[1] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0, 0], stderr
    counts = [int(re.search(r"extracted (\d+) videos", e).group(1)) for e in stderr]
    assert sum(counts) == 12 and min(counts) > 0
    helpers.assert_same_contents(one, sharded)
    # Re-running one task finds its own share done, and only its share.
    proc = vtn("extract", videos, "--out", sharded, *ARGS, "--shard", "1/3", check_rc=0)
    assert "extracted 0 videos" in proc.stderr and f"{counts[1]} already in the cache" in proc.stderr
    for bad in ("3/3", "1-3"):
        assert "--shard" in vtn("extract", videos, "--out", sharded, *ARGS, "--shard", bad, check_rc=2).stderr


@pytest.mark.slow
def test_ranks_that_finish_long_before_the_others_do_not_time_out(tmp_path):
    from vtn import synth

    videos = tmp_path / "videos"
    synth.make_video(videos / "a" / "long.mp4", synth.CLASSES[0], seconds=90, fps=25, size=(64, 64))
    for i in range(2):  # the other rank's share: done in a moment
        synth.make_video(videos / "a" / f"short{i}.mp4", synth.CLASSES[0], seconds=1, fps=25, size=(64, 64))
    stderr = _extract_two_ranks(videos, tmp_path / "cache", "--backbone", "resnet18", "--random-init", "--image-size",
                                "64", "--workers", "0", "--quiet", "--set", "runtime.dist_timeout=3")
    seconds = float(re.search(r"frames in ([\d.]+) s", stderr).group(1))
    assert seconds > 6  # rank 1 waited for rank 0 far longer than the 3 s collective timeout
    assert len(open_cache(str(tmp_path / "cache")).ids) == 3


# A rank as a cluster launcher (srun, mpirun) starts it: no torchrun agent to end the others when one fails. The
# OSError is injected where rank 0 alone checks --out, before any rank has written anything.
FAILING_RANK = """
import os, sys
import vtn.extract.job as job
def broken(*args, **kwargs):
    raise OSError(5, "injected disk failure")
if os.environ["RANK"] == "0":
    job.check_cache_out = broken
from vtn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _two_ranks_from_script(script: str, *args) -> tuple[list, list[str], float]:
    """Run `script` (the CLI with something injected) as ranks 0 and 1 of a job, each started on its own as a cluster
    launcher does; returns the processes, their stderr and the seconds until both ended."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    start = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stderr=subprocess.PIPE, text=True,
                              start_new_session=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        stderr = [p.communicate(timeout=60)[1] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return ranks, stderr, time.monotonic() - start


def test_an_error_on_rank0_ends_every_rank_at_once_with_its_message(videos, tmp_path):
    ranks, stderr, seconds = _two_ranks_from_script(FAILING_RANK, "extract", videos, "--out", tmp_path / "cache",
                                                    *ARGS, "--set", "runtime.dist_timeout=600")
    assert seconds < 60
    for p, err in zip(ranks, stderr):
        assert p.returncode != 0
        assert "injected disk failure" in err, err[-2000:]
    assert "rank 0 failed: OSError" in stderr[1]
    assert not (tmp_path / "cache").exists()


# Rank 1 fails after storing its first video; rank 0 stores one video every 4 s, so its share of 6 would take it
# more than 20 s: it must stop at rank 1's failure instead, with rank 1's message.
FAILING_MIDWAY = """
import os, sys, time
import vtn.extract.job as job
real = job.extract_many
def injected(entries, backbones, device, cfg, store, fail, **kwargs):
    stored = []
    def store_then_fail(k, entry, *args):
        if os.environ["RANK"] == "1" and stored:
            raise OSError(5, "injected disk failure on rank 1")
        store(k, entry, *args)
        stored.append(entry.id)
        if os.environ["RANK"] == "0":
            time.sleep(4)
    real(entries, backbones, device, cfg, store_then_fail, fail, **kwargs)
job.extract_many = injected
from vtn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_error_on_any_rank_midway_ends_every_rank_within_seconds_with_its_message(videos, tmp_path, vtn):
    out = tmp_path / "cache"
    ranks, stderr, seconds = _two_ranks_from_script(FAILING_MIDWAY, "extract", videos, "--out", out, *ARGS,
                                                    "--set", "runtime.dist_timeout=600")
    for p, err in zip(ranks, stderr):
        assert p.returncode != 0, err[-2000:]
        assert "injected disk failure on rank 1" in err, err[-2000:]
    assert "rank 1 failed: OSError" in stderr[0]
    # What both ranks committed before they stopped is kept: rank 1's first video, rank 0's first one or two.
    vtn("store", "verify", out, "--quiet", check_rc=0)
    kept = len(open_cache(str(out)).ids)
    assert 2 <= kept <= 4 and seconds < 60, (kept, seconds)  # rank 0 stopped at least 3 videos (12 s) early
