"""Baselines that see no frame order: scikit-learn probes on a run's train and val videos (`vtn probe`, and
`vtn sweep --probes` as rows of its table).

- logistic regression on each video's mean-pooled features (every frame);
- an MLP (one hidden layer of 256) on mean and max pooling side by side;
- a single-frame baseline: logistic regression on single frames (up to 8 per train video, spread evenly),
  scored on each val video's centre frame.

Features are standardised (per dimension, train statistics) first. Each row holds the val figures of every table
metric of temporal/metrics.py, in the format of temporal/results.py's table, with the model's parameters and fit
seconds.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from vtn.progress import progress_bar
from vtn.runtime import Processes
from vtn.store.dataset import ClipDataset
from vtn.temporal.metrics import classification_metrics, table_metrics
from vtn.temporal.settings import model_config
from vtn.temporal.splits import load_data

FRAMES_PER_VIDEO = 8  # single-frame baseline: training frames per video


def whole_videos(dataset: ClipDataset) -> ClipDataset:
    """The same videos, every frame of each."""
    whole = copy.copy(dataset)
    whole.clip_frames, whole.stride, whole.max_frames, whole.train = None, 1, None, False
    return whole


def pooled(dataset: ClipDataset) -> dict:
    """Per video: mean, max, centre frame [n, D]; labels [n]; and up to FRAMES_PER_VIDEO frames per video with
    their labels, for the single-frame baseline."""
    means, maxes, centres, frames, frame_labels = [], [], [], [], []
    for i in range(len(dataset)):
        x = dataset[i]["features"].numpy().astype(np.float64)
        means.append(x.mean(0))
        maxes.append(x.max(0))
        centres.append(x[len(x) // 2])
        pick = np.unique(np.linspace(0, len(x) - 1, min(len(x), FRAMES_PER_VIDEO)).round().astype(int))
        frames.append(x[pick])
        frame_labels.append(np.full(len(pick), dataset.labels[i]))
    return {"mean": np.stack(means), "max": np.stack(maxes), "centre": np.stack(centres),
            "labels": np.asarray(dataset.labels), "frames": np.concatenate(frames),
            "frame_labels": np.concatenate(frame_labels)}


def logistic():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def mlp(seed: int):
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(256,), max_iter=500, random_state=seed))


def logits_of(model, x: np.ndarray, classes: int) -> np.ndarray:
    """Log-probabilities [n, classes] over every class of the cache (a class absent from training gets ~0)."""
    out = np.full((len(x), classes), np.log(1e-12))
    out[:, model.classes_] = np.log(np.maximum(model.predict_proba(x), 1e-12))
    return out


def parameters(model) -> int:
    est = model[-1]
    if hasattr(est, "coefs_"):
        return int(sum(w.size for w in est.coefs_) + sum(b.size for b in est.intercepts_))
    return int(est.coef_.size + est.intercept_.size)


def probe_rows(cache, cfg, sources: dict | None = None, progress: bool = False) -> list[dict]:
    """Fit and score each probe on the train and val videos a `vtn train` run of `cfg` (a TrainConfig) takes from
    `cache` (splits.py's load_data; `sources` as there), over the cache's classes; rows in the format of
    temporal/results.py's table. `progress`: a bar on stderr over the probes."""
    data = load_data(cache, cfg, model_config(cfg, cache), Processes(), sources)
    train, val = (pooled(whole_videos(d)) for d in (data.train, data.val))
    classes, seed = len(cache.class_names), cfg.run.seed
    specs = [
        ("probe: logistic regression (mean pooling)", logistic(), train["mean"], train["labels"], val["mean"]),
        ("probe: MLP (mean + max pooling)", mlp(seed), np.hstack([train["mean"], train["max"]]), train["labels"],
         np.hstack([val["mean"], val["max"]])),
        ("probe: single frame (logistic regression)", logistic(), train["frames"], train["frame_labels"],
         val["centre"]),
    ]
    rows = []
    for name, model, x, y, x_val in progress_bar(iterable=specs, desc="probe", unit="probe", leave=False, disable=not progress):
        keep = y >= 0
        tick = time.perf_counter()
        model.fit(x[keep], y[keep])
        seconds = time.perf_counter() - tick
        metrics = classification_metrics(logits_of(model, x_val, classes), val["labels"])
        row = {"run": name, "seeds": 1}
        for m in table_metrics():
            row[f"val_{m.key}_mean"], row[f"val_{m.key}_std"] = metrics[m.key], 0.0
        rows.append({**row, "parameters": parameters(model), "train_seconds": round(seconds, 2)})
    return rows
