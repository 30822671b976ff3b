"""`vtn bench ...`: every benchmark's subcommand, one function each. Only argparse at module level, so `vtn --help`
stays instant; a benchmark's module is imported when it runs."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    """Add `vtn bench` and a subcommand per benchmark to `vtn`."""
    bench = sub.add_parser("bench", help="benchmarks that print figures (store, extract, temporal)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for add in (_add_store, _add_extract, _add_temporal, _add_finetune, _add_sweep, _add_inference, _add_long,
                _add_export):
        add(bench_sub)


def _add_store(bench_sub) -> None:
    q = bench_sub.add_parser("store", help="files, bytes, open/index time, random reads, split loading and streaming "
                             "vs plain zarr; or a Kinetics-shaped cache (--kinetics)",
                             description="Builds a synthetic cache and measures it next to plain zarr reading the same "
                             "arrays, and training clips/s streamed from it against from memory. With --kinetics, builds "
                             "a cache shaped like Kinetics-400's ViT-B/16 features (250 frames x 768 float16 a video) "
                             "and extrapolates each figure to the 240,000 videos.")
    q.add_argument("--videos", type=int, default=100_000)
    q.add_argument("--frames", type=int, default=64)
    q.add_argument("--dim", type=int, default=64)
    q.add_argument("--reads", type=int, default=5000, help="random single-video reads to time")
    q.add_argument("--path", help="where to build the cache (default: a temporary folder, removed afterwards)")
    q.add_argument("--batches", type=int, default=100,
                   help="training batches (32 clips) to time from memory and streamed")
    q.add_argument("--kinetics", type=_fraction, nargs="?", const=1 / 16, metavar="FRACTION",
                   help="a Kinetics-shaped cache of this share of its 240,000 videos, e.g. 0.01 or 1/16 (with no value: "
                   "1/16, about 5.8 GB); --videos, --frames, --dim, --reads are then unused")
    q.set_defaults(func=_store)


def _fraction(text: str) -> float:
    """A share in (0, 1], written as a decimal or a fraction (1/16)."""
    from fractions import Fraction

    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        value = None
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share of the videos in (0, 1], e.g. 1/16 or 0.0625")
    return value


def _store(args) -> int:
    from vtn.bench.store import kinetics, run

    if args.kinetics is not None:
        kinetics(args.kinetics, args.path, args.batches)
    else:
        run(args.videos, args.frames, args.dim, args.reads, args.path, args.batches)
    return 0


def _add_extract(bench_sub) -> None:
    b = bench_sub.add_parser(
        "extract",
        help="decode-only, model-only, pipeline and sequential-loop frames/s; peak memory on a long 1080p file",
        description="Benchmarks the extraction pipeline on generated videos with a small timm CNN.",
    )
    b.add_argument("--backbone", default="resnet18", help="timm model (random init)")
    b.add_argument("--backbones", metavar="A,B,C", help="instead: these backbones in one vtn extract pass against one "
                   "run each (time, decoding's share, peak memory)")
    b.add_argument("--image-size", type=int, default=112, help="backbone input size")
    b.add_argument("--videos", type=int, default=24, help="generated videos")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--workers", type=int, help="decode processes (default: as vtn extract)")
    b.add_argument("--compile", action="store_true", help="compile the model for model-only and the pipeline "
                   "(the sequential loop stays eager, as common scripts run)")
    b.add_argument("--device", default="auto", help="where the model runs: auto (cuda when present), cpu, cuda, cuda:N")
    b.add_argument("--long-seconds", type=float, default=180.0, help="length of the 1080p and 720p memory test files")
    b.add_argument("--skip-memory", action="store_true", help="skip the long 1080p memory test")
    b.add_argument("--workdir", help="where generated videos are kept between runs (default: a temporary folder)")
    b.set_defaults(func=_extract)


def _extract(args) -> int:
    from vtn.bench.extract import main

    return main(args)


def _add_temporal(bench_sub) -> None:
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
    bench.set_defaults(func=_temporal)


def _temporal(args) -> int:
    import dataclasses

    from vtn.bench.encoder import BenchConfig, run, throughput_bench

    given = {k: getattr(args, k) for k in ("batch", "hidden", "heads", "repeats", "threads") if getattr(args, k) is not None}
    if args.lengths:
        given["lengths"] = tuple(args.lengths)
    if args.device != "all":
        given["devices"] = (args.device,)
    run(dataclasses.replace(BenchConfig(), **given))
    print()
    throughput_bench(args.cache, args.backbone, None if args.device == "all" else args.device)
    return 0


def _add_finetune(bench_sub) -> None:
    bench = bench_sub.add_parser(
        "finetune",
        help="end-to-end fine-tuning: peak memory and time per step under each memory control; vs stage two",
        description="On frames decoded from a generated video, through small random-init timm backbones (ViT-Tiny "
        "and ResNet-18 at 112 px) and a small VTN: peak memory and seconds per optimiser step for 16- and 64-frame "
        "clips, plain end to end against each memory control alone (micro-batch, grad checkpointing, chunked "
        "backprop, memory bank) and the default combination, each in a fresh process; whether chunked backprop's "
        "gradients equal plain ones; and seconds per clip of stage-two training on the cache against end-to-end "
        "fine-tuning. A few minutes on 2 CPU cores.",
    )
    bench.add_argument("--lengths", type=int, nargs="+", metavar="T", help="frames per clip (default 16 64)")
    bench.add_argument("--backbones", nargs="+", metavar="NAME", help="timm backbones (default vit_tiny_patch16_224 resnet18)")
    bench.add_argument("--image-size", type=int, help="input size in px (default 112)")
    bench.add_argument("--clips", type=int, help="clips per step (default 1)")
    bench.add_argument("--micro-batch", type=int, help="frames per backbone call of the micro-batch, chunked and "
                       "default rows (default: finetune.micro_batch's default, 8)")
    bench.add_argument("--bank-frames", type=int, help="fresh frames per clip of the memory-bank row (default 16)")
    bench.add_argument("--repeats", type=int, help="timed steps after one warm-up (default 2)")
    bench.add_argument("--threads", type=int, help="CPU threads per measurement (default 1)")
    bench.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="where to measure (default: CUDA where present, else the CPU)")
    bench.set_defaults(func=_finetune)


def _finetune(args) -> int:
    from vtn.bench.finetune import main

    return main(args)


def _add_sweep(bench_sub) -> None:
    bench = bench_sub.add_parser(
        "sweep", help="batched vs separate vtn train runs; a mixed grid with --jobs 2 vs separate commands",
        description="On a small generated cache: 8 runs of one tiny architecture differing in seed and learning "
        "rate as one batched vtn sweep against 8 vtn train commands one after another; then a 12-run mixed grid "
        "with --jobs 2 against the same 12 commands. Prints the wall times and ratios.",
    )
    bench.add_argument("--steps", type=int, default=60, help="optimiser steps per run (default 60)")
    bench.add_argument("--jobs", type=int, default=2, help="processes for the mixed grid (default 2)")
    bench.set_defaults(func=_sweep)


def _sweep(args) -> int:
    from vtn.bench.sweep import bench

    bench(args.steps, args.jobs)
    return 0


def _add_inference(bench_sub) -> None:
    b = bench_sub.add_parser(
        "inference", help="seconds per video and frames through the backbone: full view vs 10 clips x 3 crops",
        description="Trains a small model on generated videos (as vtn demo does), then predicts the val videos from "
        "raw video with one view over each whole video (full) and with 10 clips x 3 crops, and prints seconds per "
        "video, frames through the backbone per video and top-1 of each; then the single-clip row: one 2 s clip "
        "through a warm Predictor with ViT-B/16 (random init) against the backbone alone on its frames, and a cold "
        "`vtn predict` process.")
    b.add_argument("--videos", type=int, default=6, help="val videos per class (4 classes; default 6)")
    b.add_argument("--views", nargs="+", default=["full", "10x3"], help="modes to compare (default full 10x3)")
    b.add_argument("--train-videos", type=int, default=40, help="train videos per class (default 40)")
    b.add_argument("--steps", type=int, help="training steps (default: as vtn demo, 1500)")
    b.add_argument("--workers", type=int, default=0, help="decode processes (default 0: decode in the main process)")
    b.add_argument("--device", default="auto")
    b.add_argument("--workdir", help="keep the videos and the model here between runs (default: a temporary folder)")
    b.add_argument("--latency", action="store_true",
                   help="only the single-clip row: one 2 s clip through a warm Predictor against its backbone alone "
                   "(goal <= 1.5x), and a cold `vtn predict` process, on the CPU")
    b.add_argument("--latency-backbone", default="vit_base_patch16_224", metavar="NAME",
                   help="the backbone of the single-clip row, random init (default vit_base_patch16_224)")
    b.set_defaults(func=_inference)


def _inference(args) -> int:
    from pathlib import Path

    from vtn.bench.inference import latency, run

    if not args.latency:
        run(args.videos, tuple(args.views), args.workdir, args.workers, args.device, args.train_videos, args.steps)
    latency(args.latency_backbone, workdir=str(Path(args.workdir) / "latency") if args.workdir else None)
    return 0


def _add_long(bench_sub) -> None:
    b = bench_sub.add_parser(
        "long", help="a run on whole long order videos: val top-1, and [CLS]'s attention on the deciding events",
        description="For a run trained on order videos (vtn.synth.make_order_dataset: the class is the order of three "
        "2-s coloured events), reads each whole video of the split with each checkpoint and prints top-1, the "
        "attention mass [CLS] puts on the events' frames (rollout across layers, and the last layer) and the share "
        "of the frames the events cover.")
    b.add_argument("run", help="a vtn train run folder")
    b.add_argument("--cache", required=True, help="the feature cache of the videos")
    b.add_argument("--events", help="the videos' events.json (default: the one beside the cache's videos)")
    b.add_argument("--split", default="val", help="the split to read (default val)")
    b.add_argument("--checkpoints", nargs="+", default=["best", "last"], help="checkpoints of the run (default best last)")
    b.set_defaults(func=_long)


def _long(args) -> int:
    from vtn.bench.long import run

    run(args.run, args.cache, args.events, args.split, args.checkpoints)
    return 0


def _add_export(bench_sub) -> None:
    b = bench_sub.add_parser(
        "export", help="TensorBoard's cost on a tiny vtn train run; ONNX Runtime vs PyTorch latency of the encoder",
        description="A tiny vtn train run on a small generated cache with TensorBoard events and with --no-tb "
        "(alternated, best of --repeats); then an encoder + head (random weights; the paper's by default) exported with vtn export "
        "--onnx, one video at 16 and at 288 frames through PyTorch and ONNX Runtime on the CPU (median ms).")
    b.add_argument("--steps", type=int, default=60, help="optimiser steps of the tiny run (default 60)")
    b.add_argument("--repeats", type=int, default=3, help="runs of each kind (default 3; latency: 20x as many calls)")
    b.add_argument("--model", choices=["tiny", "small", "base"], default="base",
                   help="encoder size of the latency rows (default base: the paper's encoder)")
    b.set_defaults(func=_export)


def _export(args) -> int:
    from vtn.bench.export import bench

    bench(args.steps, args.repeats, args.model)
    return 0
