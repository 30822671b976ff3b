import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # cli_runner, for tests and their helper modules (importlib mode adds no test dirs)
from cli_runner import run_vtn  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist each worker gets its own share of the cores (and its subprocesses inherit it): two
    workers that each run torch on every core would spend much of the suite fighting over them."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = sorted(os.sched_getaffinity(0))
    if worker and 1 < count <= len(cores):
        mine = cores[int(worker.removeprefix("gw"))::count]  # gw0, gw1, ...: one core in every `count`
        os.sched_setaffinity(0, mine)
        os.environ["OMP_NUM_THREADS"] = str(len(mine))
        torch.set_num_threads(len(mine))


def pytest_collection_modifyitems(config, items):
    # The files with slow tests first: xdist hands whole files out in this order, so a minutes-long demo collected
    # last no longer runs alone on one worker while the other has finished (longest first packs the two workers
    # evenly). A file's tests stay together, so its module fixtures are built once, with or without xdist.
    slow = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _tensorboard_only_where_asked(request, monkeypatch):
    """Runs write TensorBoard events when the package is installed, which costs about a second a run (best/'s
    confusion figure at the end); in this process only the tests marked `tensorboard` write them."""
    if "tensorboard" not in request.keywords:
        monkeypatch.setattr("vtn.temporal.tensorboard.installed", lambda: False)


@pytest.fixture
def vtn():
    """vtn(*args, check_rc=N, cwd=None) -> CompletedProcess: the CLI as users run it (see run_vtn)."""
    return run_vtn
