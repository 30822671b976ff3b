"""Cached features on their way into VTN: where a split is read from, normalisation, whole-video prediction.

Shared by training (`temporal/train.py`) and evaluation (`evaluate/`), so that both feed the model exactly
the same inputs: positions from `frame_positions`, and whole videos thinned evenly to the model's
max_positions frames (the whole video is seen, spread over the position table). `feature_stats` gives the
normalisation the model keeps with its weights (`normalising_scale`: its std floor).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from vtn.errors import UserError
from vtn.paths import canonical_cache
from vtn.runtime import Processes, autocast
from vtn.store import FeatureCache, SplitData
from vtn.store.dataset import ClipDataset, LengthBucketSampler, collate_clips
from vtn.temporal.checkpoint import backbone_differences
from vtn.temporal.model import VTN, VTNConfig, frame_positions

# A split is loaded into memory when its features take at most this share of the available memory
# (once per machine: the processes of a torchrun job on one node share one copy, see `node_split`).
MEMORY_SHARE = 0.5


def available_memory() -> int:
    """Bytes of memory available now (Linux), or the physical total where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def split_bytes(cache: FeatureCache, split: str) -> int:
    """Bytes of the split's row arrays in memory: features plus timestamps and frame indices (8 bytes each)."""
    frames = int(cache.lengths[cache.index["split"] == split].sum())
    return frames * (cache.feature_dim * cache.dtype.itemsize + 16)


def split_source(cache: FeatureCache, split: str, mode: str = "auto", procs: Processes | None = None
                 ) -> SplitData | FeatureCache:
    """The split in memory (one contiguous array: fastest) when `mode` is "memory", or "auto" and it fits;
    otherwise the cache itself, from which ClipDataset streams one video per item. Under torchrun with several
    processes on a node, they share one copy (`node_split`)."""
    if mode == "stream":
        return cache
    if procs is not None and procs.local_world > 1 and dist.is_initialized():
        return node_split(cache, split, mode, procs)
    if mode == "auto" and split_bytes(cache, split) > MEMORY_SHARE * available_memory():
        return cache
    return cache.load_split(split)


def node_split(cache: FeatureCache, split: str, mode: str, procs: Processes) -> SplitData | FeatureCache:
    """The split loaded once per node: the node's local rank 0 reads it into .npy files in a fresh folder in
    /dev/shm (or the temp folder when /dev/shm has no room), every local rank maps the same files read-only
    (one copy of the pages), then the folder is removed: open maps keep the pages alive until the last process
    lets go, and nothing is left behind. Local rank 0 decides for its node, so all its ranks agree; every rank
    takes part in the same collectives whatever the decision."""
    folder = data = error = None
    if procs.local_rank == 0:
        need = split_bytes(cache, split)
        if mode == "memory" or need <= MEMORY_SHARE * available_memory():
            room = [b for b in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(b) and shutil.disk_usage(b).free > need]
            if room:
                folder = tempfile.mkdtemp(prefix="vtn-split-", dir=room[0])
                try:
                    data = cache.load_split(split, folder=folder)
                except Exception as e:  # the node's other ranks are told below rather than left waiting
                    error = e
            else:
                error = UserError(f"{cache.url}: split '{split}' ({need / 1e9:.1f} GB) fits in memory but neither "
                                  f"/dev/shm nor {tempfile.gettempdir()} has room to share it between the node's "
                                  "processes; set data.load to stream")
    leader = procs.rank - procs.local_rank  # torchrun numbers the ranks of a node consecutively
    try:
        told = [None] * procs.world
        dist.all_gather_object(told, (folder, None if error is None else f"{type(error).__name__}: {error}"))
        shared, failed = told[leader]
        if error is not None:
            raise error
        if failed:
            raise UserError(f"local rank 0 failed to load split '{split}' of {cache.url}: {failed}")
        if data is None:
            data = cache.load_split(split, folder=shared, fill=False) if shared else cache
        dist.barrier()  # every rank of the node has mapped the files
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return data


def feature_stats(dataset: ClipDataset, where: str, max_videos: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) [D] of the features of `dataset`'s videos (the training videos: never a share held out for
    validation), for VTN.set_feature_stats: inputs become (x - mean) / scale. A video with a feature that is
    not finite (NaN, infinite: a damaged cache) is refused, naming it and `where` (the cache), before anything
    trains on it.

    Backbone features have dimensions of very different scales (a ViT's CLS output has a few huge ones);
    normalising them lets one learning rate suit every backbone. `scale` is the per-dimension std times
    sqrt(D), so a normalised frame has unit expected squared norm rather than unit variance per dimension:
    after VTN's input projection (std-0.02 init, as BERT's embeddings) the frame then has the scale of the
    position embeddings it is added to, whatever D is. With unit variance per dimension the frame would be
    sqrt(D) times larger and drown the positions, and a model that must use the frames' order learns it
    many times slower (on 192-D features: not within 1500 steps, against about 400).

    Over every frame of the videos of an in-memory split (each checked), or over up to `max_videos` of them
    spread evenly over a streamed one (enough for a good estimate; reading a whole Kinetics-sized split just for
    this would take long; the batches check the rest as they come, see `model_inputs`).
    """
    source = dataset.source

    def blocks():
        """(features [n, D] float64, the id of a video with a non-finite one among them, or None)."""
        if isinstance(source, SplitData):
            mine = np.zeros(len(source.ids), dtype=bool)
            mine[dataset.rows] = True
            rows = np.repeat(mine, source.lengths)  # [N]: the frame belongs to one of the dataset's videos
            for i in range(0, len(source.features), 65536):
                keep = rows[i:i + 65536]
                b = np.asarray(source.features[i:i + 65536], dtype=np.float64)[keep]
                bad = ~np.isfinite(b).all(1)
                row = i + np.flatnonzero(keep)[np.argmax(bad)] if bad.any() else None
                yield b, None if row is None else source.ids[int(np.searchsorted(source.offsets, row, "right")) - 1]
        else:
            for i in np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), max_videos)).round().astype(int)):
                b = np.asarray(source.features(dataset.ids[i]), dtype=np.float64)
                yield b, None if np.isfinite(b).all() else dataset.ids[i]

    total = sq = None
    n = 0
    for b, bad in blocks():
        if bad is not None:
            raise UserError(f"{where}: video {bad!r} has features that are not finite (NaN or infinite), so "
                            "training on it would diverge; check the cache with `vtn store verify`, and extract that "
                            "video again")
        total = b.sum(0) if total is None else total + b.sum(0)
        sq = (b * b).sum(0) if sq is None else sq + (b * b).sum(0)
        n += len(b)
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
    return torch.from_numpy(mean).float(), normalising_scale(torch.from_numpy(std).float())


STD_FLOOR = 0.1  # a dimension's std counts as at least this share of the median dimension's


def normalising_scale(std: torch.Tensor) -> torch.Tensor:
    """The `scale` [D] of features whose per-dimension std is `std` [D] (see `feature_stats`), the std floored at
    STD_FLOOR x its median: a dimension that barely varies would otherwise be blown up to unit size, noise and all,
    and the gradient reaching a backbone through it multiplied as much (by 1,000 and more on a random-init
    ResNet's features, where the encoder's gradient clipping then shrank every other gradient to nothing). A
    constant dimension carries nothing and keeps scale 1."""
    floored = torch.maximum(std, STD_FLOOR * std.median())
    return torch.where(std < 1e-6, torch.ones_like(std), floored) * len(std) ** 0.5


def whole_videos(source: SplitData | FeatureCache, split: str | None, config: VTNConfig,
                 videos: np.ndarray | None = None) -> ClipDataset:
    """Each video of the split whole, one cached frame in the model's view_stride, at most max_positions frames
    (evenly spread): the one view of a video that training validates on and evaluation scores
    (`whole_video_sampling` is the same rule on raw video)."""
    return ClipDataset(source, split=split, clip_frames=None, stride=config.view_stride or 1,
                       max_frames=config.max_positions, train=False, videos=videos)


def whole_video_sampling(sampling, config: VTNConfig):
    """`sampling` (a SamplingConfig) decoding only the frames of `whole_videos`' view of each raw video."""
    return replace(sampling, view_frames=config.max_positions, view_stride=config.view_stride or 1)


def model_inputs(batch: dict, config: VTNConfig, device: torch.device):
    """(features, mask, positions) for VTN.forward from a collate_clips batch, on `device`; positions by
    `frame_positions`, so every real frame of any video, however long, has a place in the table."""
    mask, features = batch["mask"], batch["features"]
    finite = torch.isfinite(features).flatten(1).all(1)  # [B]: a streamed split is checked as it is read
    if not finite.all():
        bad = batch["ids"][int(torch.argmin(finite.int()))]
        raise UserError(f"video {bad!r} has features that are not finite (NaN or infinite); check the cache with "
                        "`vtn store verify`, and extract that video again")
    positions = frame_positions(config, batch["positions"], batch["times"], mask, batch.get("span"))
    return (features.to(device),  # [B, T, D]; the model normalises them itself
            mask.to(device), None if positions is None else positions.to(device))


@torch.no_grad()
def predict(model: VTN, dataset: ClipDataset, device: torch.device,
            batch_size: int = 16, shard: tuple[int, int] = (0, 1), amp: str = "none",
            workers: int = 0, done: Callable[[int], None] = lambda items: None) -> tuple[np.ndarray, np.ndarray]:
    """Logits [n, classes] (float32) of the dataset's items, and their indices into the dataset.

    Videos are batched by length (little padding). `shard = (rank, world)` takes every world-th batch, so
    the processes of a distributed job split the work; the caller gathers the pieces. `done(items)` after each
    batch (a progress bar).
    """
    rank, world = shard
    batches = list(LengthBucketSampler(dataset.sample_lengths(), batch_size, shuffle=False))[rank::world]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_clips,
                                         num_workers=workers)
    was_training = model.training
    model.eval()
    out = []
    for batch in loader:
        features, mask, positions = model_inputs(batch, model.config, device)
        with autocast(device, amp):
            out.append(model(features, mask, positions).float().cpu())
        done(len(features))
    model.train(was_training)
    index = np.array([i for b in batches for i in b], dtype=np.int64)
    logits = torch.cat(out).numpy() if out else np.zeros((0, model.config.num_classes), np.float32)
    return logits, index


def cache_inputs(cache: FeatureCache) -> dict:
    """The identity of a cache's features, for a checkpoint's inputs.json: the backbone's identity (compared by
    checkpoint.backbone_differences) and the settings that rebuild it (`backbone_config`: name, weights, image size, seed, for
    `vtn predict`), and the sampling."""
    return {"cache": canonical_cache(cache.url), "feature_dim": cache.feature_dim,
            "backbone": cache.attrs.get("backbone"), "backbone_config": (cache.attrs.get("config") or {}).get("backbone"),
            "sampling": cache.attrs.get("sampling")}


def check_inputs(recorded: dict | None, cache: FeatureCache, checkpoint) -> None:
    """Refuse a cache whose features are not what the checkpoint was trained on, naming what differs in both."""
    if recorded is None:  # a checkpoint from before inputs were recorded: nothing to compare
        return
    mine = cache_inputs(cache)
    diffs = [f"backbone {k}: {theirs!r} in the checkpoint, {ours!r} in the cache"
             for k, theirs, ours in backbone_differences(recorded.get("backbone"), mine["backbone"])]
    if recorded.get("sampling") != mine["sampling"]:
        diffs.append(f"sampling: {recorded.get('sampling')} in the checkpoint, {mine['sampling']} in the cache")
    if diffs:
        raise UserError(f"{cache.url}: its features are not the kind {checkpoint} was trained on (from "
                        f"{recorded.get('cache')}): {'; '.join(diffs)}. Extract the videos with that backbone and "
                        "sampling, or train a model on this cache")
