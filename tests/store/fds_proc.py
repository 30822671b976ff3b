"""Load, stream an epoch from and verify a cache, reporting per stage success and open descriptors (JSON on stdout).

Run by test_fds.py in a child process under a low `ulimit -n`; "peak" is the most descriptors any process held
(a sampling thread here, each item's count in the loader workers), "after" what this process holds at the end.
"""

import gc
import json
import os
import sys
import threading
import time

import torch

from vtn.store import ClipDataset, LengthBucketSampler, collate_clips, open_cache
from vtn.store.verify import verify


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir holds
    except OSError:  # none left to count with
        return -1


class Counting(ClipDataset):
    def __getitem__(self, i):
        return {**super().__getitem__(i), "fds": open_fds()}


def collate(items):
    return collate_clips(items), max(x["fds"] for x in items)


def main(url: str, workers: int) -> None:
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], open_fds())
            time.sleep(0.001)

    threading.Thread(target=sample, daemon=True).start()
    out = {"before": open_fds()}

    def stage(name, fn):
        peak[0] = 0
        try:
            extra = fn()
            out[name] = {"ok": True}
        except OSError as e:
            extra = 0
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        gc.collect()  # each stage on its own: what a failed one left open is closed with its cache
        time.sleep(0.01)
        out[name].update(peak=max(peak[0], extra or 0), after=open_fds())

    def load():
        cache = open_cache(url)
        split = cache.load_split("train")
        assert len(split.ids) == len(cache.split_ids("train"))

    def stream():
        ds = Counting(open_cache(url), "train", clip_frames=8, stride=2, train=True)
        batches = LengthBucketSampler(ds.sample_lengths(), batch_size=16, seed=0)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=workers)
        n, most = 0, 0
        for batch, fds in loader:
            n += len(batch["ids"])
            most = max(most, fds)
        assert n == len(ds)
        return most

    def check():
        problems, _ = verify(url, progress=False)
        assert problems == [], problems

    stage("load", load)
    stage("stream", stream)
    stage("verify", check)
    stop.set()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
