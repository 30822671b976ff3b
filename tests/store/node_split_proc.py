"""One local rank of a 2-process gloo job loading a split through split_source (JSON on stdout).

Run twice by test_node_split.py with torchrun's environment variables. Reports the process's memory
(/proc/self/smaps_rollup, kB) before and after the load, with every page of the split touched, and what it
mapped. "own" loads each rank's own copy (what every rank did before the node shared one), for the figures.
"""

import hashlib
import json
import os
import sys

import torch.distributed as dist

from vtn.runtime import processes
from vtn.store import open_cache
from vtn.temporal.data import split_source


def memory() -> dict:
    with open("/proc/self/smaps_rollup") as f:
        rows = (line.split() for line in f if line.split()[0].rstrip(":") in ("Rss", "Pss", "Pss_Anon", "Pss_Shmem"))
        return {r[0].rstrip(":"): int(r[1]) for r in rows}


def main(url: str, how: str) -> None:
    procs = processes()
    dist.init_process_group("gloo")
    cache = open_cache(url)
    before = memory()
    data = cache.load_split("train") if how == "own" else split_source(cache, "train", "memory", procs)
    arrays = (data.features, data.timestamps, data.frame_indices)
    h = hashlib.sha256()
    for a in arrays:  # hashed in place (a copy would add to the memory measured); touches every page
        h.update(a)
    checksum = h.hexdigest()
    dist.barrier()  # both ranks hold the split, every page touched, when memory is read
    after = memory()
    dist.barrier()
    print(json.dumps({"rank": procs.rank, "before": before, "after": after, "sha": checksum,
                      "bytes": sum(a.nbytes for a in arrays), "mapped": getattr(data.features, "filename", None),
                      "writeable": bool(data.features.flags.writeable)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
