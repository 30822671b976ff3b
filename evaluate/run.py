"""`vtn evaluate RUN --cache CACHE`: a trained VTN on one split of a cache.

A flat job: load the checkpoint (config, weights, feature statistics, recorded inputs) and check the cache fits
it, predict every video of the split in the chosen inference mode, and write predictions.csv, confusion.csv,
metrics.json and the figures (confusion matrix, reliability diagram, and [CLS] attention with --attention). It
only reads checkpoints and caches (no training code): the inputs are prepared by the same library functions
training uses (vtn.temporal.data), so an evaluation reproduces the run's own val figures.

Inference modes: `full` (the paper's: one view over the whole video, one frame in the model's view_stride,
up to max_positions frames spread over it)
and `TxS` (PySlowFast / MMAction2 testing: T clips of the training clip length with starts evenly spaced over the
video, x S spatial crops, softmax scores averaged). A cache holds one crop, so from a cache S is 1.

Its settings (views, checkpoint, batch size, device, ...) are an EvaluateConfig (evaluate/settings.py).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np

from vtn import plots
from vtn.config import merge
from vtn.errors import UserError
from vtn.evaluate.attention import write_attention
from vtn.evaluate.settings import EvaluateConfig, parse_views
from vtn.paths import canonical_cache, check_run_dir
from vtn.progress import progress_bar
from vtn.runtime import resolve_device
from vtn.store import ClipDataset, FeatureCache, open_cache
from vtn.temporal.checkpoint import clip_settings, locate, read_inputs
from vtn.temporal.data import check_inputs, predict, split_source, whole_videos
from vtn.temporal.e2e import BACKBONE_FILE, load_temporal, reextract_command
from vtn.temporal.metrics import (calibration, classification_metrics, confused_pairs, confusion, log_softmax,
                                  mean_softmax, per_class, top_k)
from vtn.temporal.model import VTN


def evaluate(run: str | Path, cache_url: str, out: str | Path | None = None, settings: EvaluateConfig | None = None,
             progress: bool = False, **overrides) -> dict:
    """Evaluate the run's checkpoint on `settings.split` of the cache (None: "val", or the videos the run held out
    of its train split when the cache has no val split); writes into `out` (default: the run directory) and
    returns the metrics; `progress`: a bar on stderr over the videos (x the views). `overrides` change fields of `settings` (default EvaluateConfig()), checked as --set is.
    A cache without labels or class names (new videos to score) gets predictions and no accuracy."""
    settings = merge(settings or EvaluateConfig(), overrides)
    run = Path(run)
    # Given --out: never a folder of the user's. The default (the run itself) is checked by checkpoint.locate.
    out = check_run_dir(out, "evaluation") if out is not None else run
    ckpt = locate(run, settings.checkpoint)
    model = load_temporal(ckpt)  # weights and the feature normalisation it was trained with (no fine-tuned backbone)
    cache = open_cache(cache_url)
    inputs = read_inputs(ckpt)
    names = check_cache(model, cache, ckpt, inputs)
    views, mode = settings.views, parse_views(settings.views)
    if mode is not None and mode[1] != 1:
        raise UserError(f"--views {views}: a cache holds the features of one crop per frame, so from a cache S is 1 "
                        f"(e.g. {mode[0]}x1); `vtn predict --views {views}` takes 3 crops from raw video")
    split, videos = split_videos(cache, settings.split, run / "holdout.json")

    dev = resolve_device(settings.device)
    model.to(dev)
    source = split_source(cache, split, settings.load)
    started = time.perf_counter()
    total = len(cache.split_ids(split)) if videos is None else len(videos)
    bar = progress_bar(total=total * (1 if mode is None else mode[0]), unit="view", desc="evaluate",
                       leave=False) if progress else None
    done = bar.update if bar is not None else (lambda items: None)
    if mode is None:
        dataset = whole_videos(source, split, model.config, videos)
        logits, index = predict(model, dataset, dev, settings.batch_size, done=done)
        frames = int(dataset.sample_lengths().sum())
    else:
        frames_per_clip, stride = clip_settings(inputs)
        clips = [ClipDataset(source, split=split, clip_frames=frames_per_clip, stride=stride, train=False,
                             videos=videos, view=(k, mode[0])) for k in range(mode[0])]
        dataset = clips[0]
        index = np.arange(len(dataset))
        logits = mean_softmax(np.stack([_in_order(*predict(model, c, dev, settings.batch_size, done=done))
                                        for c in clips]))
        frames = int(dataset.sample_lengths().sum()) * mode[0]
    if bar is not None:
        bar.close()
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

    write_tables(out, ids, labels, logits, probs, matrix, names)
    if metrics["videos"]:
        plots.confusion_png(matrix, names, out / "confusion.png")
        plots.reliability_png(metrics["calibration"], out / "reliability.png")
    if settings.attention:
        whole = whole_videos(source, split, model.config, videos)
        metrics["attention"] = write_attention(model, whole, cache, settings.attention, dev, out / "attention")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def check_cache(model: VTN, cache: FeatureCache, ckpt: Path, inputs: dict | None) -> list[str]:
    """Refuse a cache whose features or classes are not the ones the checkpoint's model was trained on; returns
    the class names."""
    cfg = model.config
    if cache.feature_dim != cfg.feature_dim:
        raise UserError(f"{cache.url}: the cache's features have {cache.feature_dim} dimensions, but the model in "
                        f"{ckpt} was trained on feature_dim={cfg.feature_dim}")
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
    return names


def split_videos(cache: FeatureCache, split: str | None, holdout: Path) -> tuple[str, np.ndarray | None]:
    """The split to score and which of its videos (None: all). No split given: val, or when the cache has none,
    the videos the run held out of its train split (`holdout`, RUN/holdout.json)."""
    videos = None
    if split is None:
        split = "val"
        if not len(cache.split_ids(split)) and holdout.is_file():
            held = json.loads(holdout.read_text())
            split, wanted = held["split"], set(held["ids"])
            videos = np.array([i for i, v in enumerate(cache.split_ids(split)) if v in wanted], dtype=np.int64)
    if not len(cache.split_ids(split)):
        raise UserError(f"{cache.url}: no videos in split '{split}' (the cache has splits {sorted(set(cache.splits))})")
    return split, videos


def write_tables(out: Path, ids: list[str], labels: np.ndarray, logits: np.ndarray, probs: np.ndarray,
                 matrix: np.ndarray, names: list[str]) -> None:
    """predictions.csv (each video's label, prediction, top 5 and probabilities) and confusion.csv."""
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


def _in_order(logits: np.ndarray, index: np.ndarray) -> np.ndarray:
    return logits[np.argsort(index)]
