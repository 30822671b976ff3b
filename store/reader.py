"""Reading a cache: the index without features, one video, a slice of frames, or a whole split in memory."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from vtn.store.index import part_states, read_index
from vtn.store.layout import ROW_ARRAYS, StoreError, open_root
from vtn.store.rows import RowReader


@dataclass(frozen=True)
class Video:
    id: str
    features: np.ndarray  # [T, D]
    timestamps: np.ndarray  # [T] seconds
    frame_indices: np.ndarray  # [T]
    label: int
    split: str
    fps: float
    duration: float
    num_frames: int


@dataclass(frozen=True)
class SplitData:
    """A whole split in memory: video v's frames are rows offsets[v]:offsets[v+1] of the row arrays."""

    ids: list[str]
    labels: np.ndarray  # [V]
    offsets: np.ndarray  # [V + 1]
    features: np.ndarray  # [N, D]
    timestamps: np.ndarray  # [N]
    frame_indices: np.ndarray  # [N]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def video_rows(self, v: int) -> slice:
        return slice(int(self.offsets[v]), int(self.offsets[v + 1]))


class FeatureCache:
    """A read-only view of a cache; see store/layout.py for what is on disk."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = str(url)
        self.root = open_root(self.url, "r", storage_options)
        self.attrs: dict = self.root.attrs.asdict()
        self._parts = part_states(self.root)
        self.index = read_index(self.root, self._parts)
        self._row = {vid: i for i, vid in enumerate(self.index["id"].tolist())}
        self._readers: dict[tuple[str, str], RowReader] = {}

    # -- metadata, no feature reads ----------------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        return self.index["id"].tolist()

    @property
    def labels(self) -> np.ndarray:
        return self.index["label"]

    @property
    def splits(self) -> list[str]:
        return self.index["split"].tolist()

    @property
    def lengths(self) -> np.ndarray:
        return self.index["length"]

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs.get("class_names", []))

    @property
    def feature_dim(self) -> int:
        return int(self.attrs["feature_dim"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.attrs["dtype"])

    @property
    def failures(self) -> list[dict]:
        """Recorded failures, the latest per id, leaving out ids that were committed later (a retry succeeded)."""
        latest = {}
        for name in sorted(self._parts):
            for f in self._parts[name].get("failures", []):
                latest[f["id"]] = f
        return [f for vid, f in sorted(latest.items()) if vid not in self._row]

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._row

    def split_ids(self, split: str) -> list[str]:
        return self.index["id"][self.index["split"] == split].tolist()

    # -- features ----------------------------------------------------------------------------------------
    def _reader(self, part: str, name: str) -> RowReader:
        key = (part, name)
        if key not in self._readers:
            self._readers[key] = RowReader(self.root["parts"][part][name])
        return self._readers[key]

    def _locate(self, video_id: str) -> tuple[int, str, int, int]:
        """(index entry, part, first row, end row) of one video."""
        try:
            i = self._row[video_id]
        except KeyError:
            raise StoreError(f"{self.url}: no video with id {video_id!r}") from None
        s = int(self.index["start"][i])
        return i, self.index["part"][i], s, s + int(self.index["length"][i])

    def features(self, video_id: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames [start, stop) of one video's features."""
        _, part, s, e = self._locate(video_id)
        a, b, _ = slice(start, stop).indices(e - s)
        return self._reader(part, "features").read(s + a, s + max(a, b))

    def timeline(self, video_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(timestamps [T], frame indices [T]) of one video, without its features."""
        _, part, s, e = self._locate(video_id)
        return self._reader(part, "timestamps").read(s, e), self._reader(part, "frame_index").read(s, e)

    def video(self, video_id: str) -> Video:
        """One video: features, timestamps, frame indices and metadata."""
        i, part, s, e = self._locate(video_id)
        feats, times, frames = (self._reader(part, name).read(s, e) for name in ROW_ARRAYS)
        return Video(
            id=video_id, features=feats, timestamps=times, frame_indices=frames,
            label=int(self.index["label"][i]), split=str(self.index["split"][i]), fps=float(self.index["fps"][i]),
            duration=float(self.index["duration"][i]), num_frames=int(self.index["num_frames"][i]),
        )

    def load_split(self, split: str | None = None, threads: int | None = None, folder: str | None = None,
                   fill: bool = True) -> SplitData:
        """Every video of `split` (None: all) as one contiguous array plus offsets, in index order.

        With `folder`, the row arrays are .npy files there, returned memory-mapped read-only, so that processes
        mapping the same files share one copy of the pages: `fill` reads the cache into them; `fill=False` maps
        files that another process has filled."""
        sel = np.flatnonzero(self.index["split"] == split) if split is not None else np.arange(len(self))
        lengths = self.index["length"][sel]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        n = int(offsets[-1])
        shapes = {"features": ((n, self.feature_dim), self.dtype), "timestamps": ((n,), np.float64),
                  "frame_index": ((n,), np.int64)}
        if folder is not None:
            path = {name: os.path.join(folder, f"{name}.npy") for name in shapes}
            if fill:
                out = {name: np.lib.format.open_memmap(path[name], "w+", dtype, shape)
                       for name, (shape, dtype) in shapes.items()}
                self._fill(sel, lengths, offsets, out, threads)
                for arr in out.values():
                    arr.flush()
            out = {name: np.load(path[name], mmap_mode="r") for name in shapes}
        else:
            out = {name: np.empty(shape, dtype) for name, (shape, dtype) in shapes.items()}
            self._fill(sel, lengths, offsets, out, threads)
        return SplitData(
            ids=self.index["id"][sel].tolist(), labels=self.index["label"][sel].copy(), offsets=offsets,
            features=out["features"], timestamps=out["timestamps"], frame_indices=out["frame_index"],
        )

    def _fill(self, sel: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, out: dict, threads: int | None) -> None:
        """Reads the rows of index entries `sel` into the row arrays `out`, video m at offsets[m]:offsets[m+1]."""
        threads = threads or min(8, os.cpu_count() or 1)
        parts = self.index["part"][sel]
        for part in np.unique(parts):
            mine = np.flatnonzero(parts == part)  # positions within sel, in index order
            starts = self.index["start"][sel[mine]]
            src = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths[mine])]) if len(mine) else np.empty(0, np.int64)
            dst = np.concatenate([np.arange(offsets[m], offsets[m + 1]) for m in mine])
            for name, arr in out.items():
                _gather(self._reader(part, name), src, dst, arr, threads)


def _gather(reader: RowReader, src: np.ndarray, dst: np.ndarray, out: np.ndarray, threads: int) -> None:
    """out[dst] = rows src of the reader's array; reads shard-sized blocks so temporary memory stays bounded."""
    if len(src) == 0:
        return
    if src[-1] - src[0] + 1 == len(src) and dst[-1] - dst[0] + 1 == len(dst):  # one contiguous run: read in place
        reader.read(int(src[0]), int(src[-1]) + 1, out=out[dst[0]:dst[-1] + 1], threads=threads)
        return
    block = getattr(reader, "shard_rows", 1 << 16) * max(1, threads)
    first = int(src[0])
    while first <= src[-1]:
        lo, hi = np.searchsorted(src, [first, first + block])
        a, b = int(src[lo]), int(src[hi - 1]) + 1
        rows = reader.read(a, b, threads=threads)
        out[dst[lo:hi]] = rows[src[lo:hi] - a]
        first = int(src[hi]) if hi < len(src) else int(src[-1]) + 1


def open_cache(url: str, storage_options: dict | None = None) -> FeatureCache:
    """Open a cache read-only (local path or fsspec URL); StoreError if it is not a vtn cache."""
    return FeatureCache(url, storage_options)
