"""`vtn bench store`: the cache next to plain zarr reading the same bytes, on a synthetic cache."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
import zarr

from vtn.store import CacheWriter, open_cache
from vtn.store.cli import disk_usage
from vtn.store.dataset import ClipDataset, LengthBucketSampler, collate_clips, loader_workers
from vtn.store.layout import ROW_ARRAYS
from vtn.store.rows import OPEN_FILES


def build(path: Path, videos: int, frames: int, dim: int, seed: int = 0, blocks: int = 4096) -> None:
    """A synthetic cache: `videos` videos of `frames` frames, 10 classes, 90 % train / 10 % val."""
    rng = np.random.default_rng(seed)
    classes = [f"class{i}" for i in range(10)]
    times = np.arange(frames) / 25.0
    index = np.arange(frames) * 8
    # reused: generation is not what we measure
    block = rng.standard_normal((min(blocks, videos), frames, dim)).astype(np.float16)
    with CacheWriter(str(path), feature_dim=dim, class_names=classes, attrs={"sampling": {"every": 8}}) as w:
        for v in range(videos):
            w.add(f"class{v % 10}/video{v:07d}.mp4", block[v % len(block)], times, index, label=v % 10,
                  split="val" if v % 10 == 0 else "train", fps=25.0, duration=frames * 8 / 25.0, num_frames=frames * 8)


def run(videos: int, frames: int, dim: int, reads: int, path: str | None, batches: int = 100) -> None:
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
        files, size = disk_usage(str(cache_path))
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

        # training clips as stage two is fed them: from the split in memory, and streamed from the cache; the
        # loader alone, then feeding the base model (its steps are what streaming must keep up with)
        from vtn.temporal.model import SIZES

        base = dataclasses.replace(SIZES["base"], feature_dim=dim, num_classes=len(cache.class_names))
        workers, model_batches = loader_workers(streaming=True), max(2, batches // 10)
        for name, model, n in (("loader alone", None, batches), ("base model trained", base, model_batches)):
            mem_rate = clips_per_second(split, "train", n, loader_workers(streaming=False), model=model)
            stream_rate = clips_per_second(cache, "train", n, workers, model=model)
            ratio = stream_rate / mem_rate
            rows.append((f"clips/s streamed, {name}", f"{stream_rate:,.1f} ({workers} workers, {n} batches)",
                         f"{mem_rate:,.1f} from memory", f"{ratio:.2f}x" + (" (>= 0.8x)" if model else ""),
                         ratio >= 0.8 or not model))
        del split

        width = [max(len(str(r[i])) for r in rows) for i in range(4)]
        print(f"\n{'':{width[0]}}  {'vtn':{width[1]}}  {'plain zarr / reference':{width[2]}}  target")
        for name, a, b, target, ok in rows:
            print(f"{name:{width[0]}}  {a:{width[1]}}  {b:{width[2]}}  {target}  {'ok' if ok else 'MISSED'}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


# --- training clips fed from memory and from streaming, and the Kinetics-shaped bench ----------------------

KINETICS = (240_000, 250, 768)  # Kinetics-400 at 25 fps through ViT-B/16: videos, frames per video, feature dim


def open_fds() -> int:
    """Descriptors open now in this process and its children (streaming loader workers)."""
    pids = [os.getpid()]
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # a worker that just ended
            pass
    return total


class PeakFds:
    """The most descriptors open at once (sampled every few ms on a thread) while the block runs."""

    def __enter__(self):
        self.peak, self._stop = open_fds(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, open_fds())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, open_fds())


def clips_per_second(source, split: str, batches: int, workers: int, clip_frames: int = 16, stride: int = 8,
                     batch_size: int = 32, model=None) -> float:
    """Training clips/s through the loader stage two builds (temporal/train.py): random clips of `clip_frames`
    frames, length-bucketed batches, collate_clips, `workers` loader processes; the loader's start included,
    as every epoch pays it. With `model` (a VTNConfig), each batch also trains that model one step (forward,
    backward, AdamW) in this process: the clips/s the source feeds it, loader and model sharing the cores."""
    data = ClipDataset(source, split=split, clip_frames=clip_frames, stride=stride, train=True)
    order = list(LengthBucketSampler(data.sample_lengths(), batch_size, shuffle=True))[:batches]
    step = _train_step(model) if model else (lambda batch: None)
    t = time.perf_counter()
    loader = torch.utils.data.DataLoader(data, batch_sampler=order, collate_fn=collate_clips, num_workers=workers)
    clips = 0
    for batch in loader:
        step(batch)
        clips += len(batch["labels"])
    return clips / (time.perf_counter() - t)


def _train_step(config):
    """One training step of a VTN of `config` on a collated batch (on the CPU)."""
    import torch.nn.functional as F

    from vtn.temporal.data import model_inputs
    from vtn.temporal.model import VTN

    torch.manual_seed(0)
    net = VTN(config).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step(batch: dict) -> None:
        features, mask, positions = model_inputs(batch, config, torch.device("cpu"))
        loss = F.cross_entropy(net(features, mask, positions), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def kinetics(fraction: float, path: str | None, batches: int) -> None:
    """A cache shaped like Kinetics-400's ViT-B/16 features at `fraction` of its videos; each figure measured,
    then extrapolated to the whole 240,000 videos from its cost per video."""
    full, frames, dim = KINETICS
    videos = max(10, round(full * fraction))  # >= 10: one val video per 10
    scale = full / videos
    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="vtn-bench-kinetics-")
        path = os.path.join(tmp, "cache.zarr")
    try:
        gb = videos * frames * dim * 2 / 1e9
        print(f"Kinetics-shaped cache at {fraction:g} of 240,000 videos: {videos:,} videos x {frames} frames x "
              f"D={dim} float16 = {gb:.2f} GB of features at {path}")
        rows = []
        with PeakFds() as fds:
            t = time.perf_counter()
            build(Path(path), videos, frames, dim, blocks=max(1, min(4096, (256 << 20) // (frames * dim * 2))))
            w = time.perf_counter() - t
            rows.append(("write", f"{gb / w:.3f} GB/s ({w:.1f} s)", f"{w * scale / 60:.1f} min"))

            tracemalloc.start()
            t = time.perf_counter()
            cache = open_cache(path)
            o = time.perf_counter() - t
            mem = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            rows.append(("open + index", f"{o:.3f} s", f"<= {o * scale:.1f} s (part of it is a fixed cost)"))
            rows.append(("index memory", f"{mem / 2**20:.2f} MiB", f"{mem * scale / 2**20:,.0f} MiB"))
            files, size = disk_usage(path)
            shards = sum(disk_usage(str(Path(path, "parts", part, name)))[0] for part in os.listdir(Path(path, "parts"))
                         for name in ROW_ARRAYS)  # grow with the rows; the rest (metadata, tables) barely
            rows.append(("files", f"{files:,} ({shards:,} shards)", f"{files - shards + shards * scale:,.0f}"))

            t = time.perf_counter()
            split = cache.load_split("train")
            ls = time.perf_counter() - t
            lgb = split.features.nbytes / 1e9
            rows.append(("load_split train", f"{lgb / ls:.3f} GB/s ({ls:.1f} s)",
                         f"{ls * scale / 60:.1f} min, {lgb * scale:,.0f} GB of RAM"))

            epoch = -(-len(split.ids) * scale // 32)  # batches of a full-size epoch
            mem_rate = clips_per_second(split, "train", batches, loader_workers(streaming=False))
            del split
            workers = loader_workers(streaming=True)
            stream_rate = clips_per_second(cache, "train", batches, workers)
            rows.append(("clips/s from memory", f"{mem_rate:,.0f} (0 workers)",
                         f"epoch {epoch * 32 / mem_rate / 60:.1f} min"))
            rows.append(("clips/s streamed",
                         f"{stream_rate:,.0f} ({workers} workers), {stream_rate / mem_rate:.2f}x memory",
                         f"epoch {epoch * 32 / stream_rate / 60:.1f} min"))

            from vtn.store.verify import verify

            t = time.perf_counter()
            problems, _ = verify(path, progress=False)
            v = time.perf_counter() - t
            if problems:
                raise RuntimeError(f"{path}: verify found {problems[0]}")
            rows.append(("verify", f"{size / 1e9 / v:.3f} GB/s ({v:.1f} s)", f"{v * scale / 60:.1f} min"))
        rows.append(("open descriptors at peak", f"{fds.peak} ({1 + workers} processes)",
                     f"the same: at most {OPEN_FILES} shard files per process"))
        width = [max(len(r[i]) for r in rows + [("", "measured", "")]) for i in range(2)]
        print(f"\n{'':{width[0]}}  {'measured':{width[1]}}  at 240,000 videos (from the cost per video)")
        for name, a, b in rows:
            print(f"{name:{width[0]}}  {a:{width[1]}}  {b}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
