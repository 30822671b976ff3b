"""`vtn extract`. Only argparse at module level, so `vtn --help` stays instant."""

from __future__ import annotations

import argparse
import re
import sys


def register(sub) -> None:
    """Add `vtn extract` to `vtn`."""
    from vtn.config import add_config_args

    p = sub.add_parser(
        "extract",
        help="decode videos, run a timm backbone on sampled frames, cache one feature vector per frame",
        description="Extract per-frame backbone features from a folder of videos (class/ or split/class/ "
        "sub-folders give labels and splits) or a CSV manifest (path,label[,split]) into a feature cache. "
        "Re-running the same command resumes. Works under torchrun (one share of the videos per rank) and in job "
        "arrays (--shard K/N). "
        "Exit status: 0 all videos stored, 3 some failed (the rest stored, failures recorded), 2 usage error.",
    )
    p.add_argument("input", help="folder of videos, or a .csv manifest")
    p.add_argument("--root", metavar="DIR", help="with a manifest: video ids are paths relative to DIR (default: the "
                   "manifest's folder when every video lies under it, else the deepest folder they all share)")
    p.add_argument("--out", required=True, help="the cache: a local path or an fsspec URL")
    p.add_argument("--overwrite", action="store_true", help="replace an existing vtn cache (needed to change backbone or sampling); "
                   "never anything else, the input, or a folder holding it")
    s = p.add_mutually_exclusive_group()
    s.add_argument("--fps", type=float, help="sample F frames per second of video")
    s.add_argument("--every", type=int, metavar="K", help="sample every K-th frame (default: every frame)")
    s.add_argument("--num-frames", type=int, metavar="N", help="sample N frames spread evenly over the video")
    p.add_argument("--max-seconds", type=float, metavar="S", help="use only the first S seconds of each video")
    p.add_argument("--backbone", metavar="NAME", action="append",
                   help="timm model name (default vit_base_patch16_224); repeat it to run several backbones on one "
                   "decode pass, each with its own preprocessing, into one cache each: OUT/NAME.zarr")
    p.add_argument("--layers", type=_layers, metavar="I,J,...",
                   help="cache the pooled output of these blocks instead of the model's (timm's forward_intermediates; "
                   "Python indices, -1 the last block: --layers -1,-2), concatenated in this order into one vector per "
                   "frame: a token model's [CLS] (or mean token) after the final norm, a CNN stage's average-pooled map")
    # `--layers -1,-2` is a value, not a flag (argparse takes only a lone negative number for one)
    p._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*$")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="PATH", help="backbone weights: a safetensors file or a torch state dict")
    w.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (the default; offline: local hub cache)")
    w.add_argument("--random-init", action="store_true", help="seeded random weights (tests, benchmarks)")
    p.add_argument("--image-size", type=int, metavar="PX", help="override the backbone's input size")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, help="frames per forward, packed across videos (default 64)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="autocast precision (default none)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone: faster per frame after a one-off compile (seconds to a minute); "
                        "features equal eager mode up to float rounding")
    p.add_argument("--workers", type=int, help="decode processes (default: 2 with the model on the CPU; with a GPU, "
                   "one per CPU core of its share of the machine, less one; 0: decode in the main process)")
    p.add_argument("--timeout", type=float, metavar="S", help="kill a decode that makes no progress for S seconds (default 120)")
    p.add_argument("--shard", metavar="K/N", help="only the K-th of N fixed shares of the videos (K = 0..N-1), for job "
                   "arrays (SLURM, Kubernetes) whose tasks start on their own: each writes its own part of the same "
                   "cache, and re-running a task resumes its share (default: a SLURM array task's own, from "
                   "SLURM_ARRAY_TASK_ID, _MIN and _COUNT)")
    p.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bar (as train, finetune, "
                   "sweep and demo; --no-progress is the older spelling)")
    add_config_args(p, "runtime.decode_threads=2")
    p.set_defaults(func=_extract)


def flags() -> dict:
    """`vtn extract`'s flags (argparse dest) -> config keys (see vtn.config.flag_updates); they override --config
    and --set, later entries over earlier ones."""
    from vtn.config import VALUE
    from vtn.extract.sampling import MODES

    return {  # each sampling mode's flag is its name (--num-frames for num_frames)
        **{name: {"sampling.mode": name, f"sampling.{mode.field}": VALUE} for name, mode in MODES.items()},
        "max_seconds": "sampling.max_seconds",
        "backbone": "backbone.name",
        "weights": "backbone.weights",
        "pretrained": {"backbone.weights": "pretrained"},
        "random_init": {"backbone.weights": "random"},
        "image_size": "backbone.image_size",
        "layers": "backbone.layers",
        **{key: f"runtime.{key}" for key in ("device", "batch_size", "amp", "workers", "timeout")},
        "quiet": {"runtime.progress": False},
        "compile": {"runtime.compile": True},
    }


def _extract(args: argparse.Namespace) -> int:
    from vtn.config import job_config
    from vtn.extract.config import ExtractConfig

    names = args.backbone or []
    args.backbone = names[0] if len(names) == 1 else None  # several: each cache's name is set by the job
    args.backbones = names if len(names) > 1 else None
    cfg = job_config(ExtractConfig, args, flags())
    from vtn.runtime import processes, setup_processes

    if processes().world == 1:
        return _report(_run(cfg, args, 0, 1), 0, args)
    # Under torchrun: one process per device; set up here, at the top of the job, and passed down.
    import dataclasses

    import torch.distributed as dist

    procs, device, _ = setup_processes(cfg.runtime.device, cfg.runtime.dist_timeout)
    if device.type == "cuda":
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, device=str(device)))
    try:
        return _report(_run(cfg, args, procs.rank, procs.world), procs.rank, args)
    finally:
        dist.destroy_process_group()


def _run(cfg, args, rank: int, world_size: int):
    import os

    from vtn.extract.job import run
    from vtn.runtime import slurm_array_shard

    shard = _shard(args.shard)  # --shard wins over the SLURM array's
    array = slurm_array_shard(os.environ) if shard is None else None
    if array is not None:
        shard = array[0]
        if rank == 0:
            print(f"vtn extract: shard {shard[0]}/{shard[1]} from the SLURM array task ({array[1]})", flush=True)
    return run(cfg, args.input, args.out, overwrite=args.overwrite, rank=rank, world_size=world_size,
               shard=shard, root=args.root, backbones=args.backbones)


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like -1,-2, got '{text}'") from None


def _shard(text: str | None) -> tuple[int, int] | None:
    from vtn.errors import UserError

    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text}: expected K/N, e.g. --shard 3/16") from None
    return k, n


def _report(summary, rank: int, args) -> int:
    """Print the final summary (rank 0 only); exit status 3 when any video failed."""
    if rank == 0:
        rate = summary.frames / summary.seconds if summary.seconds else 0.0
        print(f"extracted {summary.videos} videos, {summary.frames} frames in {summary.seconds:.1f} s "
              f"{f'into {len(args.backbones)} caches in {args.out} ' if args.backbones else ''}"
              f"({rate:.0f} frames/s); {summary.skipped} already in {'every' if args.backbones else 'the'} cache; "
              f"{len(summary.failures)} failed",
              file=sys.stderr)
        for vid, error, message in summary.failures[:20]:
            print(f"  failed {vid}: {error}: {message}", file=sys.stderr)
        if len(summary.failures) > 20:
            print(f"  ... and {len(summary.failures) - 20} more (vtn store info lists them all)", file=sys.stderr)
    return 3 if summary.failures else 0

