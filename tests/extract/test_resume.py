"""SIGKILL in the middle of an extraction, then the same command again: bitwise the same cache contents."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from vtn.store import StoreError, open_cache

ARGS = ["--backbone", "resnet18", "--random-init", "--image-size", "64", "--every", "2", "--batch-size", "8",
        "--workers", "1", "--quiet"]


def _committed(out) -> int:
    try:
        return len(open_cache(str(out)).ids)
    except (StoreError, OSError, KeyError, ValueError):
        return 0  # not created yet


def assert_same_contents(a, b):
    ca, cb = open_cache(str(a)), open_cache(str(b))
    assert sorted(ca.ids) == sorted(cb.ids) and ca.class_names == cb.class_names
    for vid in ca.ids:
        va, vb = ca.video(vid), cb.video(vid)
        np.testing.assert_array_equal(va.features, vb.features)  # bitwise
        np.testing.assert_array_equal(va.timestamps, vb.timestamps)
        np.testing.assert_array_equal(va.frame_indices, vb.frame_indices)
        assert (va.label, va.split, va.num_frames) == (vb.label, vb.split, vb.num_frames)


def test_resume_after_sigkill_equals_an_uninterrupted_run(videos, tmp_path, vtn):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    vtn("extract", videos, "--out", whole, *ARGS, check_rc=0)

    # Commit after every video, and kill the job (and its decode workers) once a few are committed.
    cmd = [sys.executable, "-m", "vtn", "extract", str(videos), "--out", str(killed), *ARGS, "--set", "runtime.commit_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while _committed(killed) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _committed(killed)
    assert 3 <= before < 12, before

    rerun = vtn("extract", videos, "--out", killed, *ARGS, check_rc=0)
    assert f"{before} already in the cache" in rerun.stderr or f"{before + 1} already in the cache" in rerun.stderr
    assert_same_contents(whole, killed)
    vtn("store", "verify", killed, check_rc=0)
