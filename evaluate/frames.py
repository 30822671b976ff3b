"""Frames of a cached video, decoded again from its source for figures (attention strips)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vtn.extract import decode
from vtn.extract.decode import VideoError


def source_root(cache) -> Path | None:
    """The folder video ids are relative to (the cache's `root`; for older caches the input folder, or a manifest's
    folder), or None when the cache does not say or it is gone."""
    src = cache.attrs.get("root") or cache.attrs.get("source")
    if not src:
        return None
    root = Path(src)
    root = root if root.is_dir() else root.parent
    return root if root.is_dir() else None


def read_frames(path: Path | None, indices: np.ndarray, height: int = 48) -> list[np.ndarray]:
    """Frames `indices` of the video at `path` as RGB thumbnails `height` pixels high; grey squares when the file
    is missing or cannot be decoded (the figure still shows the attention)."""
    frames = None
    if path is not None and path.is_file():
        for reader in decode.READERS:
            try:
                r = reader(path)
                frames = np.concatenate([c.frames for c in r.read(np.asarray(indices, dtype=np.int64))])
                break
            except VideoError:
                continue
    if frames is None:
        return [np.full((height, height, 3), 128, np.uint8) for _ in indices]
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [n, 3, H, W]
    width = max(1, round(x.shape[3] * height / x.shape[2]))
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return list(x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
