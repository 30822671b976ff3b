"""`vtn` subcommands of this stage.

Only argparse and the standard library at module level, so `vtn --help` stays instant.
"""

from __future__ import annotations

import importlib


def register(sub) -> None:
    """Add `vtn train`, `vtn sweep`, `vtn probe` and `vtn finetune` to `vtn`."""
    for add in (_add_train, _add_sweep, _add_probe, _add_finetune):
        add(sub)


def _add_train(sub) -> None:
    from vtn.config import add_config_args  # light (yaml only), unlike the job it configures

    p = sub.add_parser(
        "train", help="train the temporal encoder + head on a feature cache",
        description="Stage two: train VTN's Longformer encoder and head on the cached frame features of CACHE's "
        "train split, evaluating on whole val videos every epoch (a cache without a val split gets one: 10 % of each "
        "class's train videos, by a hash of the id). RUN gets config.yaml, metrics.jsonl and the checkpoints best/ "
        "and last/. Defaults suit any cache size: unless --epochs or --steps is given, the run is at most 25 epochs "
        "(raised to 1000 optimiser steps on a small cache) and stops early once val top-1 has not improved for a fifth "
        "of that (optim.patience); training views are dense clips, uniform views over whole videos or a mix, chosen "
        "from the videos' lengths (data.sampling); the encoder is tiny below 1000 train videos, else the paper's base "
        "(--model). Under torchrun it trains with DDP. Interrupted, it continues with "
        "--resume.",
    )
    p.add_argument("cache", help="the feature cache (local path or fsspec URL)")
    p.add_argument("--out", required=True, metavar="RUN", help="the run directory to write")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN from its last checkpoint (exactly; starts fresh when there is none)")
    p.add_argument("--recipe", choices=["default", "reference"],
                   help="base settings: default (AdamW, warm-up, cosine) or reference (the paper code's SGD, steps)")
    p.add_argument("--frames", type=int, help="frames per training clip (data.clip_frames, default 16)")
    p.add_argument("--stride", type=int, help="cached frames between clip frames (data.stride, default 8)")
    p.add_argument("--model", choices=["auto", "tiny", "small", "base"],
                   help="encoder size: tiny (about 0.6 M parameters: the quick one on a CPU; head dropout 0.5 and, "
                   "with the default recipe, lr 1e-3 and weight decay 0.5, unless set), small, base (the paper's "
                   "encoder, about 28 M; head dropout 0), or auto (the default): tiny when the train split has fewer "
                   "than 1000 videos, on which base can stall or memorise, else base")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="train exactly this many epochs (optim.epochs; default: at most 25, "
                        "raised to reach optim.min_steps=1000 steps on a small cache, stopping early on val)")
    length.add_argument("--steps", type=int, help="train exactly this many optimiser steps (optim.steps)")
    p.add_argument("--batch-size", type=int, help="clips per step over all processes (optim.batch_size)")
    p.add_argument("--lr", type=float, help="peak learning rate (optim.lr)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="autocast dtype (run.amp)")
    p.add_argument("--seed", type=int, help="run.seed")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (run.device; default: the GPU when there is one)")
    p.add_argument("--no-tb", action="store_true", help="no TensorBoard event files in RUN/tb/ (run.tensorboard; "
                   "written by default when the tensorboard package is installed)")
    add_config_args(p, "model.num_layers=2")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_job("train"), interrupted="the last checkpoint is kept; add --resume to the same command "
                   "to continue exactly where it stopped")


def _add_sweep(sub) -> None:
    from vtn.config import add_config_args

    p = sub.add_parser(
        "sweep", help="many stage-two runs on one cache (a grid of config values), compared in one table",
        description="Trains one `vtn train` run per combination of the --grid values (and seed) into DIR/<name>/, "
        "loading the cache's splits once per process; runs that differ only in seed, lr and weight decay and have "
        "no dropout train together as one batched model (equal to their separate runs). A run that fails does not "
        "stop the others: it is named at the end (tracebacks in DIR/failures.log, exit status 3). A re-run skips "
        "finished runs and resumes interrupted and failed ones. Writes DIR/results.csv, results.md (mean ± std over seeds of the best "
        "epoch's val top-1, top-5, mean class accuracy; parameters; train seconds) and results.png (top-1 "
        "against each varied key). List values are YAML flow lists: --grid model.attention_window=[8,16,32],16.",
    )
    p.add_argument("cache", nargs="?", help="the feature cache (local path or fsspec URL); or several caches with "
                   "--grid cache=A,B,... or --cache-glob")
    p.add_argument("--out", required=True, metavar="DIR", help="the sweep directory (one run directory per run)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a config key of vtn train and its values, e.g. optim.lr=1e-3,3e-4 (repeatable); "
                   "cache=DIR/a.zarr,DIR/b.zarr runs every config on every cache (any feature sizes), the table naming "
                   "each cache's backbone")
    p.add_argument("--cache-glob", metavar="PATTERN", help="the caches matching PATTERN (quoted, e.g. 'DIR/*.zarr'), "
                   "as --grid cache=...")
    p.add_argument("--zip", action="store_true", help="pair the grids' values in order instead of their product")
    p.add_argument("--preset", choices=["ablations"],
                   help="the paper's ablations (frames, stride, depth 1/3/6, uniform vs growing windows, positions "
                   "index/time/fraction/none), one factor at a time from the base config, with the probes")
    p.add_argument("--seeds", type=int, default=1, help="seeds per config: run.seed + 0..N-1 (default 1)")
    p.add_argument("--jobs", type=int, help="parallel processes (default: one per GPU, or 1 on the CPU)")
    p.add_argument("--recipe", choices=["default", "reference"], help="base settings, as vtn train")
    p.add_argument("--model", choices=["auto", "tiny", "small", "base"],
                   help="encoder size, as vtn train (auto, the default: from the smallest cache's train split)")
    p.add_argument("--probes", action="store_true", help="add vtn probe's baselines to the table")
    p.add_argument("--no-batch", action="store_true", help="train every run on its own, never batched")
    p.add_argument("--no-tb", action="store_true", help="no TensorBoard event files in RUN/tb/ (run.tensorboard; "
                   "written by default when the tensorboard package is installed)")
    add_config_args(p, "optim.epochs=10")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_job("sweep", "sweep"), interrupted="finished runs and the last checkpoints are kept; run "
                   "the same command again to skip the finished runs and resume the others")


def _add_probe(sub) -> None:
    from vtn.config import add_config_args

    p = sub.add_parser(
        "probe", help="order-blind and single-frame baselines on a cache (scikit-learn), in vtn sweep's table",
        description="Logistic regression on mean-pooled features, an MLP on mean + max pooling, and logistic "
        "regression on single frames (scored on each val video's centre frame), on the train and val videos vtn "
        "train would use with the same data settings; val top-1, top-5, mean class accuracy. None sees the order "
        "of the frames: what VTN beats them by is what the temporal encoder adds.",
    )
    p.add_argument("cache", help="the feature cache (local path or fsspec URL)")
    p.add_argument("--out", metavar="DIR", help="also write DIR/probes.csv and probes.md")
    add_config_args(p, "data.holdout=0.2")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_job("probe", "probes"))


def _add_finetune(sub) -> None:
    from vtn.config import add_config_args

    f = sub.add_parser(
        "finetune", help="fine-tune backbone + encoder + head end to end from raw video, from a stage-two run",
        description="End-to-end fine-tuning: starts from RUN's best/ checkpoint (encoder and head) and the backbone its "
        "cache was extracted with (rebuilt and checked by sha256), and trains them together on clips decoded from the "
        "videos (INPUT, default: the folder the cache's video ids are relative to, recorded with it), sampled as the cache "
        "was; whole val "
        "videos are evaluated through the same model. The backbone's learning rate and BatchNorm follow its provenance, "
        "recorded with the cache (random-init: 10x the encoder's rate, batch statistics; trained weights: a tenth, "
        "running statistics); the first line says what was chosen. After the first step it prints the expected time. "
        "RUN2 gets config.yaml, metrics.jsonl, curves.png, failures.jsonl (empty when nothing failed) and the "
        "checkpoints best/ and last/ (backbone and temporal weights, with the preprocessing and sampling). Exit status: 0 "
        "every video used, 3 some failed or were missing (recorded in failures.jsonl, the rest trained), 2 usage error. "
        "On a CPU a step costs the backbone's forward and backward for every frame of the step: fewer frames per clip "
        "(--frames 4), fewer clips (--batch-size 8) and --set finetune.bank_frames=2 (2 frames of each clip through "
        "the backbone, the rest from the cache) make it practical (README: Fine-tuning on a CPU, with measured times).",
    )
    f.add_argument("run", help="the stage-two run directory (or a checkpoint directory of one)")
    f.add_argument("--out", required=True, metavar="RUN2", help="the run directory to write")
    f.add_argument("--videos", metavar="INPUT", help="the folder the video ids are relative to, or a CSV of the videos "
                   "(default: the folder recorded with the cache)")
    f.add_argument("--cache", help="the stage-two cache, when it moved since RUN was trained (default: where RUN "
                   "recorded it)")
    f.add_argument("--resume", action="store_true", help="continue the run in RUN2 from its last checkpoint (exactly)")
    f.add_argument("--frames", type=int, help="frames per training clip (data.clip_frames; default: RUN's)")
    f.add_argument("--stride", type=int, help="sampled frames between clip frames (data.stride; default: RUN's)")
    flength = f.add_mutually_exclusive_group()
    flength.add_argument("--epochs", type=int, help="train exactly this many epochs (optim.epochs, default 5)")
    flength.add_argument("--steps", type=int, help="train exactly this many optimiser steps (optim.steps)")
    f.add_argument("--batch-size", type=int, help="clips per step over all processes (optim.batch_size, default 8)")
    f.add_argument("--lr", type=float, help="base peak learning rate (optim.lr): the encoder and head learn at "
                   "finetune.encoder_lr times it, the backbone at finetune.backbone_lr times it")
    f.add_argument("--amp", choices=["none", "bf16", "fp16"], help="autocast dtype (run.amp)")
    f.add_argument("--seed", type=int, help="run.seed")
    f.add_argument("--device", help="cpu, cuda, cuda:1 ... (run.device; default: the GPU when there is one)")
    f.add_argument("--micro-batch", type=int, help="frames per backbone call (finetune.micro_batch; default 8 on a GPU, "
                   "all of a step's frames on a CPU)")
    f.add_argument("--chunked", action="store_true", help="exact chunked backprop always: each micro-batch's "
                   "activations recomputed in the backward pass (finetune.chunked; default: whenever a step has "
                   "more frames than one micro-batch)")
    f.add_argument("--workers", type=int, help="decode processes (finetune.workers; 0: decode in this process)")
    f.add_argument("--no-tb", action="store_true", help="no TensorBoard event files in RUN/tb/ (run.tensorboard; "
                   "written by default when the tensorboard package is installed)")
    add_config_args(f, "finetune.bank_frames=2")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=_job("finetune"), interrupted="the last checkpoint is kept; add --resume to the same "
                   "command to continue exactly where it stopped")


def _job(name: str, kind: str = "run"):
    """The command `vtn.temporal.<name>.main`, with the --out rule (vtn/paths.py) at the door, before torch loads:
    a wrong folder is refused at once. The jobs check again themselves (they are called from Python too)."""

    def run(args) -> int:
        from vtn.paths import check_run_dir

        if args.out:
            check_run_dir(args.out, kind)
        return importlib.import_module(f"vtn.temporal.{name}").main(args)

    return run
