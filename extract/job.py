"""The extraction job: videos in, one feature vector per sampled frame into the cache.

`run(cfg, source, out, ...)` is a flat function: set up (the videos, the backbone, the writer), run stage one's
pipeline (extract/pipeline.py), save, clean up.

Under torchrun the caller passes rank and world size; each rank takes a deterministic share of the remaining
videos, balanced by expected sampled-frame count, writes its own part, and rank 0 consolidates the index once every
rank has closed.
"""

from __future__ import annotations

import importlib
import os
import stat
import time
import zlib
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vtn import __version__
from vtn.config import to_dict
from vtn.errors import UserError
from vtn.extract.config import ExtractConfig, cache_paths
from vtn.extract.decode import READERS, decoder_attrs
from vtn.extract.inputs import InputEntry, discover
from vtn.extract.pipeline import build_backbone, check_runtime, decode_workers, extract_many
from vtn.extract.sampling import SamplingConfig, effective, estimate
from vtn.paths import check_cache_out
from vtn.progress import VIDEO_BAR, progress_bar
from vtn.runtime import FailTogether, on_rank0, processes


FINISH_WAIT = timedelta(days=7)  # how long a rank that finished waits for the others


@dataclass
class Summary:
    """What one process did."""

    videos: int = 0  # stored now
    frames: int = 0  # feature rows stored now
    skipped: int = 0  # already in the cache (resume)
    failures: list = field(default_factory=list)  # (id, error class, message)
    seconds: float = 0.0

    def merge(self, other: "Summary") -> "Summary":
        return Summary(self.videos + other.videos, self.frames + other.frames, self.skipped,
                       self.failures + other.failures, max(self.seconds, other.seconds))


def library_versions() -> dict:
    import timm
    import zarr

    decoders = {r.library: importlib.import_module(r.library).__version__ for r in READERS}
    return {"vtn": __version__, "torch": torch.__version__, "timm": timm.__version__, **decoders,
            "zarr": zarr.__version__, "numpy": np.__version__}


def expected_frames(path: Path, cfg: SamplingConfig) -> float:
    """Sampled frames a video will give, estimated from its container header (for balancing ranks).

    Cheap (no decoding); unreadable or special files count as 1.
    """
    import av

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return 1.0
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            seconds = float(stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1e6
    except Exception:
        return 1.0
    if cfg.max_seconds is not None:
        seconds = min(seconds, cfg.max_seconds)
    return estimate(cfg, max(1.0, seconds * rate), seconds)


def partition(weights: list[float], world_size: int) -> list[list[int]]:
    """Split items into `world_size` shares of near-equal total weight; deterministic.

    Greedy: heaviest first (ties by position), each to the currently lightest share (ties by rank).
    """
    loads = [0.0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += weights[i]
    return [sorted(s) for s in shares]


def open_writer(out: str, overwrite: bool, rank: int, world_size: int, share: tuple[int, int], **writer_args):
    """This process's CacheWriter: rank 0 creates (or checks) the cache first and claims the job's `share` of the
    videos (store/lease.py: a second job on the same videos is refused); the other ranks join under its claim."""
    from vtn.store import CacheWriter

    writer = on_rank0(lambda: CacheWriter(out, overwrite=overwrite, share=share, **writer_args), rank, world_size)
    return writer if rank == 0 else CacheWriter(out, create=False, **writer_args)


def rank_share(todo: list[InputEntry], sampling: SamplingConfig, rank: int, world_size: int) -> list[InputEntry]:
    """This rank's share of the videos still to do, balanced by expected sampled frames (same on every rank)."""
    mine = [todo[i] for i in range(rank, len(todo), world_size)]
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, {e.id: expected_frames(e.path, sampling) for e in mine})
    weights_by_id = {k: v for part in gathered for k, v in part.items()}
    return [todo[i] for i in partition([weights_by_id[e.id] for e in todo], world_size)[rank]]


def run(cfg: ExtractConfig, source: str | Path, out: str, overwrite: bool = False, rank: int = 0,
        world_size: int = 1, shard: tuple[int, int] | None = None, root: str | Path | None = None,
        backbones: list[str] | None = None) -> Summary:
    """Extract every video of `source` (folder or CSV) not yet in the cache at `out`; returns the summary.

    With `world_size` > 1, torch.distributed must be initialised by the caller; every rank calls this.
    The returned summary covers all ranks (on every rank). `shard = (k, n)` keeps only the k-th of n fixed
    shares of the videos (by a hash of the id, so a share never depends on which other files exist), for
    job arrays whose tasks run independently, each writing its own part of the same cache. `root` is the folder
    a manifest's video ids are relative to (see inputs.discover); the root used is recorded with the cache.
    Any failure on any rank ends every rank within seconds, with the first failing rank's message
    (runtime.FailTogether); what each rank committed stays in the cache.

    `backbones`: several timm names run on one decode pass, each into its own ordinary cache in the folder `out`
    (config.cache_paths), each with `cfg`'s settings and its own name, as `vtn extract --backbone NAME` alone would
    write it. A video is done when every cache has it; a re-run runs each backbone only on the videos its cache
    lacks. None (or one name): the one cache at `out`.
    """
    with FailTogether(rank, world_size) as ranks:
        return _run(cfg, source, out, overwrite, rank, world_size, shard, root, ranks, backbones)


@dataclass
class _Cache:
    """One backbone's cache in this job."""

    out: str
    cfg: ExtractConfig
    model: object = None
    preprocess: object = None
    writer: object = None
    done: set = field(default_factory=set)  # the videos it had before this run


def _run(cfg: ExtractConfig, source: str | Path, out: str, overwrite: bool, rank: int, world_size: int,
         shard: tuple[int, int] | None, root: str | Path | None, ranks: FailTogether,
         backbones: list[str] | None) -> Summary:
    from vtn.store import consolidate

    t0 = time.monotonic()
    local_world = processes().local_world  # the processes sharing this machine's cores
    device = check_runtime(cfg, local_world)
    caches = [_Cache(o, c) for o, c in zip(*_targets(cfg, out, backbones))]
    entries, class_names, ids_root = discover(source, root)
    # Before the models are built: an --out that is the input, holds it, or is not a vtn cache is refused
    # (vtn/paths.py). The input is the folder, or the CSV and every video it lists. Rank 0 decides, so under
    # torchrun no rank reads a cache that rank 0 may be replacing.
    inputs = [source, *(e.path for e in entries)]
    on_rank0(lambda: [check_cache_out(c.out, inputs=inputs, overwrite=overwrite) for c in caches], rank, world_size)
    if shard is not None:
        k, n = shard
        if not 0 <= k < n:
            raise UserError(f"--shard {k}/{n}: K must lie in 0..N-1")
        if overwrite and n > 1:
            raise UserError(f"--shard {k}/{n} with --overwrite: each task of the array would replace the cache in "
                            "turn and delete what the others committed, so nothing was changed. To start over, "
                            f"delete {out} once (rm -r), then launch the tasks without --overwrite")
        entries = [e for e in entries if zlib.crc32(e.id.encode()) % n == k]
    common = {"source": str(Path(source).resolve()), "root": str(ids_root)}  # video ids are paths relative to root
    try:
        for c in caches:
            _open(c, device, common, class_names, overwrite, rank, world_size, shard)
        summary = Summary()
        todo = [e for e in entries if any(e.id not in c.done for c in caches)]
        if world_size > 1:
            dist.barrier()  # every rank has read the same committed set before anyone writes
            # Ranks finish their shares at different times (one long video can keep a rank busy for an hour after
            # the others): they wait for each other on a group of their own whose timeout is not the job's
            # collective timeout, so waiting is never taken for a hang. Made now, while every rank is here.
            finish_group = dist.new_group(backend="gloo", timeout=FINISH_WAIT)
            todo = rank_share(todo, cfg.sampling, rank, world_size)
        _extract(todo, caches, device, cfg, summary, ranks, t0, rank, world_size, local_world)
    finally:
        for c in caches:
            if c.writer is not None:
                c.writer.close(consolidate=world_size == 1)
    summary.skipped = sum(all(e.id in c.done for c in caches) for e in entries)
    if world_size > 1:
        ranks.wait(dist.barrier(group=finish_group, async_op=True))  # every part is closed
        if rank == 0:
            for c in caches:
                consolidate(c.out)
        ranks.wait(dist.barrier(group=finish_group, async_op=True))  # the index is written before any rank returns
        parts: list = [None] * world_size
        dist.all_gather_object(parts, summary, group=finish_group)
        summary = parts[0]
        for other in parts[1:]:
            summary = summary.merge(other)
    summary.seconds = time.monotonic() - t0
    return summary


def _targets(cfg: ExtractConfig, out: str, backbones: list[str] | None) -> tuple[list[str], list[ExtractConfig]]:
    """Each cache's path and config: `out` and `cfg` for one backbone, else one per name (config.cache_paths)."""
    if not backbones or len(backbones) == 1:
        return [out], [cfg if not backbones else replace(cfg, backbone=replace(cfg.backbone, name=backbones[0]))]
    if cfg.backbone.weights not in ("pretrained", "random"):
        raise UserError(f"--weights {cfg.backbone.weights}: one weights file fits one backbone; with several "
                        "--backbone use --pretrained or --random-init (or one run per weights file)")
    return cache_paths(out, backbones), [replace(cfg, backbone=replace(cfg.backbone, name=n)) for n in backbones]


def _open(c: _Cache, device: torch.device, common: dict, class_names: list[str], overwrite: bool, rank: int,
          world_size: int, shard: tuple[int, int] | None) -> None:
    """Build `c`'s backbone and open its writer, with the attributes a job of that backbone alone writes."""
    c.model, c.preprocess, identity = build_backbone(c.cfg.backbone, c.cfg.runtime, device)
    attrs = {
        "backbone": identity,
        "sampling": effective(c.cfg.sampling),
        "decoder": decoder_attrs(),
        "config": to_dict(c.cfg),
        "versions": library_versions(),
        **common,
        # In the identity below: a resumed or sharded job must not mix bf16 with fp32 features, nor compiled with eager
        "precision": {"amp": c.cfg.runtime.amp, "compile": c.cfg.runtime.compile},
    }
    c.writer = open_writer(c.out, overwrite, rank, world_size, feature_dim=identity["feature_dim"],
                           dtype=c.cfg.runtime.feature_dtype, class_names=class_names, attrs=attrs,
                           identity=("backbone", "sampling", "precision", "root"), share=shard or (0, 1),
                           commit_every=c.cfg.runtime.commit_every,
                           name=f"shard{shard[0]}of{shard[1]}-rank{rank}" if shard else f"rank{rank}")
    c.done = c.writer.committed_ids()


def _extract(todo: list[InputEntry], caches: list[_Cache], device: torch.device, cfg: ExtractConfig,
             summary: Summary, ranks: FailTogether, t0: float, rank: int, world_size: int, local_world: int) -> None:
    """Run the pipeline over `todo` into every cache that lacks each video, counting into `summary`."""
    bar = None
    if cfg.runtime.progress and rank == 0:
        bar = progress_bar(total=len(todo), unit="video",
                           desc="extract" if world_size == 1 else f"extract (rank 0 of {world_size})",
                           bar_format=VIDEO_BAR)
    decoded = 0  # frames decoded so far: the bar moves with them, not only when a video is complete
    several = len(caches) > 1
    waiting = {e.id: sum(e.id not in c.done for c in caches) for e in todo}  # caches yet to store each video

    def progress(videos: float, frames: int) -> None:
        nonlocal decoded
        decoded += frames
        if bar is not None:
            elapsed = max(time.monotonic() - t0, 1e-9)
            bar.set_postfix_str(f"{decoded / elapsed:.0f} frames/s, {summary.videos} stored, "
                                f"{len(summary.failures)} failed", refresh=False)
            bar.update(videos)

    def store(k: int, e: InputEntry, info, features, timestamps, indices) -> None:
        caches[k].writer.add(e.id, features, timestamps, indices, label=e.label, split=e.split, fps=info.fps,
                             duration=info.duration, num_frames=info.num_frames)
        waiting[e.id] -= 1
        if not waiting[e.id]:  # in every cache now
            summary.videos += 1
            summary.frames += len(features)

    def fail(vid: str, error: str, message: str, ks: list[int]) -> None:
        for k in ks:
            caches[k].writer.add_failure(vid, error, message)
        summary.failures.append((vid, error, f"{_name(caches, ks)}: {message}" if several else message))

    try:
        extract_many(todo, [(c.model, c.preprocess) for c in caches], device, cfg, store, fail,
                     needs=lambda e: [k for k, c in enumerate(caches) if e.id not in c.done], tick=ranks.check,
                     workers=decode_workers(cfg.runtime, device, local_world), pad=True, progress=progress)
    finally:
        if bar is not None:
            bar.close()


def _name(caches: list[_Cache], ks: list[int]) -> str:
    return ", ".join(caches[k].cfg.backbone.name for k in ks)
