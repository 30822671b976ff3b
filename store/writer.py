"""CacheWriter: appends videos to its own part of a cache and commits them atomically.

Every writer session gets a fresh part (`parts/<name>-<stamp>-<token>`), so concurrent writers (processes,
torchrun ranks, nodes) never touch the same file, and a resumed job never rewrites what a killed one left.
`add` buffers; `flush` (called by itself every shard's worth of rows or `commit_every` seconds) writes the
rows, then the video-table entries, then the part's attributes: that last single-object write is the commit.
"""

from __future__ import annotations

import contextlib
import errno
import math
import secrets
import time
from datetime import datetime, timezone
from pathlib import PurePosixPath

import numpy as np
import zarr
from zarr.errors import ContainsGroupError

from vtn.errors import UserError
from vtn.paths import check_cache_out, is_vtn_cache
from vtn.store.index import consolidate as _consolidate
from vtn.store.index import read_index
from vtn.store.lease import Lease, check_no_writers
from vtn.store.layout import (
    CHUNK_ROWS,
    SCHEMA_KEY,
    DiskFull,
    SCHEMA_VERSION,
    TABLE_CHUNK,
    TABLE_COLUMNS,
    StoreError,
    compressors,
    feature_chunk_rows,
    open_root,
    rows_per_shard,
    require_group,
)


def check_id(video_id: str) -> str:
    """Ids are relative POSIX paths: no absolute paths, no `..`, nothing empty."""
    if not isinstance(video_id, str) or not video_id.strip():
        raise StoreError(f"video id {video_id!r}: must be a non-empty string")
    p = PurePosixPath(video_id)
    if p.is_absolute() or "\\" in video_id or ".." in p.parts or video_id.startswith("~"):
        raise StoreError(f"video id {video_id!r}: must be a relative path without '..' (ids are paths relative to the input root)")
    return str(p)


def _jsonable(value):
    """Attributes must be JSON: tuples become lists, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _when_created(url: str, storage_options: dict | None, wait_s: float = 10.0):
    """The cache another writer is creating: its zarr.json may still be a temporary for a moment."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return open_root(url, "r+", storage_options)
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class CacheWriter:
    """Write videos into the cache at `url` (created if missing); see store/API.md for the contract."""

    def __init__(
        self,
        url: str,
        *,
        feature_dim: int,
        dtype: str = "float16",
        class_names=(),
        attrs: dict | None = None,
        identity=(),
        overwrite: bool = False,
        name: str = "part",
        create: bool = True,
        commit_every: float = 30.0,
        storage_options: dict | None = None,
        share: tuple[int, int] | None = None,
    ):
        self.url = str(url)
        self.feature_dim = int(feature_dim)
        self.dtype = np.dtype(dtype)
        self.class_names = [str(c) for c in class_names]
        self.commit_every = commit_every
        attrs = _jsonable(dict(attrs or {}))
        self.root = self._open_or_create(attrs, tuple(identity), overwrite, create, storage_options)
        # `share`: the videos this writer claims (store/lease.py); another live writer claiming them is refused.
        self._lease = Lease(self.root, self.url, share)
        try:  # read after claiming: a rival that finished just before is then complete in it
            self._known = set(read_index(self.root)["id"].tolist())
        except BaseException:
            self._lease.release()
            raise
        self._committed_before = len(self._known)
        self._any_commit = False  # this writer's part holds a commit (so a failure must not delete it)
        self._disk_full = False
        self._committed_here: list[str] = []
        self._name = name
        self._shard_rows = rows_per_shard(self.feature_dim, self.dtype.itemsize)
        self.part = None  # created at the first commit, so a run with nothing to do leaves no empty part
        self._rows = self._videos = self._buffered_rows = 0
        self._failures: list[dict] = []
        self._buffer: list[tuple] = []
        self._pending_failures = False
        self._last_commit = time.monotonic()

    # -- opening -----------------------------------------------------------------------------------------
    def _open_or_create(self, attrs, identity, overwrite, create, storage_options):
        expected = {"feature_dim": self.feature_dim, "dtype": self.dtype.name, "class_names": self.class_names}
        try:  # the one output rule (vtn/paths.py): never write into, or replace, anything but a vtn cache
            check_cache_out(self.url, overwrite=overwrite, storage_options=storage_options)
        except UserError as e:
            raise StoreError(str(e)) from None
        if not overwrite:
            try:
                root = open_root(self.url, "r+", storage_options)
            except StoreError:
                if not create:
                    raise
            else:
                self._check_compatible(root.attrs.asdict(), {**expected, **{k: attrs.get(k) for k in identity}})
                return root
        root_attrs = {
            SCHEMA_KEY: SCHEMA_VERSION,
            **attrs,
            **expected,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if overwrite and is_vtn_cache(self.url, storage_options):
            check_no_writers(open_root(self.url, "r+", storage_options), self.url)
        try:
            root = zarr.open_group(self.url, mode="w" if overwrite else "w-", storage_options=storage_options,
                                   attributes=root_attrs)
        except (FileExistsError, ContainsGroupError):  # another writer is creating it: join it once it is there
            root = _when_created(self.url, storage_options)
            self._check_compatible(root.attrs.asdict(), {**expected, **{k: attrs.get(k) for k in identity}})
            return root
        require_group(root, "parts")
        return root

    def _check_compatible(self, have: dict, want: dict) -> None:
        diffs = _differences({k: have.get(k, _MISSING) for k in want}, want)
        if diffs:
            lines = "; ".join(f"{key}: cache has {_short(a)}, this job has {_short(b)}" for key, a, b in diffs)
            raise StoreError(f"{self.url}: existing cache was made with other settings ({lines}); "
                             "use another output or --overwrite to replace it")

    def _create_part(self) -> None:
        name = self._name
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.part_name = f"{name}-{stamp}-{secrets.token_hex(3)}"
        self.part = require_group(self.root, "parts").create_group(self.part_name, attributes={"committed": 0, "rows": 0, "failures": []})
        shard = self._shard_rows
        rows = min(shard, feature_chunk_rows(self.feature_dim, self.dtype.itemsize))
        self._rows_arrays = {
            "features": self.part.create_array("features", shape=(0, self.feature_dim), dtype=self.dtype,
                                               chunks=(rows, self.feature_dim), shards=(shard, self.feature_dim),
                                               compressors=compressors(self.dtype.itemsize), fill_value=np.nan),
            "timestamps": self.part.create_array("timestamps", shape=(0,), dtype=np.float64, chunks=(CHUNK_ROWS,),
                                                 shards=(shard,), compressors=compressors(8), fill_value=np.nan),
            "frame_index": self.part.create_array("frame_index", shape=(0,), dtype=np.int64, chunks=(CHUNK_ROWS,),
                                                  shards=(shard,), compressors=compressors(8), fill_value=-1),
        }
        self._table = {
            col: self.part.create_array(col, shape=(0,), dtype=dt, chunks=(TABLE_CHUNK,), fill_value=fill)
            for col, (dt, fill) in TABLE_COLUMNS.items()
        }

    # -- writing -----------------------------------------------------------------------------------------
    def committed_ids(self) -> set[str]:
        """Every video id committed in the whole cache (all parts, this writer included)."""
        return set(read_index(self.root)["id"].tolist()) | set(self._committed_here)

    def add(self, video_id, features, timestamps, frame_indices, *, label: int = -1, split: str = "train",
            fps: float = float("nan"), duration: float = float("nan"), num_frames: int = -1) -> None:
        """Queue one video; it becomes visible at the next commit. Raises StoreError on bad input."""
        vid = check_id(video_id)
        if vid in self._known:
            raise StoreError(f"video id {vid!r}: already in the cache (duplicate id)")
        x = np.asarray(features.detach().cpu().numpy() if hasattr(features, "detach") else features)
        if x.ndim != 2 or x.shape[1] != self.feature_dim or x.shape[0] < 1:
            raise StoreError(f"video {vid!r}: features must be [T >= 1, {self.feature_dim}], got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise StoreError(f"video {vid!r}: features contain NaN or inf")
        with np.errstate(over="ignore"):  # overflow is reported just below, naming the video
            y = x.astype(self.dtype)
        if not np.isfinite(y).all():
            raise StoreError(f"video {vid!r}: features overflow {self.dtype.name} (largest |value| {np.abs(x).max():.3g})")
        t = np.asarray(timestamps, dtype=np.float64).reshape(-1)
        fi = np.asarray(frame_indices).reshape(-1)
        if len(t) != len(y) or len(fi) != len(y):
            raise StoreError(f"video {vid!r}: {len(y)} feature rows but {len(t)} timestamps and {len(fi)} frame indices")
        if not np.isfinite(t).all():
            raise StoreError(f"video {vid!r}: timestamps contain NaN or inf")
        if fi.dtype.kind not in "iu" or (fi < 0).any():
            raise StoreError(f"video {vid!r}: frame indices must be non-negative integers")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not (label == -1 or 0 <= label < len(self.class_names)):
            raise StoreError(f"video {vid!r}: unknown label {label!r} (the cache has {len(self.class_names)} classes)")
        if not isinstance(split, str) or not split:
            raise StoreError(f"video {vid!r}: split must be a non-empty string")
        self._known.add(vid)
        meta = (vid, split, int(label), float(fps), float(duration), int(num_frames))
        self._buffer.append((meta, y, t, fi.astype(np.int64)))
        self._buffered_rows += len(y)
        if self._buffered_rows >= self._shard_rows or time.monotonic() - self._last_commit >= self.commit_every:
            self.flush()

    def add_failure(self, video_id: str, error: str, message: str) -> None:
        """Record a video that could not be processed; committed with the next flush."""
        self._failures.append({"id": str(video_id), "error": str(error), "message": str(message)[:2000]})
        self._pending_failures = True
        if time.monotonic() - self._last_commit >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        """Commit everything added so far: rows, then video-table entries, then the part attributes."""
        if not self._buffer and not self._pending_failures:
            return
        try:
            self._commit()
        except OSError as e:
            self._out_of_space(e)

    def _out_of_space(self, e: OSError):
        """After an OSError while writing: when the disk or quota is full, stop writing, leave no empty part behind,
        and say in one line what is kept and how to go on; any other error goes on up."""
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise e
        self._disk_full = True
        lost = len(self._buffer)
        self._buffer, self._buffered_rows, self._pending_failures = [], 0, False
        if self.part is not None and not self._any_commit:
            with contextlib.suppress(KeyError, OSError):  # a part with nothing committed is just clutter
                del self.root["parts"][self.part_name]
        kept = self._committed_before + self._videos
        raise DiskFull(f"{self.url}: the disk is full ({e.strerror}); the {kept} videos committed so far are kept "
                         f"({self._videos} by this run), {lost} in progress are not. Free some space and run the "
                         "same command again: it goes on from what is committed") from None

    def _commit(self) -> None:
        if self.part is None:
            self._create_part()
        r1, v1, ids = self._rows, self._videos, ()
        if self._buffer:
            metas, feats, times, frames = zip(*self._buffer)
            r0, r1 = self._rows, self._rows + self._buffered_rows
            self._grow(self._rows_arrays.values(), r1, self._shard_rows)
            self._rows_arrays["features"][r0:r1] = np.concatenate(feats)
            self._rows_arrays["timestamps"][r0:r1] = np.concatenate(times)
            self._rows_arrays["frame_index"][r0:r1] = np.concatenate(frames)
            lengths = np.array([len(f) for f in feats], dtype=np.int64)
            v0, v1 = self._videos, self._videos + len(metas)
            ids, splits, labels, fps, durations, nframes = zip(*metas)
            columns = {
                "id": np.array(ids, dtype=str), "split": np.array(splits, dtype=str),
                "label": np.array(labels, dtype=np.int64), "start": r0 + np.cumsum(lengths) - lengths,
                "length": lengths, "fps": np.array(fps), "duration": np.array(durations),
                "num_frames": np.array(nframes, dtype=np.int64),
            }
            self._grow(self._table.values(), v1, TABLE_CHUNK)
            for col, values in columns.items():
                self._table[col][v0:v1] = values
        # One write of the part's metadata (zarr's attrs.update would write it once per key: a kill in between
        # would leave a committed count without its row count). The videos count as committed only once it is
        # written: a full disk before then must not report them kept.
        self.part = self.part.update_attributes({"committed": v1, "rows": r1, "failures": self._failures})
        self._rows, self._videos, self._any_commit = r1, v1, True
        self._committed_here.extend(ids)
        self._buffer, self._buffered_rows, self._pending_failures = [], 0, False
        self._last_commit = time.monotonic()

    @staticmethod
    def _grow(arrays, needed: int, step: int) -> None:
        """Allocate whole shards/chunks ahead so the metadata is rewritten rarely."""
        for arr in arrays:
            if arr.shape[0] < needed:
                arr.resize((math.ceil(needed / step) * step, *arr.shape[1:]))

    def close(self, consolidate: bool = True) -> None:
        """Commit what is buffered and (by default) write the consolidated index; then leave `writers/`."""
        try:
            if self._disk_full:  # nothing more can be written; what is committed is complete without an index
                return
            self.flush()
            if consolidate:
                try:
                    _consolidate(self.root)
                except OSError as e:
                    self._out_of_space(e)
        finally:
            self._lease.release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # On an error, keep what was complete: commit it, but leave consolidation to the next clean close.
        self.close(consolidate=exc_type is None)


_MISSING = object()  # a key one side lacks


def _differences(have, want, key: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, cache value, job value) for every leaf that differs, descending into dicts on both sides.

    A cache's settings are big nested dicts (backbone identity, preprocessing, sampling); naming only the
    leaves that differ tells the user what to change.
    """
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for k in [*want, *(k for k in have if k not in want)]:
            out += _differences(have.get(k, _MISSING), want.get(k, _MISSING), f"{key}.{k}" if key else str(k))
        return out
    if have is not _MISSING and want is not _MISSING and _jsonable(have) == _jsonable(want):
        return []
    return [(key, have, want)]


def _short(value, limit: int = 80) -> str:
    """repr of a setting, cut to `limit` characters (a class list of thousands of names would bury the rest)."""
    if value is _MISSING:
        return "no such setting"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def consolidate(url: str, storage_options: dict | None = None) -> int:
    """Consolidate the index of the cache at `url` (after several writers closed with consolidate=False)."""
    return _consolidate(open_root(url, "r+", storage_options))
