"""A writer process for the crash and concurrency tests: writes planned videos (skipping committed ones)."""

import sys

from store_helpers import CLASSES, D, add, plan

from vtn.store import CacheWriter

url, first, last, name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
w = CacheWriter(url, feature_dim=D, class_names=CLASSES, attrs={"backbone": {"name": "test"}}, name=name, commit_every=0)
done = w.committed_ids()
print("ready", flush=True)
for v in plan(last)[first:]:
    if v[0] not in done:
        add(w, *v)  # commit_every=0: every add commits
w.close(consolidate=len(sys.argv) < 6)
print("closed", flush=True)
