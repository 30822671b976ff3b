"""Shared fixtures: generated videos (small, so the whole folder runs in a couple of minutes on 2 cores)."""

import subprocess
import sys

import pytest

from vtn import synth

@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """`split/class/NNNN.mp4`: 2 train + 1 val per class, 4 classes (12 videos, one in four variable-rate)."""
    root = tmp_path_factory.mktemp("videos")
    synth.make_dataset(root, per_split={"train": 2, "val": 1}, seconds=(1.0, 2.0), seed=1)
    return root


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory):
    return synth.make_bad_files(tmp_path_factory.mktemp("bad"))


def _vtn(*args, check_rc=None, **kw):
    proc = subprocess.run([sys.executable, "-m", "vtn", *map(str, args)], capture_output=True, text=True, **kw)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr[-3000:]
    return proc


@pytest.fixture
def vtn():
    """Run the `vtn` CLI in a fresh process, as users do: vtn(*args, check_rc=N) -> CompletedProcess."""
    return _vtn
