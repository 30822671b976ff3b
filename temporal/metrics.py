"""Classification metrics of a set of videos: top-k, mean class accuracy, loss, confusion (scikit-learn).

Only labelled videos (label >= 0) count. Mean class accuracy is the mean of the per-class recalls over the
classes present (scikit-learn's balanced accuracy): the figure that does not let a large class hide a small
one.
Here rather than in evaluate/ because training reports the same figures each epoch and temporal/ may not
import evaluate/.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


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
        "mean_class_accuracy": float(balanced_accuracy_score(labels, pred[:, 0])),
        "loss": float(-log_softmax(logits)[np.arange(len(labels)), labels].mean()),
    }


def confusion(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[classes, classes] counts of the labelled videos: row = true class, column = predicted class."""
    keep = labels >= 0
    classes = logits.shape[1]
    if not keep.any():  # scikit-learn refuses an empty input
        return np.zeros((classes, classes), dtype=np.int64)
    return confusion_matrix(labels[keep], logits[keep].argmax(axis=1), labels=np.arange(classes))
