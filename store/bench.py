"""`vtn bench store`: the cache next to plain zarr reading the same bytes, on a synthetic cache."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from vtn.store import CacheWriter, open_cache


def _disk(path: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            files += 1
            size += os.path.getsize(os.path.join(dirpath, n))
    return files, size


def build(path: Path, videos: int, frames: int, dim: int, seed: int = 0) -> None:
    """A synthetic cache: `videos` videos of `frames` frames, 10 classes, 90 % train / 10 % val."""
    rng = np.random.default_rng(seed)
    classes = [f"class{i}" for i in range(10)]
    times = np.arange(frames) / 25.0
    index = np.arange(frames) * 8
    block = rng.standard_normal((4096, frames, dim)).astype(np.float16)  # reused: generation is not what we measure
    with CacheWriter(str(path), feature_dim=dim, class_names=classes, attrs={"sampling": {"every": 8}}) as w:
        for v in range(videos):
            w.add(f"class{v % 10}/video{v:07d}.mp4", block[v % len(block)], times, index, label=v % 10,
                  split="val" if v % 10 == 0 else "train", fps=25.0, duration=frames * 8 / 25.0, num_frames=frames * 8)


def run(videos: int, frames: int, dim: int, reads: int, path: str | None) -> None:
    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="vtn-bench-store-")
        path = os.path.join(tmp, "cache.zarr")
    cache_path = Path(path)
    try:
        print(f"synthetic cache: {videos:,} videos x {frames} frames x D={dim} float16 at {cache_path}")
        t = time.perf_counter()
        build(cache_path, videos, frames, dim)
        print(f"  written in {time.perf_counter() - t:.1f} s")
        rows = []

        # files and bytes: against one float32 .npy file per video
        files, size = _disk(cache_path)
        one = io.BytesIO()
        np.save(one, np.zeros((frames, dim), np.float32))
        npy = videos * one.tell()
        rows.append(("files on disk", f"{files:,}", f"{videos:,} (.npy per video)", "<= 2,000", files <= 2000))
        rows.append(("bytes on disk", f"{size / 2**20:,.0f} MiB", f"{npy / 2**20:,.0f} MiB (float32 .npy)",
                     f"{size / npy:.2f}x (<= 0.55x)", size / npy <= 0.55))

        # open + index of all videos
        t = time.perf_counter()
        cache = open_cache(str(cache_path))
        n = len(cache.ids)
        ours = time.perf_counter() - t
        t = time.perf_counter()
        g = zarr.open_group(str(cache_path), mode="r")
        idx = next(iter(g["index"].groups()))[1]
        plain_cols = {k: idx[k][:] for k in ("id", "split", "label", "start", "length", "part")}
        plain = time.perf_counter() - t
        rows.append(("open + index", f"{ours:.2f} s ({n:,} videos)", f"{plain:.2f} s", "<= 1 s", ours <= 1.0 and n == videos))

        # random single-video reads: features + timestamps + frame indices
        rng = np.random.default_rng(1)
        pick = rng.integers(0, videos, reads)
        ids = cache.ids
        t = time.perf_counter()
        for i in pick:
            cache.video(ids[i])
        ours = reads / (time.perf_counter() - t)
        parts = {name: grp for name, grp in g["parts"].groups()}
        arrays = {name: (grp["features"], grp["timestamps"], grp["frame_index"]) for name, grp in parts.items()}
        starts, lengths, vparts = plain_cols["start"], plain_cols["length"], plain_cols["part"]
        t = time.perf_counter()
        for i in pick:
            s, e = int(starts[i]), int(starts[i] + lengths[i])
            for a in arrays[str(vparts[i])]:
                a[s:e]
        plain = reads / (time.perf_counter() - t)
        rows.append(("random video reads", f"{ours:,.0f} videos/s", f"{plain:,.0f} videos/s", ">= 1,000/s", ours >= 1000))

        # a whole split into memory
        t = time.perf_counter()
        split = cache.load_split("train")
        ours = time.perf_counter() - t
        mb = (split.features.nbytes + split.timestamps.nbytes + split.frame_indices.nbytes) / 2**20
        plain_mb = 0.0
        t = time.perf_counter()
        for name, grp in parts.items():
            r = int(grp.attrs["rows"])
            plain_mb += sum(a[:r].nbytes for a in arrays[name]) / 2**20
        plain = time.perf_counter() - t
        ratio = (mb / ours) / (plain_mb / plain)
        rows.append(("load train split", f"{mb / ours:,.0f} MiB/s ({ours:.2f} s)", f"{plain_mb / plain:,.0f} MiB/s ({plain:.2f} s, every row)",
                     f"{ratio:.2f}x (>= 0.8x)", ratio >= 0.8))

        width = [max(len(str(r[i])) for r in rows) for i in range(4)]
        print(f"\n{'':{width[0]}}  {'vtn':{width[1]}}  {'plain zarr / reference':{width[2]}}  target")
        for name, a, b, target, ok in rows:
            print(f"{name:{width[0]}}  {a:{width[1]}}  {b:{width[2]}}  {target}  {'ok' if ok else 'MISSED'}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
