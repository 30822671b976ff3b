"""Deterministic test videos for the store tests (also used by writer_proc.py in child processes)."""

import zlib

import numpy as np

from vtn.store import CacheWriter

D = 16
CLASSES = ["left", "right", "still"]


def feats(video_id: str, length: int, dim: int = D) -> np.ndarray:
    """Deterministic float16 features for an id, so any process can regenerate what it should read back."""
    rng = np.random.default_rng(zlib.crc32(video_id.encode()))
    return (rng.standard_normal((length, dim)) * 3).astype(np.float16)


def plan(n: int, seed: int = 0) -> list[tuple[str, int, int, str]]:
    """(id, length, label, split) for n videos of varied lengths."""
    rng = np.random.default_rng(seed)
    return [(f"{CLASSES[i % 3]}/clip_{i:04d}.mp4", int(rng.integers(1, 700)), i % 3, "val" if i % 4 == 0 else "train")
            for i in range(n)]


def add(writer: CacheWriter, vid: str, length: int, label: int, split: str) -> None:
    writer.add(vid, feats(vid, length, writer.feature_dim), np.arange(length) / 12.5, np.arange(length) * 2,
               label=label, split=split, fps=25.0, duration=length / 12.5, num_frames=length * 2)
