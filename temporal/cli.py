"""`vtn` subcommands of this stage.

Only argparse and the standard library at module level, so `vtn --help` stays instant.
"""

from __future__ import annotations


def register(sub, bench_sub) -> None:
    """Add this stage's subcommands to `vtn` and its benchmarks to `vtn bench`."""
    bench = bench_sub.add_parser(
        "temporal",
        help="hf vs fast encoder time and memory; training clips/s from a cache vs the backbone's cost",
        description="Times forward+backward of the VTN encoder with the hf (transformers Longformer) and fast "
        "backends for windows [16, 32, 64] and [256] over several sequence lengths, with peak memory "
        "(each measurement in a fresh process). CPU always; CUDA as well where present. Then measures training "
        "throughput from a cache (clips/s) next to what the same clips would cost in the backbone.",
    )
    bench.add_argument("--lengths", type=int, nargs="+", metavar="T", help="sequence lengths (default 16 64 256 1024 4096)")
    bench.add_argument("--batch", type=int, help="clips per step (default: about 512 frames per step, max(1, 512 / T) clips)")
    bench.add_argument("--hidden", type=int, help="hidden size; FFN is 4x (default 256)")
    bench.add_argument("--heads", type=int, help="attention heads (default 4)")
    bench.add_argument("--repeats", type=int, help="timed steps after one warm-up (default 3)")
    bench.add_argument("--threads", type=int, help="CPU threads per measurement (default 1: stable on a shared machine)")
    bench.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                       help="where to measure (default: the CPU, and CUDA where present)")
    bench.add_argument("--cache", help="cache for the throughput part (default: a synthetic ViT-B-sized one, removed after)")
    bench.add_argument("--backbone", help="backbone to compare with (default: the cache's, else vit_base_patch16_224)")
    bench.set_defaults(func=_bench_temporal)

    from vtn.config import add_config_args  # light (yaml only), unlike the job it configures

    p = sub.add_parser(
        "train", help="train the temporal encoder + head on a feature cache",
        description="Stage two: train VTN's Longformer encoder and head on the cached frame features of CACHE's "
        "train split, evaluating on whole val videos every epoch (a cache without a val split gets one: 10 % of each "
        "class's train videos, by a hash of the id). RUN gets config.yaml, metrics.jsonl and the checkpoints best/ "
        "and last/. Defaults suit any cache size (unless --epochs or --steps is given, the schedule has a floor of "
        "optimiser steps). Under torchrun it trains with DDP. Interrupted, it continues with --resume.",
    )
    p.add_argument("cache", help="the feature cache (local path or fsspec URL)")
    p.add_argument("--out", required=True, metavar="RUN", help="the run directory to write")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN from its last checkpoint (exactly; starts fresh when there is none)")
    p.add_argument("--recipe", choices=["default", "reference"],
                   help="base settings: default (AdamW, warm-up, cosine) or reference (the paper code's SGD, steps)")
    p.add_argument("--frames", type=int, help="frames per training clip (data.clip_frames, default 16)")
    p.add_argument("--stride", type=int, help="cached frames between clip frames (data.stride, default 8)")
    p.add_argument("--model", choices=["tiny", "small", "base"],
                   help="encoder size: tiny (trains in seconds on a CPU), small, or base (the paper's, the default)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="train exactly this many epochs (optim.epochs; default: 25, "
                        "raised to reach optim.min_steps=1000 steps on a small cache)")
    length.add_argument("--steps", type=int, help="train exactly this many optimiser steps (optim.steps)")
    p.add_argument("--batch-size", type=int, help="clips per step over all processes (optim.batch_size)")
    p.add_argument("--lr", type=float, help="peak learning rate (optim.lr)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="autocast dtype (run.amp)")
    p.add_argument("--seed", type=int, help="run.seed")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (run.device; default: the GPU when there is one)")
    add_config_args(p, "model.num_layers=2")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train, interrupted="the last checkpoint is kept; add --resume to the same command to "
                   "continue exactly where it stopped")

    f = sub.add_parser(
        "finetune", help="fine-tune backbone + encoder + head end to end from raw video, from a stage-two run",
        description="End-to-end fine-tuning: starts from RUN's best/ checkpoint (encoder and head) and the backbone its "
        "cache was extracted with (rebuilt and checked by sha256), and trains them together on clips decoded from the "
        "videos (INPUT, default: the folder or CSV the cache was extracted from), sampled as the cache was; whole val "
        "videos are evaluated through the same model. RUN2 gets config.yaml, metrics.jsonl, failures.jsonl and the "
        "checkpoints best/ and last/ (backbone and temporal weights, with the preprocessing and sampling).",
    )
    f.add_argument("run", help="the stage-two run directory (or a checkpoint directory of one)")
    f.add_argument("--out", required=True, metavar="RUN2", help="the run directory to write")
    f.add_argument("--videos", metavar="INPUT", help="folder or CSV of the videos (default: the cache's recorded source)")
    f.add_argument("--resume", action="store_true", help="continue the run in RUN2 from its last checkpoint (exactly)")
    f.add_argument("--frames", type=int, help="frames per training clip (data.clip_frames; default: RUN's)")
    f.add_argument("--stride", type=int, help="sampled frames between clip frames (data.stride; default: RUN's)")
    flength = f.add_mutually_exclusive_group()
    flength.add_argument("--epochs", type=int, help="train exactly this many epochs (optim.epochs, default 5)")
    flength.add_argument("--steps", type=int, help="train exactly this many optimiser steps (optim.steps)")
    f.add_argument("--batch-size", type=int, help="clips per step over all processes (optim.batch_size, default 8)")
    f.add_argument("--lr", type=float, help="peak learning rate of encoder and head (optim.lr); the backbone's is "
                   "finetune.backbone_lr times it")
    f.add_argument("--amp", choices=["none", "bf16", "fp16"], help="autocast dtype (run.amp)")
    f.add_argument("--seed", type=int, help="run.seed")
    f.add_argument("--device", help="cpu, cuda, cuda:1 ... (run.device; default: the GPU when there is one)")
    f.add_argument("--micro-batch", type=int, help="frames per backbone call (finetune.micro_batch)")
    f.add_argument("--chunked", action="store_true", help="exact chunked backprop: each micro-batch's activations "
                   "recomputed in the backward pass (finetune.chunked)")
    f.add_argument("--workers", type=int, help="decode processes (finetune.workers; 0: decode in this process)")
    add_config_args(f, "finetune.backbone_lr=0.1")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=_finetune, interrupted="the last checkpoint is kept; add --resume to the same command to "
                   "continue exactly where it stopped")


def _bench_temporal(args) -> int:
    import dataclasses

    from vtn.temporal.bench import BenchConfig, run

    given = {k: getattr(args, k) for k in ("batch", "hidden", "heads", "repeats", "threads") if getattr(args, k) is not None}
    if args.lengths:
        given["lengths"] = tuple(args.lengths)
    if args.device != "all":
        given["devices"] = (args.device,)
    run(dataclasses.replace(BenchConfig(), **given))
    print()
    from vtn.temporal import throughput

    throughput.bench(args.cache, args.backbone, None if args.device == "all" else args.device)
    return 0


def _train(args) -> int:
    from vtn.temporal.train import main

    return main(args)


def _finetune(args) -> int:
    from vtn.temporal.finetune import main

    return main(args)
