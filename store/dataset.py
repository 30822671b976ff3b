"""PyTorch datasets over a cache for stage two: training clips, whole-video evaluation, length buckets.

Randomness comes from (seed, epoch, item), never from global state, so a resumed run draws exactly the
clips an uninterrupted one would, with any number of loader workers.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vtn.store.clips import clip_rows, speed_factor, uniform_rows, whole_frames
from vtn.store.reader import FeatureCache, SplitData


class ClipDataset(Dataset):
    """Items of one split: {"features" [t, D] float32, "positions" [t], "times" [t], "span", "label", "id"}.

    "span" [2] is the whole video's extent (last - first cached frame) in source frames and in seconds, whatever
    part of it the item shows: `frame_positions` scales a long video's positions by it, so a training clip
    and a whole-video view of the same video give a frame the same spacing.

    `source` is a SplitData (in memory; fastest) or an open FeatureCache (streams each video from disk).
    `videos` keeps only these positions among the split's videos (e.g. a held-out share), in that order.
    `train=True` draws a random view per item (`sampling`: "dense" clips, "uniform" views of `segments` segments
    over the whole video, or "mixed": uniform with probability `uniform_share`), its temporal scale drawn from
    `speed` (see DataSection); `train=False` gives the whole video, or with `clip_frames` the clip `view` = (k, n)
    of n evenly spaced ones (default: the centred clip).
    """

    def __init__(self, source: SplitData | FeatureCache, split: str | None = None, clip_frames: int | None = None,
                 stride: int = 1, max_frames: int | None = None, train: bool = True, seed: int = 0,
                 videos: np.ndarray | None = None, view: tuple[int, int] | None = None, sampling: str = "dense",
                 segments: int = 64, uniform_share: float = 0.5, speed: tuple[float, float] = (1.0, 1.0)):
        self.source = source
        self.view = view
        if isinstance(source, SplitData):
            sel = np.arange(len(source.ids))
            ids, labels, lengths = np.asarray(source.ids, dtype=object), np.asarray(source.labels), source.lengths
        else:
            sel = np.flatnonzero(source.index["split"] == split) if split is not None else np.arange(len(source))
            ids, labels, lengths = source.index["id"], source.labels, source.lengths
        if videos is not None:
            sel = sel[np.asarray(videos, dtype=np.int64)]
        self.rows = sel  # item i is video rows[i] of the source
        self.ids = ids[sel].tolist()
        self.labels = np.asarray(labels)[sel]
        self.lengths = np.asarray(lengths)[sel]
        self.clip_frames, self.stride, self.max_frames = clip_frames, stride, max_frames
        self.train, self.seed, self.epoch = train, seed, 0
        self.sampling, self.segments, self.uniform_share, self.speed = sampling, segments, uniform_share, tuple(speed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, i: int, *salt: int) -> np.random.Generator:
        """Item i's random stream in this epoch: (seed, epoch, item), never global state. Item i's clip is drawn
        from the unsalted stream; a `salt` gives a consumer another stream of the same item (e.g. augmentation)."""
        return np.random.default_rng((self.seed, self.epoch, i, *salt))

    def __len__(self) -> int:
        return len(self.ids)

    def sample_lengths(self) -> np.ndarray:
        """Frames each item will have (for bucketing by length; a uniform training view's, at speed 1)."""
        if self.clip_frames is None and not self.train:
            return whole_frames(self.lengths, self.stride, self.max_frames)
        cap = self.clip_frames if self.clip_frames is not None else self.max_frames
        if self.train and self.sampling != "dense":
            cap = self.segments if self.sampling == "uniform" else max(self.segments, cap)
        return np.minimum(self.lengths, cap) if cap is not None else self.lengths

    def view_kind(self, i: int) -> str:
        """"dense" or "uniform": the kind of item i's training view this epoch (its own stream, so the mixed
        mode's draw never shifts the frames a view picks)."""
        if self.sampling != "mixed":
            return self.sampling
        return "uniform" if self.rng(i, 3).random() < self.uniform_share else "dense"

    def pick(self, i: int) -> np.ndarray:
        """Which of item i's cached frames it shows (sorted): a training view drawn from (seed, epoch, i), or the
        evaluation view."""
        length = int(self.lengths[i])
        if not self.train:
            return clip_rows(length, self.clip_frames, self.stride, self.max_frames, None, self.view)
        factor = speed_factor(self.rng(i, 4), self.speed)
        if self.view_kind(i) == "uniform":
            segments = max(1, round(self.segments / factor))
            return uniform_rows(length, min(segments, self.max_frames or segments), self.rng(i))
        return clip_rows(length, self.clip_frames, max(1, round(self.stride * factor)), self.max_frames, self.rng(i))

    def __getitem__(self, i: int) -> dict:
        pick = self.pick(i)
        if isinstance(self.source, SplitData):
            rows = self.source.video_rows(int(self.rows[i]))
            feats, all_frames, all_times = self.source.features[rows][pick], self.source.frame_indices[rows], self.source.timestamps[rows]
        else:
            # only the clip's span of feature rows: a clip of a long video decodes a fraction of its chunks
            a = int(pick[0])
            feats = self.source.features(self.ids[i], a, int(pick[-1]) + 1)[pick - a]
            all_times, all_frames = self.source.timeline(self.ids[i])
        return {
            "features": torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)),
            "positions": torch.from_numpy(np.asarray(all_frames[pick], dtype=np.int64)),
            "times": torch.from_numpy(np.asarray(all_times[pick], dtype=np.float32)),
            "span": video_span(all_frames, all_times),
            "label": int(self.labels[i]),
            "id": self.ids[i],
        }


def loader_workers(streaming: bool, local_world: int = 1) -> int:
    """Stage two's default loader processes: none for a split in memory (indexing an array is cheaper than handing
    items between processes); for a streamed one, up to 8, sharing the node's cores with its other processes."""
    return min(8, (os.cpu_count() or 1) // local_world) if streaming else 0


def video_span(frame_indices, timestamps) -> torch.Tensor:
    """[2]: a video's extent from its first to its last frame, in source frames and in seconds."""
    return torch.tensor([float(frame_indices[-1] - frame_indices[0]), float(timestamps[-1] - timestamps[0])],
                        dtype=torch.float64)


def collate_clips(items: list[dict]) -> dict:
    """Pad to the longest item: features [B,T,D], mask [B,T] (True = real frame), positions, times, labels, ids,
    and "span" [B, 2] when every item has one (None otherwise: each view is then its own extent)."""
    t = max(len(x["features"]) for x in items)
    b, d = len(items), items[0]["features"].shape[1]
    features = torch.zeros(b, t, d)
    mask = torch.zeros(b, t, dtype=torch.bool)
    positions = torch.zeros(b, t, dtype=torch.long)
    times = torch.zeros(b, t)
    for j, x in enumerate(items):
        n = len(x["features"])
        features[j, :n] = x["features"]
        mask[j, :n] = True
        positions[j, :n] = x["positions"]
        times[j, :n] = x["times"]
    return {
        "features": features, "mask": mask, "positions": positions, "times": times,
        "labels": torch.tensor([x["label"] for x in items], dtype=torch.long), "ids": [x["id"] for x in items],
        "span": torch.stack([x["span"] for x in items]) if all("span" in x for x in items) else None,
    }


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of items of similar length (less padding), in a shuffled order; splits each batch across ranks.

    Items are sorted by length with a little per-epoch noise, cut into batches of `batch_size` (the global
    batch over all ranks), and the batch order is shuffled. With `num_replicas` > 1 rank r takes items
    r, r + num_replicas, ... of every global batch, so a step of N processes sees exactly the clips of a
    one-process step; a rank whose share of a short last batch is empty gets the batch's first item, to be
    weighted 0 (see `shares`). Every rank gets the same number of batches, so DDP never waits on one.
    """

    def __init__(self, lengths, batch_size: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        noise = rng.random(len(self.lengths)) if self.shuffle else np.zeros(len(self.lengths))
        order = np.lexsort((noise, self.lengths))
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def shares(self) -> list[tuple[list[int], float]]:
        """This rank's (items, weight) per step: the weight makes the mean over all ranks of the local loss sums
        times weight the global batch's mean loss (world / global size; 0 for a stand-in item)."""
        out = []
        for b in self.global_batches():
            mine = b[self.rank::self.num_replicas]
            out.append((mine, self.num_replicas / len(b)) if mine else (b[:1], 0.0))
        return out

    def __iter__(self):
        return iter([items for items, _ in self.shares()])

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)
