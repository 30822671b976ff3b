"""`vtn sweep CACHE --out DIR --grid KEY=V1,V2 ...`: many stage-two runs on one cache, and their comparison.

Runs. Every `--grid KEY=V1,V2,...` is a `vtn train` config key and its values; the runs are the product of the
grids (`--zip`: the grids side by side, all of one length), each repeated for `--seeds N` seeds (run.seed +
0..N-1), on the base config (`--model`, `--config`, `--set`, as `vtn train`). Values are read as YAML, one
by one; commas inside brackets belong to the value, so a list is written as a YAML flow list:
`--grid model.attention_window=[8,16,32],16` is two values, the list and the number. Every run's config is
checked (unknown key, wrong type, a model the cache cannot take) before anything trains, naming the key or run.
`--preset ablations` is the paper's ablations instead of a grid (see `ablations`).

Several caches. `--grid cache=DIR/a.zarr,DIR/b.zarr` (or `--cache-glob 'DIR/*.zarr'`) in place of CACHE runs every
config on every cache, whatever their feature sizes (each run's model takes its cache's): the runs vary one more
key, `backbone`, the cache's backbone (its timm name; the cache's file name beside it where two caches share one),
which names the runs (`backbone-resnet18_lr-0.001_seed-0`) and is a column of the one table. Runs batch only with
runs on the same cache; the probes (`--probes`) run on each cache.

Each run is a normal `vtn train` run directory DIR/<name>/ (config.yaml, metrics.jsonl, best/, last/), named
by its values (`lr-0.001_num_layers-3_seed-0`), plus metrics.json: what the table shows of it. A re-run skips
runs with metrics.json and resumes the others from their last checkpoint (`vtn train --resume`); a run whose
saved config differs from the sweep's is refused, naming the difference. A run that fails does not stop the
others: its error is printed at the end, with the traceback in DIR/failures.log, the table shows the
finished runs, and the exit status is 3. Batched runs that run out of memory together train one by one.

How runs are trained. One process loads the split once and trains its runs one after another on it. Runs that
differ only in seed, lr and weight decay, and have no dropout, train together as one batched model
(temporal/batched.py; equal to their separate runs); a batched run interrupted part-way resumes on its own.
`--jobs J` spreads the work over J processes (each with its own copy of the split and 1/J of the cores, or one
GPU each where there are several GPUs); the default is one per GPU, or 1 on the CPU.

The comparison. DIR/results.csv and results.md: per config (runs that differ only in seed), mean ± std over
seeds (sample std; 0 for one seed) of the best epoch's val top-1, top-5 and mean class accuracy (the epoch
best/ holds), with parameters, train seconds (a batched run's share: its group's time / members) and how many
seeds diverged (train loss NaN or infinite; such a run trains on to the end, as it would alone, and is named). The
table is printed too. DIR/results.png: val top-1 against each varied key (one panel per key: the configs
whose other varied keys are at the base config's values, else the mean over the others), probes as lines.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import math
import multiprocessing
import os
import sys
import traceback
from pathlib import Path

from vtn.config import ConfigError, merge, parse_set, set_key
from vtn.errors import UserError
from vtn.paths import check_run_dir
from vtn.temporal.baselines import probe_rows
from vtn.temporal.metrics import table_metrics
from vtn.temporal.results import Run, run_name, table, varied_keys, write_results

RESULT_NAME = "metrics.json"
CACHE_KEY = "backbone"  # the varied value that says which cache a run of a several-cache sweep trains on


# -- the runs ---------------------------------------------------------------------------------------------------

def split_values(raw: str) -> list[str]:
    """`a,[1,2],b` -> ["a", "[1,2]", "b"]: commas at bracket depth 0 separate values."""
    out, depth, cur = [], 0, ""
    for ch in raw:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def _flat_key(nested: dict) -> tuple[str, object]:
    key, node = [], nested
    while isinstance(node, dict) and len(node) == 1:
        (k, node), = node.items()
        key.append(k)
    return ".".join(key), node


def parse_grid(items: list[str], base) -> list[tuple[str, list]]:
    """[(key, [values])] of `--grid KEY=V1,V2,...` items, each value checked against `base` (a TrainConfig)."""
    grids = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise UserError(f"--grid expects KEY=V1,V2,..., got '{item}'")
        if key in (k for k, _ in grids):
            raise UserError(f"--grid {key} is given twice")
        values = []
        for text in split_values(raw):
            if not text.strip():
                raise UserError(f"--grid {item}: an empty value")
            try:
                nested = parse_set(f"{key}={text}")
                merge(base, nested)  # refuses an unknown key or a value of the wrong type, naming it
            except ConfigError as e:
                raise UserError(f"--grid {item}: {e}") from None
            values.append(_flat_key(nested)[1])
        grids.append((key, values))
    return grids


def variants_of(grids: list[tuple[str, list]], zipped: bool) -> list[dict]:
    """The configs' varied values: the product of the grids, or with `zipped` the grids side by side."""
    if not grids:
        return [{}]
    keys = [k for k, _ in grids]
    if zipped:
        lengths = {k: len(v) for k, v in grids}
        if len(set(lengths.values())) != 1:
            raise UserError(f"--zip needs grids of one length, got {lengths}")
        combos = zip(*(v for _, v in grids))
    else:
        combos = itertools.product(*(v for _, v in grids))
    return [dict(zip(keys, c)) for c in combos]


def expand(base, variants: list[dict], seeds: int) -> list[Run]:
    """One Run per variant and seed (run.seed + 0..seeds-1), with its checked config."""
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    runs = []
    for variant in variants:
        if seeds > 1 and "run.seed" in variant:
            raise UserError("run.seed is in --grid, so --seeds must be 1")
        for s in range(seeds):
            values = {**variant, **({} if "run.seed" in variant else {"run.seed": base.run.seed + s})}
            nested: dict = {}
            for key, v in values.items():
                if key != CACHE_KEY:  # not a config key: which cache the run trains on
                    set_key(nested, key, v)
            try:
                cfg = merge(base, nested)
            except ConfigError as e:
                raise UserError(f"run {run_name(values)}: {e}") from None
            runs.append(Run(run_name(values), values, cfg))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"two runs would share a directory name: {sorted({n for n in names if names.count(n) > 1})}")
    return runs


def growing_windows(layers: int, low: int = 8, high: int = 32) -> list[int]:
    """Windows growing from `low` in the first layer to `high` in the last, doubling (even values)."""
    if layers == 1:
        return [high]
    steps = math.log2(high / low)
    return [int(low * 2 ** round(steps * i / (layers - 1))) for i in range(layers)]


def ablations(base) -> list[dict]:
    """The paper's ablations, each one factor changed from `base`: frames per clip, sampling stride, depth
    (1, 3, 6 layers), attention window uniform (the base's) vs growing per layer (8 ... 32), and positions
    index / time / fraction / none. The base itself is the first variant."""
    m, d = base.model, base.data
    uniform = m.attention_window if isinstance(m.attention_window, int) else max(m.attention_window)
    variants = [{}]
    variants += [{"data.clip_frames": f} for f in (8, 16, 32) if f != d.clip_frames]
    variants += [{"data.stride": s} for s in (4, 8, 16) if s != d.stride]
    for layers in (1, 3, 6):
        if layers != m.num_layers:  # a depth with the base's uniform window
            variants.append({"model.num_layers": layers, "model.attention_window": uniform})
    variants.append({"model.attention_window": growing_windows(m.num_layers)})
    if not isinstance(m.attention_window, int):
        variants.append({"model.attention_window": uniform})
    variants += [{"model.positions": p} for p in ("index", "time", "fraction", "none") if p != m.positions]
    return variants


# -- training ---------------------------------------------------------------------------------------------------

_WORKER: dict = {}  # per process: the open cache and its loaded splits, shared by every run the process trains


def _shared(cache_url: str):
    if _WORKER.get("url") != cache_url:
        from vtn.store import open_cache

        _WORKER.update(url=cache_url, cache=open_cache(cache_url), sources={})
    return _WORKER["cache"], _WORKER["sources"]


def _init_worker(slots, jobs: int, gpus: int) -> None:
    """A --jobs process: its share of the cores (its CPU affinity, from which each run sizes its threads), and its
    own GPU where there are several."""
    slot = slots.get()
    if gpus > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[slot % len(cores)::jobs] or cores)


def record(run_dir: Path, run: Run, summary: dict, members: int) -> dict:
    """metrics.json of a finished run: its best epoch's val figures, parameters, train seconds."""
    from vtn.temporal.checkpoint import load_tensors

    weights = load_tensors(run_dir / "best" / "model.safetensors")
    params = sum(t.numel() for k, t in weights.items() if k not in ("feature_mean", "feature_scale"))  # not buffers
    best = summary["best"]
    out = {"run": run.name, "values": run.values, **{f"val_{m.key}": best[f"val_{m.key}"] for m in table_metrics()},
           "best_epoch": best["epoch"], "epochs": summary["epochs"], "steps": summary["steps"],
           "parameters": int(params), "train_seconds": round(summary["seconds"] / members, 2), "batched": members,
           "diverged_at_step": summary["diverged_at"]}
    (run_dir / RESULT_NAME).write_text(json.dumps(out, indent=2) + "\n")
    return out


def train_unit(cache_url: str, out: str, unit: list[Run], progress: bool) -> list[dict]:
    """Train one unit of work (one run, or runs to batch) into `out`; returns their metrics.json records."""
    from vtn.temporal.batched import train_batched
    from vtn.temporal.loop import fit

    cache, sources = _shared(cache_url)
    dirs = [Path(out) / r.name for r in unit]
    if len(unit) > 1:
        summaries = train_batched(cache, [(d, r.cfg) for d, r in zip(dirs, unit)], sources, progress)
    else:
        summaries = [fit(cache_url, dirs[0], unit[0].cfg, resume=True, progress=progress, cache=cache,
                         sources=sources)]
    return [record(d, r, s, len(unit)) for d, r, s in zip(dirs, unit, summaries)]


def plan(runs: list[Run], out: Path, batch: bool) -> tuple[list[Run], list[list[Run]]]:
    """(finished runs, units of work): a run with metrics.json is finished; fresh runs with one batch key form
    one batched unit; an interrupted run (a last/ checkpoint) resumes alone. A saved config that differs from
    the sweep's is refused."""
    from vtn.temporal import checkpoint
    from vtn.temporal.batched import batch_key
    from vtn.temporal.loop import resume_config
    from vtn.temporal.settings import TrainConfig

    done, alone, groups = [], [], {}
    for r in runs:
        d = out / r.name
        if (d / "config.yaml").is_file():
            try:
                resume_config(TrainConfig, d, r.cfg)
            except UserError as e:
                raise UserError(f"{d} holds a run of another config ({e}); sweep into another --out") from None
        if (d / RESULT_NAME).is_file():
            done.append(r)
        elif not batch or checkpoint.find(d, "last") is not None or batch_key(r.cfg) is None:
            alone.append([r])
        else:  # runs batch only on one cache
            groups.setdefault((r.values.get(CACHE_KEY), batch_key(r.cfg)), []).append(r)
    return done, alone + list(groups.values())


def _why_alone(units: list[list[Run]], out: Path, batch: bool) -> str:
    """Why no runs train batched, as ": reason" for the sweep's first line ("" when there is nothing to train)."""
    from vtn.temporal import checkpoint
    from vtn.temporal.batched import unbatchable

    runs = [r for u in units for r in u]
    if not runs:
        return ""
    if not batch:
        return ": --no-batch"
    reasons = sorted({unbatchable(r.cfg) or ("resumed from last/" if checkpoint.find(out / r.name, "last") else
                                             "no other run shares its settings but seed, lr and weight decay")
                      for r in runs})
    return ": " + "; ".join(reasons)


def cache_of(caches: str | dict[str, str], run: Run) -> str:
    """The cache `run` trains on: `caches` is the sweep's one cache, or {backbone label: cache} (cache_labels)."""
    return caches if isinstance(caches, str) else caches[run.values[CACHE_KEY]]


def cache_labels(urls: list[str]) -> dict[str, str]:
    """{label: cache} for a several-cache sweep: each cache's backbone name (its file name where the cache records
    none), with the file name beside it where two caches share one."""
    from vtn.store import open_cache

    if len(set(urls)) != len(urls):
        raise UserError(f"a cache is given twice: {sorted({u for u in urls if urls.count(u) > 1})}")
    stems = [Path(u.rstrip("/")).name.removesuffix(".zarr") for u in urls]
    names = [(open_cache(u).attrs.get("backbone") or {}).get("name") or stem for u, stem in zip(urls, stems)]
    labels = [n if names.count(n) == 1 or n == stem else f"{n} ({stem})" for n, stem in zip(names, stems)]
    if len(set(labels)) != len(labels):
        return dict(zip(urls, urls))  # name them by their places
    return dict(zip(labels, urls))


def train_units(caches: str | dict[str, str], out: Path, units: list[list[Run]], jobs: int, gpus: int,
                progress: bool):
    """Train the units (in `jobs` processes); yields (unit, the exception it failed with, or None)."""
    if jobs == 1 or len(units) <= 1:
        for unit in units:
            error = None
            try:
                train_unit(cache_of(caches, unit[0]), str(out), unit, progress)
            except Exception as e:  # noqa: BLE001 - one run's failure is reported, the others go on
                error = e
            yield unit, error
        return
    ctx = multiprocessing.get_context("spawn")
    slots = ctx.Manager().Queue()
    for i in range(jobs):
        slots.put(i)
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                                initargs=(slots, jobs, gpus)) as pool:
        futures = {pool.submit(train_unit, cache_of(caches, unit[0]), str(out), unit, False): unit for unit in units}
        for f in concurrent.futures.as_completed(futures):
            yield futures[f], f.exception()


def sweep(caches: str | dict[str, str], out: str | Path, runs: list[Run], jobs: int | None = None,
          batch: bool = True, progress: bool = True, probes: bool = False) -> tuple[list[dict], dict[str, str]]:
    """Train what is not finished of `runs` into `out`, then write and print the comparison of the finished
    ones. A run that fails is reported and the others go on; batched runs that run out of memory together train
    one by one instead. Returns the table's rows and {run name: error} of the runs that failed. `caches`: the one
    cache, or {backbone label: cache} for runs whose values name their cache's label (CACHE_KEY)."""
    import torch

    from vtn.runtime import Processes, processes
    from vtn.temporal.settings import model_config
    from vtn.temporal.splits import load_data

    if processes().world > 1:
        raise UserError("vtn sweep starts its own processes (--jobs); run it without torchrun")
    out = check_run_dir(out, "sweep")  # never into a folder of the user's; each run's own folder is checked by train
    checked = set()
    for r in sorted(runs, key=lambda r: cache_of(caches, r)):  # each cache's splits load once here
        # a model the cache cannot take, or data it cannot train on, is refused before anything trains
        cache, sources = _shared(cache_of(caches, r))
        try:
            model_cfg = model_config(r.cfg, cache)
            if (cache.url, repr(r.cfg.data)) not in checked:  # the splits load once (shared with this process's runs)
                checked.add((cache.url, repr(r.cfg.data)))
                data = load_data(cache, r.cfg, model_cfg, Processes(), sources)
                if data.left_out and len(checked) == 1:
                    print(data.left_out, file=sys.stderr, flush=True)
        except UserError as e:
            raise UserError(f"run {r.name}: {e}") from None
    done, units = plan(runs, out, batch)
    # The cache loaded last first, then cache by cache: each loads once in this process.
    units.sort(key=lambda u: (cache_of(caches, u[0]) != _WORKER.get("url"), cache_of(caches, u[0])))
    gpus = torch.cuda.device_count()
    jobs = jobs or max(1, gpus)
    batched = sum(len(u) > 1 for u in units)
    print(f"vtn sweep: {len(runs)} runs in {out}: {len(done)} finished, {len(runs) - len(done)} to train in "
          f"{len(units)} unit(s) ({batched} batched{_why_alone(units, out, batch) if not batched else ''}), "
          f"{jobs} process(es)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    traces: list[str] = []
    while units:
        alone = []
        for unit, error in train_units(caches, out, units, jobs, gpus, progress):
            if error is None:
                continue
            if len(unit) > 1 and isinstance(error, torch.OutOfMemoryError):
                print(f"vtn sweep: {len(unit)} batched runs ran out of memory together; training them one by one",
                      flush=True)
                alone += [[r] for r in unit]  # each resumes from the batched run's last checkpoint, if any
            else:
                for r in unit:
                    failed[r.name] = f"{type(error).__name__}: {error}"
                    traces.append(f"== {r.name}\n{''.join(traceback.format_exception(error))}\n")
        units = alone
    finished = [r for r in runs if r.name not in failed]
    results = [json.loads((out / r.name / RESULT_NAME).read_text()) for r in finished]
    for res in results:
        if res.get("diverged_at_step") is not None:
            print(f"vtn sweep: warning: run {res['run']} diverged (its train loss became NaN or infinite at step "
                  f"{res['diverged_at_step']}); the table shows its best epoch's figures", file=sys.stderr)
    rows = table(finished, results)
    if probes:
        rows += _probes(caches, runs)
    if rows:
        write_results(rows, out, varied_keys(runs), base=runs[0].cfg, base_values=runs[0].values)
    log = out / "failures.log"
    log.unlink(missing_ok=True)  # a former sweep's
    if failed:
        log.write_text("".join(traces))
        for name, error in failed.items():
            print(f"vtn sweep: run {name} failed: {error}", file=sys.stderr)
        print(f"vtn sweep: {len(failed)} of {len(runs)} runs failed (tracebacks in {log}); the others are in the "
              f"table, and re-running the sweep retries only the failed ones", file=sys.stderr)
    return rows, failed


def _probes(caches: str | dict[str, str], runs: list[Run]) -> list[dict]:
    """The probes' rows on each cache, on the videos of the data settings of its first run; named by the cache's
    label in a several-cache sweep."""
    if isinstance(caches, str):
        cache, sources = _shared(caches)
        return probe_rows(cache, runs[0].cfg, sources)
    rows = []
    for label, url in caches.items():
        cache, sources = _shared(url)
        first = next(r for r in runs if r.values[CACHE_KEY] == label)
        for row in probe_rows(cache, first.cfg, sources):
            rows.append({**row, "run": f"{row['run']} ({label})", CACHE_KEY: label})
    return rows


# -- the command ------------------------------------------------------------------------------------------------

def main(args) -> int:
    from vtn.temporal.settings import FLAGS, train_config

    if args.preset and args.grid:
        raise UserError("--preset ablations is a grid of its own; give --grid or --preset, not both")
    grid, urls = _cache_grid(args)
    from vtn.store import open_cache

    base, size = train_config(args, {"no_tb": FLAGS["no_tb"]}, [open_cache(url) for url in urls])
    if size:
        print(f"vtn sweep: encoder {size}", flush=True)
    variants = ablations(base) if args.preset == "ablations" else variants_of(parse_grid(grid, base), args.zip)
    caches = urls[0] if len(urls) == 1 and args.cache else cache_labels(urls)
    if not isinstance(caches, str):  # every config on every cache, the cache first in the run names
        variants = [{CACHE_KEY: label, **v} for label in caches for v in variants]
    runs = expand(base, variants, args.seeds)
    _, failed = sweep(caches, args.out, runs, jobs=args.jobs, batch=not args.no_batch, progress=not args.quiet,
                      probes=args.probes or args.preset == "ablations")
    return 3 if failed else 0


def _cache_grid(args) -> tuple[list[str], list[str]]:
    """(--grid items but `cache=`, the caches): CACHE, or the values of `--grid cache=A,B`, or `--cache-glob`'s
    matches, exactly one of them."""
    import glob

    from vtn.paths import is_remote, is_vtn_cache

    grid = [g for g in args.grid if g.partition("=")[0].strip() != "cache"]
    given = [split_values(g.partition("=")[2]) for g in args.grid if g.partition("=")[0].strip() == "cache"]
    if args.cache_glob:
        matches = sorted(glob.glob(args.cache_glob))
        if not matches:
            raise UserError(f"--cache-glob {args.cache_glob}: matches nothing")
        given.append(matches)
    given += [[args.cache]] if args.cache else []
    if len(given) != 1:
        raise UserError("give the caches one way: CACHE, --grid cache=A,B,... or --cache-glob PATTERN"
                        if given else "no cache: give CACHE, --grid cache=A,B,... or --cache-glob PATTERN")
    urls = [u.strip() for u in given[0] if u.strip()]
    if args.cache is None:
        for u in urls:
            if not is_remote(u) and not is_vtn_cache(u):
                raise UserError(f"{u}: not a vtn feature cache")
    return grid, urls
