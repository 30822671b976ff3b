import os

import pytest
import torch


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
    # The slow tests first: xdist hands tests out in this order, so a minutes-long demo collected last no longer
    # runs alone on one worker while the other has finished (longest first packs the two workers evenly).
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
