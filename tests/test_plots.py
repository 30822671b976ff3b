"""The figures read as they should: what each one shows is asserted on the matplotlib figure its builder returns
(texts, axis limits, line styles, laid-out extents), no image comparison."""

import numpy as np
import pytest

from vtn import plots


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plots.pyplot().close("all")


def laid_out(fig):
    """`fig` laid out as `plots.save` lays it out, and drawn, so extents are final; returns its renderer."""
    fig.tight_layout()
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_confusion_cells_hold_counts_and_an_empty_row_says_no_videos():
    names = ["left_to_right_red_first", "run", "walk"]
    fig = plots.confusion_figure(np.array([[3, 1, 0], [0, 0, 0], [1, 0, 2]]), names)
    ax = fig.axes[0]
    assert texts(ax) == ["3", "1", "0", "no videos", "1", "0", "2"]  # counts, not row shares like 0.00
    assert [t.get_text() for t in ax.get_yticklabels()] == ["left_to_right_red_first (4)", "run (0)", "walk (3)"]
    renderer = laid_out(fig)
    inside = fig.bbox.padded(1)  # the title, every tick label and the axis labels fit in the figure
    for artist in [ax.title, *ax.get_xticklabels(), *ax.get_yticklabels(), ax.xaxis.label, ax.yaxis.label]:
        box = artist.get_window_extent(renderer)
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, artist


def test_reliability_bars_carry_their_counts_and_the_legend_sits_below_the_axes():
    # metrics.calibration's shape, by hand (no torch import): 5 bins, 3 of them filled
    counts, accuracy = [0, 0, 120, 1, 1500], [None, None, 0.5, 0.0, 0.9]
    cal = {"ece": 0.1, "bins": [{"low": i / 5, "high": (i + 1) / 5, "videos": n, "accuracy": a,
                                 "confidence": None if a is None else i / 5 + 0.1}
                                for i, (n, a) in enumerate(zip(counts, accuracy))]}
    fig = plots.reliability_figure(cal)
    ax = fig.axes[0]
    assert texts(ax) == ["120", "1", "1500"]  # a bin of wrong answers still shows its count
    assert [p.get_height() for p in ax.patches] == [0.5, 0.0, 0.9]
    renderer = laid_out(fig)
    legend, axes_box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.y1 < axes_box.y0 and fig.bbox.y0 <= legend.y0  # off the bars, still in the figure


def test_curves_are_lines_on_a_0_to_100_percent_axis_even_with_few_points():
    records = [{"step": 5, "lr": 1e-3, "train_loss": 1.0, "val_top1": 0.5},
               {"step": 10, "lr": 5e-4, "train_loss": 0.5},  # a record without val top-1 is skipped, not a gap
               {"step": 15, "lr": 0.0, "train_loss": 0.2, "val_top1": 1.0}]
    fig = plots.curves_figure(records)
    loss, lr, top1 = fig.axes
    assert top1.get_ylim() == (0, 100)
    line = top1.get_lines()[0]
    assert list(line.get_xdata()) == [5, 15] and list(line.get_ydata()) == [50.0, 100.0]
    assert line.get_linestyle() == "-" and line.get_marker() == "o"
    assert list(loss.get_lines()[0].get_xdata()) == [5, 10, 15]


def test_attention_thumbnails_keep_their_aspect_ratio_over_a_time_axis_in_seconds():
    portrait = [np.full((96, 54, 3), 200, np.uint8), np.full((96, 54, 3), 50, np.uint8)]  # a 2-frame portrait clip
    times = np.array([0.0, 0.25])
    rows = {"layer 1": np.array([0.4, 0.6]), "rollout": np.array([0.45, 0.55])}
    fig = plots.attention_figure(portrait, np.array([0, 1]), times, rows, "clip.mp4")
    strip, *bars = fig.axes
    renderer = laid_out(fig)
    box = strip.get_window_extent(renderer)
    assert box.width / box.height == pytest.approx((2 * 54 + 6) / 96, rel=0.02)  # 2 thumbnails, 2 gaps of 3 px
    assert [t.get_text() for t in strip.get_xticklabels()] == ["0.00 s", "0.25 s"]
    for ax in bars:
        assert list(ax.get_xticks()) == [0.0, 0.25] and ax.get_xlim()[0] < 0 < 0.25 < ax.get_xlim()[1]
    assert bars[-1].get_xlabel() == "time in the video (s)"
    long = np.arange(60) / 12  # 5 s: ticks on whole seconds
    fig = plots.attention_figure(portrait, np.array([0, 59]), long, {"rollout": np.full(60, 1 / 60)}, "long.mp4")
    ticks = fig.axes[1].get_xticks()
    assert len(ticks) >= 3 and np.array_equal(ticks, ticks.round())


def test_results_draw_numbers_as_a_line_other_values_as_points_and_say_how_other_keys_are_handled():
    from vtn.temporal.results import plot_figure

    def row(lr, window, top1):
        return {"run": f"{lr}-{window}", "optim.lr": lr, "model.attention_window": window, "val_top1_mean": top1,
                "val_top1_std": 0.0}

    rows = [row(1e-4, [4, 8], 0.5), row(1e-3, [4, 8], 1.0), row(1e-4, 6, 0.75), row(1e-3, 6, 0.8),
            {"run": "probe: mean", "val_top1_mean": 0.25, "val_top1_std": 0.0}]
    fig = plot_figure(rows, ["optim.lr", "model.attention_window"])
    lr, window = fig.axes
    assert lr.get_lines()[0].get_linestyle() == "-" and lr.get_xscale() == "log"  # a factor of 10: log axis
    assert window.get_lines()[0].get_linestyle() == "None"  # names and lists: no line between them
    assert [t.get_text() for t in window.get_xticklabels()] == ["[4,8]", "6"]
    assert lr.get_title() == "mean over model.attention_window" and window.get_title() == "mean over optim.lr"
    assert lr.get_ylim() == window.get_ylim() == (0, 100)
    assert list(window.get_lines()[0].get_ydata()) == [75.0, 77.5]  # each value's mean over the learning rates
