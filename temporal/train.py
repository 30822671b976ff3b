"""`vtn train CACHE --out RUN`: stage two, the temporal encoder + head trained on cached frame features.

The recipe only: its settings come from temporal/settings.py (one loader, vtn.config.job_config) and the run
is temporal/loop.py's `fit`, the loop `vtn finetune` and `vtn sweep` share.
"""

from __future__ import annotations

from vtn.store import open_cache
from vtn.temporal.loop import fit
from vtn.temporal.settings import FLAGS, train_config


def main(args) -> int:
    """`vtn train`: recipe and --model size (auto: from the cache), then --config, then --set, then the explicit
    flags; none of them with --resume means "the run's saved config"."""
    cache = open_cache(args.cache)  # once: the auto size reads its train split, then the run trains on it
    cfg, size = train_config(args, FLAGS, [cache])
    fit(args.cache, args.out, cfg, resume=args.resume, progress=not args.quiet, cache=cache, size=size)
    return 0
