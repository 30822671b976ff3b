"""A writer that SIGKILLs itself at a chosen point, for the crash tests (a controlled kill point, not a timer).

    kill_proc.py URL flush         commit videos 0..5, add 6..11 (same shard), die half-way through writing
                                   the features shard file of that flush
    kill_proc.py URL create K      commit videos 0..5 with one writer, then die in a second writer's part
                                   creation, after K of the part's arrays exist (0 = right after the group)
    kill_proc.py URL commit        commit videos 0..5, add 6..11, die right after the commit's first write of
                                   the part's attributes (its zarr.json)
    kill_proc.py URL consolidate   commit videos 0..11, die right after the first write of the new index's
                                   attributes
"""

import json
import os
import pathlib
import signal
import sys

import zarr
from store_helpers import CLASSES, D, add, plan

from vtn.store import CacheWriter

url, mode = sys.argv[1], sys.argv[2]
videos = plan(12)


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def writer(name: str) -> CacheWriter:
    return CacheWriter(url, feature_dim=D, class_names=CLASSES, attrs={"backbone": {"name": "test"}}, name=name,
                       commit_every=3600)


if mode == "flush":
    w = writer("w")
    for v in videos[:6]:
        add(w, *v)
    w.flush()  # committed: these rows now live in features shard 0
    for v in videos[6:]:
        add(w, *v)  # the same shard (a shard holds far more rows): the next flush rewrites that shard file
    real_open = pathlib.Path.open

    class HalfWriter:
        """A file that writes half of what it is given, then the process dies: a kill in mid-write."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            data = memoryview(data).cast("B")
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            die()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_and_die(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        parts = self.parts
        if "w" in mode and "features" in parts and parts[parts.index("features") + 1] == "c":
            return HalfWriter(f)  # the features shard file, or the temporary file zarr renames onto it
        return f

    pathlib.Path.open = open_and_die
    w.flush()
    print("flush finished: the kill point was never reached")
    sys.exit(3)

if mode == "create":
    with writer("first") as w:
        for v in videos[:6]:
            add(w, *v)
    arrays_before_kill = int(sys.argv[3])
    real_create = zarr.Group.create_array
    made = []

    def create_and_die(self, *args, **kwargs):
        if len(made) == arrays_before_kill:
            die()
        made.append(1)
        return real_create(self, *args, **kwargs)

    w = writer("second")
    zarr.Group.create_array = create_and_die  # only the part's arrays are created from here on
    add(w, *videos[6])
    w.flush()  # creates the part: dies in there
    print("part created: the kill point was never reached")
    sys.exit(3)

if mode in ("commit", "consolidate"):
    w = writer("w")
    for v in videos[:6]:
        add(w, *v)
    w.flush()
    for v in videos[6:]:
        add(w, *v)
    if mode == "consolidate":
        w.flush()
    real_replace = pathlib.Path.replace
    watched = "parts" if mode == "commit" else "index"

    def replace_and_die(self, target):
        out = real_replace(self, target)
        target = pathlib.Path(target)
        if target.name == "zarr.json" and target.parent.parent.name == watched and json.loads(target.read_text())["attributes"]:
            die()  # the attributes are complete and in place: this is the instant after their first write
        return out

    pathlib.Path.replace = replace_and_die
    w.close()
    print("closed: the kill point was never reached")
    sys.exit(3)
