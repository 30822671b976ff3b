"""A writer process for the crash and concurrency tests: writes planned videos (skipping committed ones)."""

import os
import sys

import zarr
from store_helpers import CLASSES, D, add, plan

from vtn.store import CacheWriter

# A controlled kill point for the crash test: with VTN_TEST_PAUSE_AT=K the writer stops in the middle of the commit
# that would make K + 1 videos visible (that video's rows and table entries written, the part's attributes not),
# says "paused K" and waits there for the SIGKILL. The test does not depend on the machine's speed.
PAUSE_AT = os.environ.get("VTN_TEST_PAUSE_AT")
if PAUSE_AT is not None:
    real_update = zarr.Group.update_attributes

    def update_attributes(group, new_attributes):
        if new_attributes.get("committed") == int(PAUSE_AT) + 1:
            print(f"paused {PAUSE_AT}", flush=True)
            sys.stdin.readline()  # until killed
        return real_update(group, new_attributes)

    zarr.Group.update_attributes = update_attributes

url, first, last, name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
w = CacheWriter(url, feature_dim=D, class_names=CLASSES, attrs={"backbone": {"name": "test"}}, name=name, commit_every=0)
done = w.committed_ids()
print("ready", flush=True)
for v in plan(last)[first:]:
    if v[0] not in done:
        add(w, *v)  # commit_every=0: every add commits
w.close(consolidate=len(sys.argv) < 6)
print("closed", flush=True)
