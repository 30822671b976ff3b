"""Classification metrics of a set of videos: top-k, mean class accuracy, loss, confusion (scikit-learn).

Only labelled videos (label >= 0) count. Mean class accuracy is the mean of the per-class recalls over the
classes present (scikit-learn's balanced accuracy): the figure that does not let a large class hide a small
one.
Here rather than in evaluate/ because training reports the same figures each epoch and temporal/ may not
import evaluate/.
"""

from __future__ import annotations

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


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """videos (labelled ones), top1, top5, mean_class_accuracy and loss (mean cross-entropy) of `logits`
    [n, classes] against `labels` [n]."""
    keep = labels >= 0
    logits, labels = logits[keep], labels[keep]
    if not len(labels):
        return {"videos": 0}
    pred = top_k(logits, 5)
    return {
        "videos": int(len(labels)),
        "top1": float(np.mean(pred[:, 0] == labels)),
        "top5": float(np.mean((pred == labels[:, None]).any(axis=1))),
        # scikit-learn's balanced accuracy (recall averaged over the classes present), without its warning when
        # the videos are all of one class
        "mean_class_accuracy": float(np.mean([np.mean(pred[labels == c, 0] == c) for c in np.unique(labels)])),
        "loss": float(-log_softmax(logits)[np.arange(len(labels)), labels].mean()),
    }


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
