"""PNG figures people look at rather than read: confusion matrix, training curves, reliability diagram, attention.

matplotlib with the Agg backend (no display needed); scikit-learn's ConfusionMatrixDisplay for the confusion
matrix. Each function writes one PNG and returns its path. Shared by `vtn train` (curves), `vtn evaluate`,
`vtn report` and `vtn predict`, so it sits beside the CLI rather than in one stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path) -> Path:
    """Lay `fig` out, write it to `path` as a PNG and close it; returns the path."""
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def confusion_png(matrix: np.ndarray, names: list[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (each true class's videos sum to 1), class names on both axes."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = pyplot()
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    side = min(30.0, 3.0 + 0.45 * len(names))
    fig, ax = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay(norm, display_labels=names).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation="vertical", include_values=len(names) <= 30,
        values_format=".2f")
    ax.set_title("confusion (rows: true class, normalised)")
    return save(fig, path)


def curves_png(records: list[dict], path: str | Path) -> Path:
    """Training loss, learning rate and val top-1 against optimiser steps (one record per epoch)."""
    plt = pyplot()
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("train_loss", "lr", "val_top1"), ("train loss", "learning rate", "val top-1")):
        values = [r.get(key) for r in records]
        ax.plot(steps, [np.nan if v is None else v for v in values], marker="." if len(steps) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return save(fig, path)


def reliability_png(cal: dict, path: str | Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin (see metrics.calibration), with the diagonal."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    filled = [b for b in cal["bins"] if b["videos"]]
    ax.bar([(b["low"] + b["high"]) / 2 for b in filled], [b["accuracy"] for b in filled],
           width=[b["high"] - b["low"] for b in filled], edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
           title=f"reliability, ECE {cal['ece']:.3f}")
    ax.legend(loc="upper left")
    return save(fig, path)


def attention_png(thumbnails: list[np.ndarray], rows: dict[str, np.ndarray], title: str, path: str | Path) -> Path:
    """A strip of frame thumbnails ([h, w, 3] uint8, one per frame shown) over one bar chart per row of
    weights (e.g. [CLS]'s attention per layer, and the rollout), each over the same frames."""
    plt = pyplot()
    n = len(thumbnails)
    fig, axes = plt.subplots(1 + len(rows), 1, figsize=(max(6.0, 0.5 * n), 1.6 + 1.3 * len(rows)),
                             gridspec_kw={"height_ratios": [1.4] + [1.0] * len(rows)})
    strip = np.concatenate(thumbnails, axis=1) if n else np.zeros((8, 8, 3), np.uint8)
    axes[0].imshow(strip, extent=(-0.5, n - 0.5, 0, 1), aspect="auto")
    axes[0].set_axis_off()
    axes[0].set_title(title, fontsize=9)
    for ax, (name, w) in zip(axes[1:], rows.items()):
        ax.bar(np.arange(len(w)), w)
        ax.set_xlim(-0.5, len(w) - 0.5)
        ax.set_ylabel(name, rotation=0, ha="right", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("frame (in order)")
    return save(fig, path)
