"""Two torchrun processes (gloo on the CPU) give the same cache contents as one process."""

import importlib.util
import os
import signal
import subprocess
import sys

from vtn.store import open_cache

ARGS = ["--backbone", "resnet18", "--random-init", "--image-size", "64", "--num-frames", "6", "--batch-size", "8",
        "--workers", "1", "--no-progress"]


def test_two_ranks_equal_one_process(videos, tmp_path, vtn):
    # The comparison helper lives with the resume test; test files are not importable as modules here.
    spec = importlib.util.spec_from_file_location("resume_helpers", os.path.join(os.path.dirname(__file__), "test_resume.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)

    one, two = tmp_path / "one", tmp_path / "two"
    vtn("extract", videos, "--out", one, *ARGS, check_rc=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vtn", "extract", str(videos), "--out", str(two), *ARGS]
    # Own session, so a hang is cleaned up with every rank and decode worker, not just the launcher.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert "extracted 12 videos" in stderr
    cache = open_cache(str(two))
    parts = {p.name.split("-")[0] for p in (two / "parts").iterdir() if p.is_dir()}
    assert parts == {"rank0", "rank1"}  # each rank wrote its own part
    assert len(cache.ids) == 12
    helpers.assert_same_contents(one, two)
