"""`vtn evaluate RUN --cache CACHE`: a trained VTN on one split of a cache.

A flat job: load the checkpoint (config, weights, feature statistics, recorded inputs) and check the cache fits
it, predict every video of the split in the chosen inference mode, and write predictions.csv, confusion.csv,
metrics.json and the figures (confusion matrix, reliability diagram, and [CLS] attention with --attention). It
only reads checkpoints and caches (no training code): the inputs are prepared by the same library functions
training uses (vtn.temporal.data), so an evaluation reproduces the run's own val figures.

Inference modes: `full` (the paper's: one view over the whole video, up to max_positions frames spread over it)
and `TxS` (PySlowFast / MMAction2 testing: T clips of the training clip length with starts evenly spaced over the
video, x S spatial crops, softmax scores averaged). A cache holds one crop, so from a cache S is 1.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from vtn import plots
from vtn.errors import UserError
from vtn.paths import canonical_cache, check_run_dir
from vtn.runtime import resolve_device
from vtn.store import ClipDataset, collate_clips, open_cache
from vtn.temporal.checkpoint import CONFIG_NAME, read_inputs
from vtn.temporal.data import check_inputs, model_inputs, predict, split_source
from vtn.temporal.e2e import BACKBONE_FILE, load_temporal, reextract_command
from vtn.temporal.metrics import (calibration, classification_metrics, confused_pairs, confusion, log_softmax,
                                  mean_softmax, per_class, top_k)
from vtn.temporal.model import VTN


def checkpoint_dir(run: Path, checkpoint: str) -> Path:
    """RUN/<checkpoint> (best or last) of a training run, or RUN itself when it is a checkpoint directory."""
    if (run / CONFIG_NAME).is_file():
        return run
    path = run / checkpoint
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"{run}: neither a training run with a {checkpoint}/ checkpoint nor a checkpoint directory")
    return path


def parse_views(spec: str) -> tuple[int, int] | None:
    """"full" -> None; "TxS" (e.g. "10x3") -> (T clips, S crops)."""
    if spec == "full":
        return None
    m = re.fullmatch(r"(\d+)x(\d+)", spec)
    if not m or int(m[1]) < 1 or int(m[2]) not in (1, 3):
        raise UserError(f"--views {spec!r}: expected full, or TxS with T clips >= 1 and S = 1 (centre) or 3 crops, "
                        "e.g. 10x3")
    return int(m[1]), int(m[2])


def clip_settings(inputs: dict | None) -> tuple[int, int]:
    """The training clip (frames, stride in cached frames) recorded with a checkpoint; stage two's defaults
    for checkpoints written before it was recorded."""
    inputs = inputs or {}
    return int(inputs.get("clip_frames", 16)), int(inputs.get("stride", 8))


def evaluate(run: str | Path, cache_url: str, split: str | None = None, out: str | Path | None = None,
             checkpoint: str = "best", batch_size: int = 16, device: str = "auto", load: str = "auto",
             views: str = "full", attention: int = 0) -> dict:
    """Evaluate the run's checkpoint on `split` of the cache (None: "val", or the videos the run held out of its
    train split when the cache has no val split); writes into `out` (default: the run directory) and returns the
    metrics. A cache without labels or class names (new videos to score) gets predictions and no accuracy."""
    run = Path(run)
    # Given --out: never a folder of the user's. The default (the run itself) is checked by checkpoint_dir.
    out = check_run_dir(out, "evaluation") if out is not None else run
    ckpt = checkpoint_dir(run, checkpoint)
    model = load_temporal(ckpt)  # weights and the feature normalisation it was trained with (no fine-tuned backbone)
    cfg = model.config
    cache = open_cache(cache_url)
    if cache.feature_dim != cfg.feature_dim:
        raise UserError(f"{cache.url}: the cache's features have {cache.feature_dim} dimensions, but the model in "
                        f"{ckpt} was trained on feature_dim={cfg.feature_dim}")
    inputs = read_inputs(ckpt)
    try:
        check_inputs(inputs, cache, ckpt)
    except UserError as e:
        if not (ckpt / BACKBONE_FILE).is_file():
            raise
        # A fine-tuned checkpoint: its encoder fits the features of its own backbone, not the stage-two cache's.
        raise UserError(f"{e}. {ckpt} holds a fine-tuned backbone: extract its features with `"
                        f"{reextract_command(ckpt, inputs, cache.attrs.get('source'))}` and evaluate on that "
                        "cache") from None
    names = list(cfg.class_names) or [str(i) for i in range(cfg.num_classes)]
    if cache.class_names and (len(cache.class_names) != cfg.num_classes
                              or (cfg.class_names and list(cfg.class_names) != cache.class_names)):
        raise UserError(f"{cache.url}: the cache's classes {cache.class_names} are not the ones the model in {ckpt} "
                        f"was trained on ({cfg.num_classes}: {names})")
    mode = parse_views(views)
    if mode is not None and mode[1] != 1:
        raise UserError(f"--views {views}: a cache holds the features of one crop per frame, so from a cache S is 1 "
                        f"(e.g. {mode[0]}x1); `vtn predict --views {views}` takes 3 crops from raw video")
    videos, holdout = None, run / "holdout.json"
    if split is None:
        split = "val"
        if not len(cache.split_ids(split)) and holdout.is_file():
            held = json.loads(holdout.read_text())
            split, wanted = held["split"], set(held["ids"])
            videos = np.array([i for i, v in enumerate(cache.split_ids(split)) if v in wanted], dtype=np.int64)
    if not len(cache.split_ids(split)):
        raise UserError(f"{cache.url}: no videos in split '{split}' (the cache has splits {sorted(set(cache.splits))})")

    dev = resolve_device(device)
    model.to(dev)
    source = split_source(cache, split, load)
    started = time.perf_counter()
    if mode is None:
        dataset = ClipDataset(source, split=split, max_frames=cfg.max_positions, train=False, videos=videos)
        logits, index = predict(model, dataset, dev, batch_size)
        frames = int(dataset.sample_lengths().sum())
    else:
        frames_per_clip, stride = clip_settings(inputs)
        clips = [ClipDataset(source, split=split, clip_frames=frames_per_clip, stride=stride, train=False,
                             videos=videos, view=(k, mode[0])) for k in range(mode[0])]
        dataset = clips[0]
        index = np.arange(len(dataset))
        logits = mean_softmax(np.stack([_in_order(*predict(model, c, dev, batch_size)) for c in clips]))
        frames = int(dataset.sample_lengths().sum()) * mode[0]
    seconds = time.perf_counter() - started
    logits, index = _in_order(logits, index), np.sort(index)  # the cache's order of videos
    labels = np.asarray(dataset.labels)[index] if cache.class_names else np.full(len(index), -1)
    ids = [dataset.ids[i] for i in index]
    matrix = confusion(logits, labels)
    probs = np.exp(log_softmax(logits))
    metrics = {"checkpoint": str(ckpt), "cache": canonical_cache(cache.url), "split": split,
               **({"held_out_of_train": True} if videos is not None else {}), **classification_metrics(logits, labels),
               "views": {"mode": views, "clips": 1 if mode is None else mode[0], "crops": 1},
               "frames_through_backbone": frames, "seconds": round(seconds, 3)}
    if metrics["videos"]:
        metrics.update(per_class=per_class(logits, labels, names), most_confused=confused_pairs(matrix, names),
                       calibration=calibration(probs, labels))

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "prediction", "top5", "probabilities"])
        for vid, label, p, top in zip(ids, labels, probs, top_k(logits, 5)):
            w.writerow([vid, names[label] if label >= 0 else "", names[top[0]], ";".join(names[t] for t in top),
                        " ".join(f"{x:.6f}" for x in p)])
    with open(out / "confusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *names])
        for name, row in zip(names, matrix):
            w.writerow([name, *row.tolist()])
    if metrics["videos"]:
        plots.confusion_png(matrix, names, out / "confusion.png")
        plots.reliability_png(metrics["calibration"], out / "reliability.png")
    if attention:
        whole = ClipDataset(source, split=split, max_frames=cfg.max_positions, train=False, videos=videos)
        metrics["attention"] = write_attention(model, whole, cache, attention, dev, out / "attention")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _in_order(logits: np.ndarray, index: np.ndarray) -> np.ndarray:
    return logits[np.argsort(index)]


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
    shown = np.unique(np.linspace(0, len(index) - 1, min(len(index), 24)).round().astype(int))
    rows = {f"layer {k + 1}": w for k, w in enumerate(per_layer)} | {"rollout": rollout}
    name = re.sub(r"[^\w.-]+", "_", item["id"])
    png = plots.attention_png(read_frames(video, index[shown], height=48), rows,
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
