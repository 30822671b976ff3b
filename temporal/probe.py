"""`vtn probe CACHE`: order-blind and single-frame baselines, to show what the temporal encoder adds.

On the same videos as a `vtn train` run with the same data settings (its train split, less the held-out share
when the cache has no val split; its val videos), scikit-learn fits the probes of temporal/baselines.py:
logistic regression on mean pooling, an MLP on mean + max pooling, and a single-frame classifier. The figures
are the same as a run's (val top-1, top-5, mean class accuracy, through temporal/metrics.py), in `vtn sweep`'s
table format (temporal/results.py), with the model's parameters and fit seconds. None of them sees the order of
the frames; a cache whose classes lie in that order leaves them at chance while VTN learns it.
"""

from __future__ import annotations


def main(args) -> int:
    from vtn.config import resolve
    from vtn.paths import check_run_dir
    from vtn.store import open_cache
    from vtn.temporal.baselines import probe_rows
    from vtn.temporal.results import markdown, write_results
    from vtn.temporal.settings import TrainConfig

    out = check_run_dir(args.out, "probes") if args.out else None  # before the probes spend their time
    cfg = resolve(TrainConfig, args.config, args.sets)
    cache = open_cache(args.cache)
    rows = probe_rows(cache, cfg, progress=not args.quiet)
    if out:
        write_results(rows, out, [], name="probes")
    else:
        print(markdown(rows, []), end="")
    return 0
