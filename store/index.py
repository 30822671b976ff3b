"""The video index: which videos a cache holds and where their rows are.

Each part's video table is the truth; `index/<stamp>` is a consolidated copy of all of them, so opening
a cache of many parts costs one group of reads. Videos committed after the newest consolidation (a writer
killed before it closed) are read from their parts' tails, so readers always see exactly the committed
videos.
"""

from __future__ import annotations

import secrets
import time
import warnings

import numpy as np

from vtn.store.layout import TABLE_COLUMNS, StoreError, require_group
from vtn.store.rows import damaged, missing_chunks


# An older consolidated index is deleted only once it is this old: a reader that found it newest a moment ago
# may still be reading it (deleting it then made that reader fail, or read missing chunks as fill values).
OLD_INDEX_KEPT_S = 60.0


def child_groups(group) -> list:
    """[(name, group)] of the groups inside `group`, listed afresh.

    fsspec file systems (s3fs, gcsfs, ...) cache directory listings and share one instance per URL within a
    process, so without dropping that cache a process that once listed `parts/` would never see a part
    another writer added later: re-opening the cache would not show its videos, and a consolidation (rank 0
    after the other ranks committed) would leave its part out of the index.

    Leftover `zarr.<hex>.partial` files (zarr's own atomic write of a zarr.json, its writer killed in the middle)
    are not groups; zarr warns about each on every listing, which tells the user nothing, so that warning is
    silenced here. They are harmless and `vtn store verify` does not count them as damage.
    """
    fs = getattr(group.store, "fs", None)
    if fs is not None:
        fs.invalidate_cache()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Object at .*\.partial is not recognized")
        return list(group.groups())


def part_states(root) -> dict[str, dict]:
    """{part name: its attributes (committed, rows, failures)} for every part in the cache."""
    if "parts" not in root:
        return {}
    return {name: dict(g.attrs) for name, g in child_groups(root["parts"])}


def newest_index(root):
    """The newest complete consolidated index group, or None."""
    if "index" not in root:
        return None
    groups = sorted(child_groups(root["index"]), key=lambda kv: kv[0], reverse=True)
    for _, g in groups:
        if g.attrs.get("complete"):
            return g
    return None


def lost_entries(array, name: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """[(a, b)] committed entries [lo, hi) of table column `name` whose chunk is absent: lost, not fill values.

    zarr writes no chunk whose values all equal the fill value, so an absent chunk of `label` (-1) or `fps` (NaN)
    may be a chunk of unlabeled videos. Only the columns whose fill value no committed video can hold tell: an
    empty id, split or part name, a negative start, a length below 1. (The consolidated index fills with 0, a
    valid start: its `start` column cannot tell.)
    """
    fill = array.fill_value
    telling = (fill == "") if name in ("id", "split", "part") else (fill < 0) if name == "start" else (
        fill < 1) if name == "length" else False
    return missing_chunks(array, lo, hi) if telling else []


def read_columns(group, lo: int, hi: int, names, allow_lost: bool = False) -> dict[str, np.ndarray]:
    """Entries [lo, hi) of the table columns `names` of `group` (a part, or a consolidated index).

    The entries must be committed ones: a lost chunk among them is a StoreError naming the group, the column and
    the entries (a video whose id read as "" would be a ghost, and extraction would add its video again), unless
    `allow_lost` (`vtn store verify`, which reports the losses itself).
    """
    out = {}
    for name in names:
        array = group[name]
        lost = [] if allow_lost else lost_entries(array, name, lo, hi)
        if lost:
            a, b = lost[0]
            raise StoreError(f"{group.path}/{name}: entries {a}..{b - 1} of the video table cannot be read: their "
                             f"chunk file is missing; {damaged(group.store)}")
        values = array[lo:hi]
        out[name] = np.asarray(values.tolist(), dtype=object) if TABLE_COLUMNS.get(name, (str,))[0] is str else values
    return out


def read_index(root, parts: dict[str, dict] | None = None) -> dict[str, np.ndarray]:
    """All committed videos as columns (id, split, label, start, length, fps, duration, num_frames, part)."""
    parts = part_states(root) if parts is None else parts
    names = list(TABLE_COLUMNS)
    pieces = []
    covered: dict[str, int] = {}
    idx = newest_index(root)
    if idx is not None:
        covered = {p: n for p, n in idx.attrs["parts"].items() if p in parts}
        n = int(idx.attrs["videos"])
        cols = read_columns(idx, 0, n, names + ["part"])
        if len(covered) != len(idx.attrs["parts"]):  # a part was deleted since: drop its rows
            keep = np.isin(cols["part"], list(covered))
            cols = {k: v[keep] for k, v in cols.items()}
        pieces.append(cols)
    for name, state in sorted(parts.items()):
        lo, hi = covered.get(name, 0), int(state.get("committed", 0))
        if hi > lo:
            cols = read_columns(root["parts"][name], lo, hi, names)
            cols["part"] = np.full(hi - lo, name, dtype=object)
            pieces.append(cols)
    if not pieces:
        empty = {k: np.empty(0, dtype=object if dt is str else dt) for k, (dt, _) in TABLE_COLUMNS.items()}
        return {**empty, "part": np.empty(0, dtype=object)}
    return {k: np.concatenate([p[k] for p in pieces]) for k in names + ["part"]}


def consolidate(root) -> int:
    """Write a fresh consolidated index of every committed video; return the number of videos.

    Each consolidation writes a new `index/<stamp>` group and then removes the older complete ones that are more
    than OLD_INDEX_KEPT_S old, so concurrent consolidations never write the same file, a reader always finds a
    complete index, and one that is reading an index (another writer's consolidation, a job array's tasks closing
    together) does not see it deleted under it.
    """
    parts = part_states(root)
    cols = read_index(root, parts)
    n = len(cols["id"])
    stamp = f"{time.time_ns():020d}-{secrets.token_hex(3)}"
    g = require_group(root, "index").create_group(stamp)
    for name, values in cols.items():
        dtype = str if values.dtype == object else values.dtype
        arr = g.create_array(name, shape=(n,), chunks=(max(1, min(n, 65536)),), dtype=dtype,
                             fill_value="" if dtype is str else None)
        if n:
            arr[:] = values.astype(str) if dtype is str else values
    # One metadata write (attrs.update writes once per key: "complete" could land without the rest).
    g.update_attributes({"complete": True, "videos": n, "parts": {p: int(s.get("committed", 0)) for p, s in parts.items()}})
    now = time.time_ns()
    for name, old in child_groups(root["index"]):
        old_enough = name < stamp and (now - int(name.split("-")[0])) / 1e9 > OLD_INDEX_KEPT_S
        if old_enough and old.attrs.get("complete"):
            del root["index"][name]
    return n
