"""The processes of a torchrun job on one node share one in-memory copy of a split (temporal/data.py node_split)."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from store_helpers import CLASSES, add, plan

from vtn.store import CacheWriter, open_cache

HERE = Path(__file__).parent


def run_ranks(url: str, how: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(HERE / "node_split_proc.py"), url, how], cwd=HERE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return [json.loads(out.splitlines()[-1]) for out, _ in outs]


@pytest.mark.slow  # two processes importing torch: 15-30 s on the shared 2 cores
def test_two_local_ranks_share_one_copy(tmp_path):
    url = str(tmp_path / "cache.zarr")
    with CacheWriter(url, feature_dim=1024, class_names=CLASSES) as w:  # 33 MiB of train features
        for v in plan(60):
            add(w, *v)
    split = open_cache(url).load_split("train")
    arrays = (split.features, split.timestamps, split.frame_indices)
    want = hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()
    mb = sum(a.nbytes for a in arrays) / 2**20

    ranks = run_ranks(url, "shared")
    assert [r["sha"] for r in ranks] == [want, want]  # bitwise the single-process load
    assert ranks[0]["mapped"] and ranks[0]["mapped"] == ranks[1]["mapped"]  # both map the one file...
    assert not Path(ranks[0]["mapped"]).parent.exists()  # ...whose folder is gone at the end
    assert not any(r["writeable"] for r in ranks)
    grew = [(r["after"]["Pss"] - r["before"]["Pss"]) / 1024 for r in ranks]
    # one copy between the two: rank 1 only maps rank 0's pages, so its proportional share is about half the
    # split (its own copy, as every rank loaded before, would be all of it)
    assert grew[1] < 0.7 * mb, (grew, mb, ranks)
