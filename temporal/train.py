"""`vtn train CACHE --out RUN`: stage two, the temporal encoder + head trained on cached frame features.

The recipe only: its settings come from temporal/settings.py (one loader, vtn.config.job_config) and the run
is temporal/loop.py's `fit`, the loop `vtn finetune` and `vtn sweep` share.
"""

from __future__ import annotations

from vtn.config import job_config
from vtn.temporal.loop import fit
from vtn.temporal.settings import CHOICES, FLAGS, TrainConfig


def main(args) -> int:
    """`vtn train`: recipe and --model size, then --config, then --set, then the explicit flags; none of them
    with --resume means "the run's saved config"."""
    cfg = job_config(TrainConfig, args, FLAGS, **CHOICES)
    fit(args.cache, args.out, cfg, resume=args.resume, progress=not args.quiet)
    return 0
