"""PNG figures people look at rather than read: confusion matrix, training curves, reliability diagram, attention.

matplotlib with the Agg backend (no display needed). Each `*_figure` function builds one figure and returns it
(tests read its axes, texts and limits); each `*_png` writes that figure and returns the path. Shared by
`vtn train` (curves), `vtn evaluate`, `vtn report`, `vtn predict` and `vtn sweep`, so it sits beside the CLI
rather than in one stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PERCENT = {"val_top1"}  # record keys that are fractions, drawn as 0-100 %


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


def confusion_figure(matrix: np.ndarray, names: list[str]):
    """Each cell the count of videos of its row's true class predicted as its column's class, coloured by its
    share of the row; a class without videos is a grey row marked "no videos" (no share to show)."""
    plt = pyplot()
    n, longest = len(names), max((len(s) for s in names), default=1)
    rows = matrix.sum(axis=1)
    share = np.ma.masked_array(matrix / np.maximum(rows, 1)[:, None], mask=np.repeat(rows == 0, n))
    side = min(30.0, 2.5 + 0.5 * n + 0.07 * longest)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(share, cmap=plt.get_cmap("Blues").with_extremes(bad="0.9"), vmin=0, vmax=1)
    if n <= 30:
        size = 9 if n <= 10 else 7
        for i in range(n):
            if not rows[i]:
                ax.text((n - 1) / 2, i, "no videos", ha="center", va="center", fontsize=size, style="italic",
                        color="0.35")
                continue
            for j in range(n):
                ax.text(j, i, f"{matrix[i, j]:g}", ha="center", va="center", fontsize=size,
                        color="white" if share[i, j] > 0.6 else "0.6" if not matrix[i, j] else "black")
    ax.set_xticks(range(n), names, rotation=90 if longest > 3 else 0, fontsize=8)
    ax.set_yticks(range(n), [f"{s} ({c:g})" for s, c in zip(names, rows)], fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class (videos)")
    ax.set_title("videos per true and predicted class\n(colour: share of the true class's videos)",
                 fontsize=min(10.0, max(6.0, 2.2 * side)))
    return fig


def confusion_png(matrix: np.ndarray, names: list[str], path: str | Path) -> Path:
    """confusion_figure as a PNG."""
    return save(confusion_figure(matrix, names), path)


def curves_figure(records: list[dict]):
    """Training loss, learning rate and val top-1 (0-100 %) against optimiser steps, one point per record (an
    evaluated epoch), joined by lines; a key a record lacks is skipped, not a gap."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("train_loss", "lr", "val_top1"),
                              ("train loss", "learning rate", "val top-1 (%)")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None and np.isfinite(r[key])]
        scale = 100.0 if key in PERCENT else 1.0
        ax.plot([s for s, _ in points], [scale * v for _, v in points], "-", marker="o" if len(points) <= 30 else None,
                markersize=4)
        if key in PERCENT:
            ax.set_ylim(0, 100)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return fig


def curves_png(records: list[dict], path: str | Path) -> Path:
    """curves_figure as a PNG."""
    return save(curves_figure(records), path)


def reliability_figure(cal: dict):
    """Reliability diagram: accuracy against confidence per bin (see metrics.calibration), each bar with its
    number of videos, the diagonal, and the legend below the axes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 5.2))
    filled = [b for b in cal["bins"] if b["videos"]]
    ax.bar([(b["low"] + b["high"]) / 2 for b in filled], [b["accuracy"] for b in filled],
           width=[b["high"] - b["low"] for b in filled], edgecolor="black", alpha=0.7, label="accuracy of the bin")
    wide = max((b["videos"] for b in filled), default=0) >= 1000
    for b in filled:
        ax.text((b["low"] + b["high"]) / 2, 0.01, f"{b['videos']}", ha="center", va="bottom", fontsize=7,
                rotation=90 if wide else 0)
    ax.plot([0, 1], [0, 1], "k--", label="calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy")
    ax.set_title(f"reliability, ECE {cal['ece']:.3f}\n(number in a bar: its videos)", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    return fig


def reliability_png(cal: dict, path: str | Path) -> Path:
    """reliability_figure as a PNG."""
    return save(reliability_figure(cal), path)


def attention_figure(thumbnails: list[np.ndarray], shown: np.ndarray, times: np.ndarray,
                     rows: dict[str, np.ndarray], title: str):
    """A strip of frame thumbnails ([h, w, 3] uint8 of one height, drawn at their own aspect ratio), frames
    `shown` of the video, each labelled with its time, over one bar chart per row of weights (e.g. [CLS]'s
    attention per layer, and the rollout), each weight at its frame's time `times` (seconds)."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    thumbnails = [np.pad(t, ((0, 0), (0, 3), (0, 0)), constant_values=255) for t in thumbnails]  # a white gap each
    strip = np.concatenate(thumbnails, axis=1) if thumbnails else np.full((8, 8, 3), 128, np.uint8)
    width = 12.0
    strip_height = min(1.6, width * strip.shape[0] / strip.shape[1])
    fig, axes = plt.subplots(1 + len(rows), 1, figsize=(width, 0.9 + strip_height + 1.1 * len(rows)),
                             gridspec_kw={"height_ratios": [strip_height] + [1.0] * len(rows)})
    axes[0].imshow(strip, aspect="equal")
    edges = np.cumsum([0] + [t.shape[1] for t in thumbnails])
    axes[0].set_xticks((edges[:-1] + edges[1:] - 3) / 2 - 0.5, [f"{times[i]:.2f} s" for i in shown], fontsize=7)
    axes[0].set_yticks([])
    axes[0].tick_params(length=0)
    for spine in axes[0].spines.values():
        spine.set_visible(False)
    axes[0].set_title(title, fontsize=9)
    gaps = np.diff(times)
    bar = 0.8 * (np.median(gaps[gaps > 0]) if (gaps > 0).any() else 0.1)
    for ax, (name, w) in zip(axes[1:], rows.items()):
        ax.bar(times, w, width=bar)
        ax.set_xlim(times.min() - bar, times.max() + bar)
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(times) <= 12:  # each frame's own time
            ax.set_xticks(times, [f"{t:.2f}" for t in times])
        else:  # whole seconds where the video lasts a few
            ax.xaxis.set_major_locator(MaxNLocator(integer=times.max() - times.min() >= 2))
    axes[-1].set_xlabel("time in the video (s)")
    return fig


def attention_png(thumbnails: list[np.ndarray], shown: np.ndarray, times: np.ndarray, rows: dict[str, np.ndarray],
                  title: str, path: str | Path) -> Path:
    """attention_figure as a PNG."""
    return save(attention_figure(thumbnails, shown, times, rows, title), path)
