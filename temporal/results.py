"""The comparison of stage-two runs and baselines: the table (mean ± std over seeds of each table metric of
temporal/metrics.py), written as CSV and Markdown, and the plot of val top-1 against each varied key.

`vtn sweep` writes DIR/results.{csv,md,png} with it, `vtn probe --out` DIR/probes.{csv,md}. A row is one config
(its runs differ only in seed), named by its varied values (run_name); a baseline's row is named `probe: ...` and
drawn in the plot as a horizontal line.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vtn.config import to_dict
from vtn.plots import pyplot, save
from vtn.temporal.metrics import METRICS, table_metrics

PLOTTED = "top1"  # the metric results.png draws


@dataclass(frozen=True)
class Run:
    name: str
    values: dict  # flat config key -> value: what this run varies (run.seed included)
    cfg: object  # TrainConfig


def short_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(short_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_name(values: dict) -> str:
    """`lr-0.001_num_layers-3_seed-0`: each key's last part (the whole key where two would clash) and value."""
    last = [k.rsplit(".", 1)[-1] for k in values]
    parts = [f"{k.rsplit('.', 1)[-1] if last.count(k.rsplit('.', 1)[-1]) == 1 else k}-{short_value(v)}"
             for k, v in values.items()]
    return "_".join(parts).replace("/", "-").replace(" ", "")


def varied_keys(runs: list[Run]) -> list[str]:
    """Keys that vary across the runs' configs, run.seed excluded (seeds are averaged)."""
    return list(dict.fromkeys(k for r in runs for k in r.values if k != "run.seed"))


def config_value(cfg, key: str):
    node = to_dict(cfg)
    for k in key.split("."):
        node = node[k]
    return node


def mean_std(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std


def table(runs: list[Run], results: list[dict]) -> list[dict]:
    """One row per config (its runs differ only in seed): the varied keys' values, the seeds, mean and std of
    each metric, parameters and mean train seconds."""
    keys = varied_keys(runs)
    groups: dict[str, list[tuple[Run, dict]]] = {}
    for r, res in zip(runs, results):
        name = run_name({k: v for k, v in r.values.items() if k != "run.seed"}) or "base"
        groups.setdefault(name, []).append((r, res))
    rows = []
    for name, members in groups.items():
        run = members[0][0]
        # a value that is no config key (a several-cache sweep's backbone) is the run's own
        row = {"run": name, **{k: run.values[k] if k in run.values else config_value(run.cfg, k) for k in keys},
               "seeds": len(members)}
        for m in table_metrics():
            row[f"val_{m.key}_mean"], row[f"val_{m.key}_std"] = mean_std([res[f"val_{m.key}"] for _, res in members])
        row["diverged"] = sum(res.get("diverged_at_step") is not None for _, res in members)  # .get: older runs
        row["parameters"] = members[0][1]["parameters"]
        row["train_seconds"] = round(mean_std([res["train_seconds"] for _, res in members])[0], 2)
        rows.append(row)
    return rows


def _cell(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_cell(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], keys: list[str]) -> str:
    head = ["run", *keys, "seeds", *(m.column for m in table_metrics()), "parameters", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        run = row["run"] + (f" (diverged: {row['diverged']} of {row['seeds']})" if row.get("diverged") else "")
        cells = [run, *(_cell(row.get(k)) for k in keys), str(row["seeds"])]
        cells += [f"{100 * row[f'val_{m.key}_mean']:.1f} ± {100 * row[f'val_{m.key}_std']:.1f}"
                  for m in table_metrics()]
        cells += [f"{row['parameters']:,}", f"{row['train_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], out: Path, keys: list[str], base=None, name: str = "results",
                  base_values: dict | None = None) -> None:
    """`name`.csv, `name`.md and (with varied keys) `name`.png in `out`; prints the Markdown table. `base_values`:
    the base's values of keys that are no config key (a several-cache sweep's backbone)."""
    columns = ["run", *keys, "seeds", *(f"val_{m.key}_{s}" for m in table_metrics() for s in ("mean", "std")),
               "parameters", "train_seconds", "diverged"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, **{k: _cell(r.get(k)) for k in keys}} for r in rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.csv").write_text(buf.getvalue())
    md = markdown(rows, keys)
    (out / f"{name}.md").write_text(md)
    print(md, end="", flush=True)
    if keys:
        plot(rows, keys, out / f"{name}.png", base, base_values)
    print(f"written: {out / (name + '.csv')}, {out / (name + '.md')}" + (f", {out / (name + '.png')}" if keys else ""))


def plot(rows: list[dict], keys: list[str], path: Path, base=None, base_values: dict | None = None) -> None:
    """plot_figure as a PNG."""
    save(plot_figure(rows, keys, base, base_values), path)


def plot_figure(rows: list[dict], keys: list[str], base=None, base_values: dict | None = None):
    """Val top-1 (PLOTTED, 0-100 %) against each varied key, one panel per key: the configs whose other varied keys
    are at the `base` config's values, else the mean over the others (each panel says which); numeric values on a
    numeric axis joined by a line (logarithmic when they span a factor of 10 or more), other values (names, lists,
    booleans) as separate points; probes as horizontal lines."""
    plt = pyplot()
    runs = [r for r in rows if not r["run"].startswith("probe")]
    mean, std = f"val_{PLOTTED}_mean", f"val_{PLOTTED}_std"
    at_base = {k: _cell(base_values[k] if base_values and k in base_values else config_value(base, k))
               for k in (keys if base is not None else [])}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        others = [k for k in keys if k != key]
        mine = [r for r in runs if base is not None and all(_cell(r[k]) == at_base[k] for k in others)]
        note = ", ".join(f"{k}={at_base[k]}" for k in others) if mine else ""
        if len({_cell(r[key]) for r in mine}) < 2:  # no ablation of this key alone: the mean over the others
            mine, note = runs, "mean over " + ", ".join(others) if others else ""
        groups: dict[str, list[dict]] = {}
        for r in mine:
            groups.setdefault(_cell(r[key]), []).append(r)
        raw = [g[0][key] for g in groups.values()]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
        xs = [float(v) for v in raw] if numeric else list(range(len(raw)))
        means = [100 * sum(r[mean] for r in g) / len(g) for g in groups.values()]
        stds = [100 * max(r[std] for r in g) for g in groups.values()]
        order = np.argsort(xs, kind="stable")
        ax.errorbar(np.take(xs, order), np.take(means, order), yerr=np.take(stds, order), fmt="o-" if numeric else "o",
                    capsize=3, label="VTN")
        if numeric and min(xs) > 0 and max(xs) >= 10 * min(xs):
            ax.set_xscale("log")
        if numeric:
            ax.set_xticks(xs, list(groups), minor=False)
            ax.minorticks_off()
        else:
            ax.set_xticks(xs, list(groups))
            ax.set_xlim(-0.5, len(xs) - 0.5)
        long = max(len(x) for x in groups) > 6
        ax.tick_params(axis="x", labelsize=8, labelrotation=30 if long else 0)
        if long:
            for label in ax.get_xticklabels():
                label.set_ha("right")
        for r in rows:
            if r["run"].startswith("probe"):
                ax.axhline(100 * r[mean], ls="--", lw=1, color="grey")
                ax.text(ax.get_xlim()[0], 100 * r[mean], " " + r["run"][len("probe: "):], fontsize=7, va="bottom")
        ax.set_ylim(0, 100)
        ax.set_xlabel(key)
        ax.set_ylabel(f"val {METRICS[PLOTTED].column} (%)")
        ax.set_title(note or "the only varied key", fontsize=8)
        ax.grid(alpha=0.3)
    return fig
