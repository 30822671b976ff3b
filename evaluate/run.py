"""`vtn evaluate RUN --cache CACHE`: a trained VTN on one split of a cache, one view over each whole video.

A flat job: load the checkpoint (config, weights, feature statistics) and check the cache fits it, predict
every video of the split, and write predictions.csv, confusion.csv and metrics.json. It only reads
checkpoints and caches (no training code): the inputs are prepared by the same library function training
uses (vtn.temporal.data), so an evaluation reproduces the run's own val figures.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from vtn.errors import UserError
from vtn.temporal.metrics import classification_metrics, confusion, log_softmax, top_k
from vtn.runtime import resolve_device
from vtn.store import ClipDataset, open_cache
from vtn.temporal.checkpoint import read_inputs
from vtn.temporal.data import check_inputs, predict, split_source
from vtn.temporal.model import CONFIG_NAME, VTN


def checkpoint_dir(run: Path, checkpoint: str) -> Path:
    """RUN/<checkpoint> (best or last) of a training run, or RUN itself when it is a checkpoint directory."""
    if (run / CONFIG_NAME).is_file():
        return run
    path = run / checkpoint
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"{run}: neither a training run with a {checkpoint}/ checkpoint nor a checkpoint directory")
    return path


def evaluate(run: str | Path, cache_url: str, split: str | None = None, out: str | Path | None = None,
             checkpoint: str = "best", batch_size: int = 16, device: str = "auto", load: str = "auto") -> dict:
    """Evaluate the run's checkpoint on `split` of the cache (None: "val", or the videos the run held out of its
    train split when the cache has no val split); writes into `out` (default: the run directory) and returns the
    metrics. A cache without labels or class names (new videos to score) gets predictions and no accuracy."""
    run = Path(run)
    ckpt = checkpoint_dir(run, checkpoint)
    model = VTN.from_pretrained(ckpt)  # weights and the feature normalisation it was trained with
    cfg = model.config
    cache = open_cache(cache_url)
    if cache.feature_dim != cfg.feature_dim:
        raise UserError(f"{cache.url}: the cache's features have {cache.feature_dim} dimensions, but the model in "
                        f"{ckpt} was trained on feature_dim={cfg.feature_dim}")
    check_inputs(read_inputs(ckpt), cache, ckpt)
    names = list(cfg.class_names) or [str(i) for i in range(cfg.num_classes)]
    if cache.class_names and (len(cache.class_names) != cfg.num_classes
                              or (cfg.class_names and list(cfg.class_names) != cache.class_names)):
        raise UserError(f"{cache.url}: the cache's classes {cache.class_names} are not the ones the model in {ckpt} "
                        f"was trained on ({cfg.num_classes}: {names})")
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
    dataset = ClipDataset(split_source(cache, split, load), split=split, clip_frames=None,
                          max_frames=cfg.max_positions, train=False, videos=videos)
    logits, index = predict(model, dataset, dev, batch_size)
    order = np.argsort(index)  # back to the cache's order of videos
    logits, index = logits[order], index[order]
    labels = np.asarray(dataset.labels)[index] if cache.class_names else np.full(len(index), -1)
    ids = [dataset.ids[i] for i in index]
    metrics = {"checkpoint": str(ckpt), "cache": cache.url, "split": split,
               **({"held_out_of_train": True} if videos is not None else {}), **classification_metrics(logits, labels)}

    out = Path(out) if out is not None else run
    out.mkdir(parents=True, exist_ok=True)
    probs = np.exp(log_softmax(logits))
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "prediction", "top5", "probabilities"])
        for vid, label, p, top in zip(ids, labels, probs, top_k(logits, 5)):
            w.writerow([vid, names[label] if label >= 0 else "", names[top[0]], ";".join(names[t] for t in top),
                        " ".join(f"{x:.6f}" for x in p)])
    with open(out / "confusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *names])
        for name, row in zip(names, confusion(logits, labels)):
            w.writerow([name, *row.tolist()])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
