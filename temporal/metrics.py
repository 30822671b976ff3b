"""Classification metrics of a set of videos: top-k, mean class accuracy, loss, confusion (scikit-learn).

Only labelled videos (label >= 0) count. Mean class accuracy is the mean of the per-class recalls over the
classes present (scikit-learn's balanced accuracy): the figure that does not let a large class hide a small
one.
Each metric is defined once, in METRICS: its key, labels, direction and computation; classification_metrics,
the best-epoch rule (rank), the printed summary (summary_line) and the sweep and probe tables all read it, so a
new metric is one entry there (and its test).
Here rather than in evaluate/ because training reports the same figures each epoch and temporal/ may not
import evaluate/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.metrics import confusion_matrix


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def mean_softmax(logits: np.ndarray) -> np.ndarray:
    """Log of the mean softmax over the first axis of [views, n, classes] logits: multi-view testing's score."""
    probs = np.exp(log_softmax(logits.reshape(-1, logits.shape[-1]))).reshape(logits.shape).mean(0)
    return np.log(np.maximum(probs, 1e-30))


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """[n, min(k, classes)] class indices, best first."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(top_k(logits, 1)[:, 0] == labels))


def _top5(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((top_k(logits, 5) == labels[:, None]).any(axis=1)))


def _mean_class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    # scikit-learn's balanced accuracy (recall averaged over the classes present), without its warning when the
    # videos are all of one class
    pred = top_k(logits, 1)[:, 0]
    return float(np.mean([np.mean(pred[labels == c] == c) for c in np.unique(labels)]))


def _loss(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())


@dataclass(frozen=True)
class Metric:
    key: str  # its key in metrics dicts; `val_<key>` in metrics.jsonl, a sweep's metrics.json and tables
    name: str  # what summaries print ("mean class accuracy")
    column: str  # its column in the sweep and probe tables ("mean class")
    higher_is_better: bool
    compute: Callable[[np.ndarray, np.ndarray], float]  # (logits [n, classes], labels [n], all labelled) -> value
    format: str  # how summaries print a value
    in_tables: bool = True  # a column (mean ± std over seeds, in %) of the sweep and probe tables


METRICS = {m.key: m for m in (
    Metric("top1", "top-1", "top-1", True, _top1, ".1%"),
    Metric("top5", "top-5", "top-5", True, _top5, ".1%"),
    Metric("mean_class_accuracy", "mean class accuracy", "mean class", True, _mean_class_accuracy, ".1%"),
    Metric("loss", "loss", "loss", False, _loss, ".4f", in_tables=False),
)}
BEST_BY = ("top1", "loss")  # the best epoch: the highest top-1, ties to the lowest loss


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """videos (labelled ones) and every metric of METRICS (top1, top5, mean_class_accuracy, loss: mean
    cross-entropy) of `logits` [n, classes] against `labels` [n]."""
    keep = labels >= 0
    logits, labels = logits[keep], labels[keep]
    if not len(labels):
        return {"videos": 0}
    return {"videos": int(len(labels)), **{m.key: m.compute(logits, labels) for m in METRICS.values()}}


def table_metrics() -> list[Metric]:
    """The metrics the sweep and probe tables show, in METRICS' order."""
    return [m for m in METRICS.values() if m.in_tables]


def rank(record: dict, prefix: str = "val_") -> tuple:
    """Sort key of an epoch's record by the best-epoch rule (BEST_BY): the larger, the better. `prefix`: "val_"
    for metrics.jsonl records, "" for classification_metrics' dicts."""
    return tuple(record[prefix + k] if METRICS[k].higher_is_better else -record[prefix + k] for k in BEST_BY)


def summary_line(metrics: dict) -> str:
    """`top-1 50.0%  top-5 100.0%  mean class accuracy 50.0%  loss 0.8482` of classification_metrics' dict."""
    return "  ".join(f"{m.name} {metrics[m.key]:{m.format}}" for m in METRICS.values())


def confusion(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[classes, classes] counts of the labelled videos: row = true class, column = predicted class."""
    keep = labels >= 0
    classes = logits.shape[1]
    if not keep.any():  # scikit-learn refuses an empty input
        return np.zeros((classes, classes), dtype=np.int64)
    return confusion_matrix(labels[keep], logits[keep].argmax(axis=1), labels=np.arange(classes))


def per_class(logits: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """{class name: {precision, recall, f1, videos}} over the labelled videos (scikit-learn's definitions;
    a class never predicted has precision 0)."""
    from sklearn.metrics import precision_recall_fscore_support

    keep = labels >= 0
    if not keep.any():
        return {}
    p, r, f, n = precision_recall_fscore_support(labels[keep], logits[keep].argmax(1), labels=np.arange(len(names)),
                                                 zero_division=0)
    return {name: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]), "videos": int(n[c])}
            for c, name in enumerate(names)}


def confused_pairs(matrix: np.ndarray, names: list[str], k: int = 5) -> list[dict]:
    """The `k` largest off-diagonal cells of a confusion matrix: which true class is taken for which, how often."""
    off = matrix.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    return [{"true": names[i], "predicted": names[j], "videos": int(off[i, j])}
            for i, j in zip(*np.unravel_index(order, off.shape)) if off[i, j] > 0]


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Expected calibration error of the top-1 confidence over `bins` equal-width bins (Guo et al. 2017), with
    each bin's confidence, accuracy and count for a reliability diagram."""
    keep = labels >= 0
    conf, correct = probs[keep].max(1), (probs[keep].argmax(1) == labels[keep])
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out = {"ece": 0.0, "bins": []}
    for b in range(bins):
        sel = which == b
        if sel.any():
            out["ece"] += sel.mean() * abs(conf[sel].mean() - correct[sel].mean())
        out["bins"].append({"low": float(edges[b]), "high": float(edges[b + 1]), "videos": int(sel.sum()),
                            "confidence": float(conf[sel].mean()) if sel.any() else None,
                            "accuracy": float(correct[sel].mean()) if sel.any() else None})
    out["ece"] = float(out["ece"])
    return out
