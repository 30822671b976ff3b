"""`vtn ablate INPUT --out DIR --backbone A --backbone B ...`: the VTN paper's ablation study in one command.

It composes the recipes, each stage resuming where a former run of the same command stopped:

1. extract: every backbone in one decode pass (extract/job.py, `vtn extract --backbone A --backbone B`), one
   ordinary cache each, DIR/caches/<name>.zarr; videos already in every cache are skipped.
2. sweep: the encoder ablations (`vtn sweep --preset ablations`: frames, stride, depth, windows, positions, one at
   a time from the base config; or the given `--grid`) on every cache in one sweep, with the probes, in
   DIR/sweep/; finished runs are skipped, interrupted ones resumed.
3. finetune: `vtn finetune` (its defaults, `--finetune-steps` steps) of every seed of each backbone's best
   stage-two config, in DIR/finetune/<run>/; a run with its metrics.json is finished, others resume.
4. report: DIR/report.md and DIR/report-<table>.png, rebuilt from the runs' metrics.json every time: the paper's
   tables (backbone; frames x rate; depth; windows; positions; frozen vs fine-tuned), each cell the best epoch's
   val top-1, mean ± std over the seeds, with the mean train seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# What each config key an ablation varies belongs to: the report's tables, in the paper's order.
TABLES = {"data.clip_frames": "Frames x rate", "data.stride": "Frames x rate", "model.num_layers": "Depth",
          "model.attention_window": "Windows", "model.positions": "Positions"}
# No dropout by default, so the seeds of a config train together as one batched model (temporal/batched.py); --set
# model.dropout=0.1 (etc.) restores vtn train's.
NO_DROPOUT = ["model.dropout=0", "model.attention_dropout=0", "model.head_dropout=0"]
RESULT = "metrics.json"  # a finished fine-tuning run's record (as a sweep's finished run)


def register(sub) -> None:
    """Add `vtn ablate` to `vtn`."""
    from vtn.config import add_config_args

    p = sub.add_parser(
        "ablate", help="the paper's ablation study in one command: backbones, encoder ablations, frozen vs fine-tuned",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs four stages into DIR, each resuming what a former run of the same command left (re-run it "
        "after an interruption; finished work is never redone):\n"
        "  1. extract: every --backbone on one decode pass into DIR/caches/<name>.zarr (vtn extract --backbone A\n"
        "     --backbone B). Costs one decode of every video plus each backbone's forward on every sampled frame.\n"
        "  2. sweep: the encoder ablations (vtn sweep --preset ablations: frames, stride, depth 1/3/6, uniform vs\n"
        "     growing windows, positions; about 11 configs) or the --grid, x --seeds, on every cache, with the probes,\n"
        "     into DIR/sweep/. Costs configs x backbones x --steps stage-two steps (seeds train batched when the\n"
        "     encoder has no dropout); usually the longest stage.\n"
        "  3. finetune: vtn finetune (its defaults) of every seed of each backbone's best stage-two config for\n"
        "     --finetune-steps steps, into DIR/finetune/<run>/ (0: skipped). Costs backbones x seeds x steps backbone\n"
        "     forward+backward passes over a step's frames, plus whole-video evaluations.\n"
        "  4. report: DIR/report.md and DIR/report-*.png, the paper's tables (backbone; frames x rate; depth;\n"
        "     windows; positions; frozen vs fine-tuned), each cell val top-1 mean ± std over the seeds with the mean\n"
        "     train seconds. Costs seconds.\n"
        "Each stage prints one line when it starts and one when it ends, with its time. Exit status 3 when a video or "
        "a run failed (the rest is reported).",
    )
    p.add_argument("input", help="folder of videos (split/class/x.mp4), or a .csv manifest, as vtn extract")
    p.add_argument("--out", required=True, metavar="DIR", help="the ablation folder (caches/, sweep/, finetune/, "
                   "report.md)")
    p.add_argument("--backbone", metavar="NAME", action="append", required=True,
                   help="a timm model name (repeat it: one cache and one column per backbone)")
    s = p.add_mutually_exclusive_group()
    s.add_argument("--fps", type=float, help="sample F frames per second of video (as vtn extract)")
    s.add_argument("--every", type=int, metavar="K", help="sample every K-th frame (default: every frame)")
    s.add_argument("--num-frames", type=int, metavar="N", help="sample N frames spread evenly over the video")
    p.add_argument("--image-size", type=int, metavar="PX", help="override the backbones' input size")
    p.add_argument("--random-init", action="store_true", help="seeded random backbone weights (default: timm's "
                   "pretrained weights, from the local hub cache when offline)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N, for every stage")
    p.add_argument("--workers", type=int, help="decode processes of the extraction and the fine-tuning (default: as vtn extract; 0: decode "
                   "in the main process, the fastest for small files)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="stage two's grid instead of the ablations preset (as vtn sweep --grid; repeatable)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per config and per fine-tuning (default 2)")
    p.add_argument("--model", choices=["tiny", "small", "base"], default="tiny",
                   help="the base encoder size (as vtn train; default tiny)")
    p.add_argument("--recipe", choices=["default", "reference"], help="base settings, as vtn train")
    p.add_argument("--steps", type=int, default=50,
                   help="optimiser steps of every stage-two run (optim.steps; default 50, sized so the ablations of "
                   "two small backbones on `vtn demo`'s videos take under 30 minutes on 2 CPU cores)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per stage-two step (optim.batch_size; default 16)")
    p.add_argument("--jobs", type=int, help="parallel stage-two processes (as vtn sweep --jobs)")
    p.add_argument("--finetune-steps", type=int, default=20, metavar="N",
                   help="optimiser steps of each fine-tuning run (default 20; 0: no fine-tuning)")
    p.add_argument("--finetune-set", dest="finetune_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a vtn finetune config value, e.g. finetune.bank_frames=2 (repeatable)")
    add_config_args(p, "model.positions=time")  # stage two's base config; without dropout unless --set
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_ablate, interrupted="finished work is kept; run the same command again to continue")


def _ablate(args) -> int:
    from vtn.paths import check_run_dir

    return ablate(args, check_run_dir(args.out, "ablation"))


def stage(number: int, name: str, what: str):
    """Print the stage's start; returns the function that prints its end, with the stage's seconds."""
    start = time.perf_counter()
    print(f"vtn ablate: {number}/4 {name}: {what}", flush=True)

    def done(result: str = "") -> None:
        print(f"vtn ablate: {number}/4 {name} done in {time.perf_counter() - start:.0f} s{result}", flush=True)

    return done


def ablate(args, out: Path) -> int:
    """Every stage of `vtn ablate` (see the module's doc) into `out`; the exit status."""
    from vtn.config import job_config
    from vtn.extract import job as extract_job
    from vtn.extract.cli import flags as extract_flags
    from vtn.extract.config import ExtractConfig, cache_paths
    from vtn.temporal import sweep as sweep_job
    from vtn.temporal.settings import CHOICES, FLAGS, TrainConfig

    names = list(args.backbone)
    ecfg = job_config(ExtractConfig, argparse.Namespace(**{**vars(args), "backbone": None, "sets": []}),
                      extract_flags())
    base = job_config(TrainConfig, argparse.Namespace(**{**vars(args), "sets": [*NO_DROPOUT, *args.sets]}),
                      {k: FLAGS[k] for k in ("steps", "batch_size", "device")}, **CHOICES)
    grid = sweep_job.parse_grid(args.grid, base)  # a wrong key or value is refused before anything runs
    if args.finetune_steps < 0:
        from vtn.errors import UserError

        raise UserError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    out.mkdir(parents=True, exist_ok=True)
    urls = cache_paths(str(out / "caches"), names)

    done = stage(1, "extract", f"{len(names)} backbone(s) on one decode pass into {out / 'caches'}")
    summary = extract_job.run(ecfg, args.input, str(out / "caches") if len(names) > 1 else urls[0],
                              backbones=names if len(names) > 1 else None)
    done(f": {summary.videos} videos stored, {summary.skipped} already in every cache, {len(summary.failures)} failed")

    caches = sweep_job.cache_labels(urls)
    variants = sweep_job.ablations(base) if not grid else sweep_job.variants_of(grid, zipped=False)
    runs = sweep_job.expand(base, [{sweep_job.CACHE_KEY: label, **v} for label in caches for v in variants],
                            args.seeds)
    done = stage(2, "sweep", f"{len(variants)} config(s) x {len(caches)} cache(s) x {args.seeds} seed(s) = {len(runs)} "
                 f"stage-two runs and the probes into {out / 'sweep'}")
    rows, failed = sweep_job.sweep(caches, out / "sweep", runs, jobs=args.jobs, progress=not args.quiet, probes=True)
    done(f": {len(runs) - len(failed)} runs finished, {len(failed)} failed")

    best = {label: best_runs(runs, out, label, failed) for label in caches}
    tuned = finetune_best(args, out, [r for label in caches for r in best[label]])
    done = stage(4, "report", f"{out / 'report.md'}")
    write_report(out, runs, list(caches), rows, best, tuned, variants, args.seeds)
    done()
    return 3 if failed or summary.failures or any(t.get("failures") for t in tuned.values()) else 0


def best_runs(runs: list, out: Path, label: str, failed: dict) -> list:
    """The finished runs (one per seed) of the config with the highest mean val top-1 on the cache `label`."""
    from vtn.temporal.results import run_name
    from vtn.temporal.sweep import CACHE_KEY

    configs: dict[str, list] = {}
    for r in runs:
        if r.values[CACHE_KEY] == label and r.name not in failed:
            configs.setdefault(run_name({k: v for k, v in r.values.items() if k != "run.seed"}), []).append(r)
    top1 = {name: sum(_record(out / "sweep" / r.name)["val_top1"] for r in members) / len(members)
            for name, members in configs.items()}
    return configs[max(top1, key=top1.get)] if top1 else []  # the first of equals: the base config comes first


def _record(run: Path) -> dict:
    return json.loads((run / RESULT).read_text())


def finetune_best(args, out: Path, best: list) -> dict[str, dict]:
    """Stage 3: `vtn finetune` of the `best` stage-two runs (each seed's run of each backbone's best config),
    skipping finished ones; {stage-two run name: its fine-tuning record}."""
    from vtn.config import resolve
    from vtn.temporal.finetune import FinetuneConfig, default_config, finetune

    chosen = best if args.finetune_steps else []
    done = stage(3, "finetune", f"{len(chosen)} run(s), {args.finetune_steps} steps each, into {out / 'finetune'}"
                 if chosen else "skipped (--finetune-steps 0)" if not args.finetune_steps else "no finished run")
    records, fresh = {}, 0
    for r in chosen:
        run, tuned = out / "sweep" / r.name, out / "finetune" / r.name
        if not (tuned / RESULT).is_file():
            sets = [f"optim.steps={args.finetune_steps}", *([f"run.device={args.device}"] if args.device else []),
                    *([f"finetune.workers={args.workers}"] if args.workers is not None else []), *args.finetune_sets]
            cfg = resolve(FinetuneConfig, None, sets, base=default_config(run))
            result = finetune(run, tuned, cfg=cfg, resume=True, progress=not args.quiet)
            last = json.loads((tuned / "metrics.jsonl").read_text().splitlines()[-1])
            record = {"run": r.name, "stage_two": str(run), **{k: v for k, v in result["best"].items()
                                                               if k.startswith("val_")},
                      "best_epoch": result["best"]["epoch"], "steps": result["steps"],
                      "train_seconds": last["elapsed"], "failures": result["failures"]}
            (tuned / RESULT).write_text(json.dumps(record, indent=2) + "\n")
            fresh += 1
        records[r.name] = _record(tuned)
    done(f": {fresh} trained, {len(records) - fresh} already finished")
    return records


# -- the report -------------------------------------------------------------------------------------------------

def _stats(found: list[dict], key: str = "val_top1") -> dict | None:
    """A cell's figures from the records of its seeds: val top-1 (%) mean and sample std, mean train seconds."""
    from vtn.temporal.results import mean_std

    if not found:
        return None
    mean, std = mean_std([100 * x[key] for x in found])
    return {"mean": mean, "std": std, "seconds": sum(x["train_seconds"] for x in found) / len(found), "n": len(found)}


def _text(cell: dict | None) -> str:
    """`62.5 ± 3.1 (12 s)`; a single fit (a probe) without the std."""
    if cell is None:
        return ""
    spread = f" ± {cell['std']:.1f}" if cell["n"] > 1 else ""
    return f"{cell['mean']:.1f}{spread} ({cell['seconds']:.0f} s)"


def _label(values: dict) -> str:
    from vtn.temporal.results import short_value

    return ", ".join(f"{k.rsplit('.', 1)[-1]} {short_value(v)}" for k, v in values.items())


def tables(out: Path, runs: list, labels: list[str], rows: list[dict], best: dict, tuned: dict,
           variants: list[dict]) -> dict[str, list[tuple[str, list]]]:
    """{title: [(row label, [cell per backbone])]}: the report's tables from the runs' metrics.json (the probes'
    from the sweep's rows), in the paper's order; a cell is _stats' dict or None."""
    from vtn.temporal.results import config_value
    from vtn.temporal.sweep import CACHE_KEY

    results = {r.name: _record(out / "sweep" / r.name) for r in runs if (out / "sweep" / r.name / RESULT).is_file()}

    def seeds(variant: dict, label: str) -> dict | None:
        return _stats([results[r.name] for r in runs if r.name in results and r.values[CACHE_KEY] == label
                       and {k: v for k, v in r.values.items() if k not in (CACHE_KEY, "run.seed")} == variant])

    found = {"Backbone": [("VTN, base config", [seeds({}, b) for b in labels])] if {} in variants else []}
    found["Backbone"].append(("VTN, best config", [_stats([results[r.name] for r in best[b]]) for b in labels]))
    for probe in dict.fromkeys(r["run"].rsplit(" (", 1)[0] for r in rows if r["run"].startswith("probe")):
        fits = {r.get(CACHE_KEY): {"val_top1": r["val_top1_mean"], "train_seconds": r["train_seconds"]}
                for r in rows if r["run"].rsplit(" (", 1)[0] == probe}
        found["Backbone"].append((probe, [_stats([fits[b]] if b in fits else []) for b in labels]))
    groups: dict[str, list[dict]] = {}
    for v in variants:
        if v:  # a variant belongs to the table of its first key (a depth keeps the base's window)
            groups.setdefault(TABLES.get(next(iter(v)), "Other: " + ", ".join(v)), []).append(v)
    for title, members in groups.items():
        keys = list(dict.fromkeys(k for v in members for k in v))
        base = [(_label({k: config_value(runs[0].cfg, k) for k in keys}) + " (base)", [seeds({}, b) for b in labels])]
        found[title] = (base if {} in variants else []) + [(_label(v), [seeds(v, b) for b in labels]) for v in members]
    if tuned:
        found["Frozen vs fine-tuned"] = [
            ("frozen backbone (stage two)", [_stats([results[r.name] for r in best[b] if r.name in tuned])
                                             for b in labels]),
            ("fine-tuned end to end", [_stats([tuned[r.name] for r in best[b] if r.name in tuned]) for b in labels])]
    return found


def write_report(out: Path, runs: list, labels: list[str], rows: list[dict], best: dict, tuned: dict,
                 variants: list[dict], seeds: int) -> None:
    """DIR/report.md (printed too) and one DIR/report-<table>.png per table."""
    import re

    from vtn.temporal.results import run_name
    from vtn.temporal.sweep import CACHE_KEY

    configs = {b: run_name({k: v for k, v in best[b][0].values.items() if k not in (CACHE_KEY, "run.seed")}) or "base"
               for b in labels if best[b]}
    lines = [f"# vtn ablate: {', '.join(labels)}", "",
             f"Each cell: the best epoch's val top-1 (%), mean ± std over {seeds} seed(s), and the mean train seconds "
             "of a run; a probe is one fit. Best config (stage two, highest mean val top-1), the one fine-tuned: "
             + "; ".join(f"{b}: {c}" for b, c in configs.items()) + ".", ""]
    for title, table_rows in tables(out, runs, labels, rows, best, tuned, variants).items():
        png = "report-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") + ".png"
        _plot(title, labels, table_rows, out / png)
        lines += [f"## {title}", "", "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        lines += ["| " + " | ".join([name, *map(_text, cells)]) + " |" for name, cells in table_rows]
        lines += ["", f"![{title}]({png})", ""]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


def _plot(title: str, labels: list[str], table_rows: list[tuple[str, list]], path: Path) -> None:
    """Grouped bars: val top-1 of each row, one bar per backbone, the std as an error bar."""
    import numpy as np

    from vtn.plots import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(table_rows) * len(labels) ** 0.5), 3.8))
    width, xs = 0.8 / len(labels), np.arange(len(table_rows))
    for i, label in enumerate(labels):
        cells = [cells[i] for _, cells in table_rows]
        ax.bar(xs + (i - (len(labels) - 1) / 2) * width, [c["mean"] if c else np.nan for c in cells], width,
               yerr=[c["std"] if c else 0.0 for c in cells], capsize=3, label=label)
    ax.set_xticks(xs, [name for name, _ in table_rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save(fig, path)
