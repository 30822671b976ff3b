"""[CLS]'s attention to the frames of a video: per layer and rolled out across layers, as a record and a figure
of frame thumbnails. Shared by `vtn evaluate --attention` (cached features) and `vtn predict --attention` (raw video).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from vtn import plots
from vtn.store import ClipDataset, collate_clips
from vtn.temporal.data import model_inputs
from vtn.temporal.model import VTN

THUMBNAILS = 12  # frames shown above the weights: at most 12 fit the figure's width at a readable size


def cls_attention(model: VTN, batch: dict, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """[CLS]'s attention to the frames of a one-video batch: per layer (heads averaged, renormalised over the
    frames) [layers, T], and the rollout across layers [T].

    Rollout (after Abnar & Zuidema, 2020, for the one row Longformer's global attention gives): [CLS] after layer
    l is half itself (the residual) and half its attention over the tokens before that layer; a frame token stands
    for its own frame (the frames' local mixing, which the model does not expose, is left out). Both sum to 1."""
    features, mask, positions = model_inputs(batch, model.config, device)
    model.eval()
    with torch.no_grad():
        _, attentions = model(features, mask, positions, return_attention=True)
    layers = torch.stack([a[0].float().mean(0) for a in attentions]).cpu().numpy()  # [layers, 1 + T]
    share = np.zeros(layers.shape[1])
    share[0] = 1.0  # what [CLS] stands for: itself, before the first layer
    for a in layers:
        frames_part = np.concatenate([[0.0], a[1:]])
        share = 0.5 * share + 0.5 * (a[0] * share + frames_part)
    per_layer = layers[:, 1:] / layers[:, 1:].sum(1, keepdims=True)
    return per_layer, share[1:] / share[1:].sum()


def attention_figure(model: VTN, item: dict, video: Path | None, folder: Path, device: torch.device) -> tuple[dict, str]:
    """One video's attention record (frame index, timestamp, weight per layer, rollout) and its PNG: thumbnails
    decoded from `video` at the item's frames over the weights. `item` is a ClipDataset-style view."""
    from vtn.evaluate.frames import read_frames

    per_layer, rollout = cls_attention(model, collate_clips([item]), device)
    index, times = item["positions"].numpy(), item["times"].numpy()
    record = {"id": item["id"], "frames": [
        {"frame_index": int(f), "timestamp": round(float(t), 6), "layers": per_layer[:, j].round(6).tolist(),
         "rollout": round(float(rollout[j]), 6)} for j, (f, t) in enumerate(zip(index, times))]}
    shown = np.unique(np.linspace(0, len(index) - 1, min(len(index), THUMBNAILS)).round().astype(int))
    rows = {f"layer {k + 1}": w for k, w in enumerate(per_layer)} | {"rollout": rollout}
    name = re.sub(r"[^\w.-]+", "_", item["id"])
    png = plots.attention_png(read_frames(video, index[shown], height=96), shown, times, rows,
                              f"{item['id']}: [CLS] attention to each frame", folder / f"{name}.png")
    return record, str(png)


def write_attention(model: VTN, dataset: ClipDataset, cache, n: int, device: torch.device, folder: Path) -> list[str]:
    """attention/attention.json and a PNG for each of the first `n` videos of `dataset`; returns the PNG paths."""
    from vtn.evaluate.frames import source_root

    folder.mkdir(parents=True, exist_ok=True)
    root = source_root(cache)
    figures = [attention_figure(model, dataset[i], root / dataset.ids[i] if root else None, folder, device)
               for i in range(min(n, len(dataset)))]
    (folder / "attention.json").write_text(json.dumps([r for r, _ in figures], indent=1) + "\n")
    return [png for _, png in figures]
