"""Shared fixtures: generated videos (small, so the whole folder runs in a couple of minutes on 2 cores)."""

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
