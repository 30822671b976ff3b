"""Which videos a stage-two run trains and validates on: the splits, a held-out share when the cache has no val
split, the videos left out (and why), and the fingerprint a resumed run must find unchanged."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import numpy as np

from vtn.errors import UserError
from vtn.paths import canonical_cache
from vtn.runtime import Processes
from vtn.store.clips import clip_stride
from vtn.store.dataset import ClipDataset, LengthBucketSampler, loader_workers
from vtn.store.lease import describe, live_writers
from vtn.temporal.data import split_source, whole_videos
from vtn.temporal.model import VTNConfig
from vtn.temporal.settings import DataSection, TrainConfig


def held_out(ids: list[str], labels: np.ndarray, share: float) -> np.ndarray:
    """Boolean mask of the videos to hold out: per class, ceil(share x its videos) of those with the smallest
    crc32 of their id, leaving at least one video of the class for training."""
    out = np.zeros(len(ids), dtype=bool)
    keys = np.array([zlib.crc32(v.encode()) for v in ids], dtype=np.int64)
    for c in np.unique(labels[labels >= 0]):
        mine = np.flatnonzero(labels == c)
        n = min(math.ceil(share * len(mine)), len(mine) - 1)
        out[mine[np.argsort(keys[mine], kind="stable")[:n]]] = True
    return out


@dataclass
class Data:
    train: ClipDataset  # labelled training videos: random clips
    val: ClipDataset  # whole videos
    sampler: LengthBucketSampler
    streaming: bool
    workers: int
    holdout: list[str] | None  # ids held out of the train split for validation, when the cache has no val split
    left_out: str | None = None  # which of the cache's videos the run does not use, and why (a warning)
    sampling: str = ""  # the training views and why (the first log line)
    model: VTNConfig | None = None  # the model config given, its view_stride set from the training views


def left_out(cache, d: DataSection, train_unlabelled: int, val_unlabelled: int) -> str | None:
    """A warning naming how many of the cache's videos a run leaves out, and why; None when it uses them all."""
    splits = np.asarray(cache.splits, dtype=object)
    used = (d.train_split, d.val_split)
    other = {s: int(n) for s, n in zip(*np.unique(splits[~np.isin(splits, used)], return_counts=True))}
    reasons = []
    if other:
        counts = ", ".join(f"{s!r}: {n}" for s, n in other.items())
        reasons.append(f"{sum(other.values())} in splits it does not use ({counts}; it trains on '{d.train_split}' "
                       f"and validates on '{d.val_split}': set data.train_split / data.val_split)")
    for n, split in ((train_unlabelled, d.train_split), (val_unlabelled, d.val_split)):
        if n:
            reasons.append(f"{n} unlabelled in '{split}'")
    if not reasons:
        return None
    total = sum(other.values()) + train_unlabelled + val_unlabelled
    return f"warning: {cache.url}: {total} of its {len(splits)} videos are left out: {'; '.join(reasons)}"


def still_writing(cache) -> str | None:
    """A note when another process is still adding videos to the cache: the run sees only those committed now."""
    live = live_writers(cache.root, prune=False)
    if not live:
        return None
    who = "; ".join(describe(e) for e in live.values())
    return (f"note: {cache.url}: a writer is still adding videos to this cache ({who}); this run uses the "
            f"{len(cache)} videos committed when it started, not those added after")


def choose_sampling(d: DataSection, lengths: np.ndarray) -> tuple[str, str]:
    """(the training views' sampling, a sentence saying why) for train videos of these lengths (cached frames).

    `d.sampling` unless "auto". Auto looks at the share of the long train videos (the 90th percentile of the
    lengths) that one dense clip spans: at least 90 %: "dense" (a clip already shows about the whole video); at most
    half: "uniform" (a dense clip shows too little of those videos to be sure to hold what decides their class, and
    whole-video evaluation would place frames where training never did); in between "mixed"."""
    if d.speed[0] > d.speed[1]:
        raise UserError(f"data.speed={list(d.speed)}: the first value (slowest) must not exceed the second")
    span = (d.clip_frames - 1) * d.stride + 1
    long = float(np.percentile(lengths, 90)) if len(lengths) else 0.0
    cover = min(1.0, span / long) if long else 1.0
    aug = "" if d.speed == (1.0, 1.0) else f", speed x{d.speed[0]:g}-{d.speed[1]:g}"
    views = {"dense": f"dense clips of {d.clip_frames} frames at stride {d.stride}{aug}",
             "uniform": f"uniform views of {d.segments} segments over each whole video{aug}",
             "mixed": f"mixed views ({d.uniform_share:.0%} uniform of {d.segments} segments, else dense clips of "
                      f"{d.clip_frames} frames at stride {d.stride}){aug}"}
    if d.sampling != "auto":
        return d.sampling, f"{views[d.sampling]} (data.sampling={d.sampling})"
    mode = "dense" if cover >= 0.9 else "uniform" if cover <= 0.5 else "mixed"
    why = (f"a dense clip spans {span} cached frames, {cover:.0%} of a long train video (90th percentile: {long:.0f} "
           "frames); data.sampling=auto picks dense at >= 90 %, uniform at <= 50 %, mixed between")
    return mode, f"{views[mode]}: {why}"


def view_stride(d: DataSection, sampling: str, lengths: np.ndarray) -> int:
    """model.view_stride where it is unset: whole videos are read one cached frame in this many, as far apart as
    the frames of the training views, the median over the train videos (of these `lengths`) of a view's spacing:
    a dense clip's `stride` (less on a video too short for the clip's span, as `clip_rows` draws it), a uniform
    view's length / `segments`, a mixed view's either by its share. A model that learnt from frames 8 apart and
    is then shown every frame sees its events 8 times longer and its neighbours 8 times closer than it ever did
    (see the README's long-video figures)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    dense = clip_stride(lengths, d.clip_frames, d.stride)
    uniform = np.maximum(lengths / d.segments, 1.0)
    share = {"dense": 0.0, "uniform": 1.0, "mixed": d.uniform_share}[sampling]
    return max(1, round(float(np.median(share * uniform + (1 - share) * dense)))) if len(lengths) else 1


def shared_source(cache, split: str, mode: str, procs: Processes, sources: dict | None):
    """split_source, kept in `sources` when given: a sweep trains many runs in one process on one loaded split."""
    if sources is None:
        return split_source(cache, split, mode, procs)
    if (split, mode) not in sources:
        sources[split, mode] = split_source(cache, split, mode, procs)
    return sources[split, mode]


def load_data(cache, cfg: TrainConfig, model_cfg: VTNConfig, procs: Processes, sources: dict | None = None) -> Data:
    d = cfg.data
    for split, what in ((d.train_split, "train"), (d.val_split, "val")):
        if not len(cache.split_ids(split)) and not (what == "val" and d.val_split == "val" and d.holdout > 0):
            raise UserError(f"{cache.url}: no videos in the {what} split '{split}' (the cache has splits "
                            f"{sorted(set(cache.splits))}); set data.{what}_split")
    train_source = shared_source(cache, d.train_split, d.load, procs, sources)
    streaming = train_source is cache
    every = ClipDataset(train_source, split=d.train_split, train=False)
    keep = every.labels >= 0  # unlabelled videos cannot teach a classifier
    holdout = out = None
    if not len(cache.split_ids(d.val_split)):
        out = held_out(every.ids, every.labels, d.holdout)
        holdout = [every.ids[i] for i in np.flatnonzero(out)]
        if not holdout:
            raise UserError(f"{cache.url}: no val split, and no class has two train videos to hold one out")
        keep &= ~out
    if not keep.any():
        raise UserError(f"{cache.url}: the train split '{d.train_split}' has no labelled videos")
    sampling, why = choose_sampling(d, every.lengths[keep])
    if model_cfg.view_stride is None:
        model_cfg = replace(model_cfg, view_stride=view_stride(d, sampling, every.lengths[keep]))
        why += (f"; whole videos read one cached frame in {model_cfg.view_stride}, as far apart as the views' "
                "(model.view_stride)")
    if holdout is None:
        val = whole_videos(shared_source(cache, d.val_split, d.load, procs, sources), d.val_split, model_cfg)
    else:
        val = whole_videos(train_source, d.train_split, model_cfg, np.flatnonzero(out))
    if not (val.labels >= 0).any():  # else every evaluation has nothing to score
        raise UserError(f"{cache.url}: the val split '{d.val_split}' has no labelled videos ({len(val)} unlabelled), "
                        "so nothing can be scored; label them, or set data.val_split to a labelled split")
    train = ClipDataset(train_source, split=d.train_split, clip_frames=d.clip_frames, stride=d.stride,
                        max_frames=model_cfg.max_positions, train=True, seed=cfg.run.seed, videos=np.flatnonzero(keep),
                        sampling=sampling, segments=d.segments, uniform_share=d.uniform_share, speed=d.speed)
    sampler = LengthBucketSampler(train.sample_lengths(), cfg.optim.batch_size, shuffle=True, seed=cfg.run.seed,
                                  num_replicas=procs.world, rank=procs.rank)
    workers = d.workers if d.workers is not None else loader_workers(streaming, procs.local_world)
    warning = "\n".join(filter(None, [left_out(cache, d, int((every.labels < 0).sum()),
                                                int((val.labels < 0).sum()) if holdout is None else 0),
                                       still_writing(cache)])) or None
    return Data(train, val, sampler, streaming, workers, holdout, warning, why, model_cfg)


def data_fingerprint(data: Data, cache) -> dict:
    """What a resumed run must find unchanged to take the same steps: the cache and its training videos."""
    ids = "\n".join(f"{v}:{n}" for v, n in zip(data.train.ids, data.train.lengths))
    return {"cache": canonical_cache(cache.url), "train_videos": len(data.train),
            "train_crc32": zlib.crc32(ids.encode())}
