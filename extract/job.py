"""The extraction job: videos in, one feature vector per sampled frame into the cache.

`run(cfg, source, out, ...)` is a flat function: set up (inputs, backbone, writer), run the pipeline,
save, clean up. The pipeline (`extract_features`) overlaps decoding and compute: decode workers stream
uint8 chunks; each chunk is moved to the device and preprocessed there at once (so only model-sized frames
wait), and frames from many videos are packed into full batches of `batch_size`. The last batch is padded
to `batch_size` too: a fixed batch shape makes each frame's features independent of which other frames
share its batch, so a resumed or multi-process run gives bitwise the same features on the CPU. One batch
stays in flight: its features come back after the next batch is launched, so on a GPU the host's work
(receiving, pinning and preprocessing the next frames) overlaps the model instead of alternating with it.

Under torchrun the caller passes rank and world size (this module reads the environment only for the
default number of decode workers: LOCAL_WORLD_SIZE, the processes sharing the machine's cores); each
rank takes a deterministic share of the remaining videos, balanced by expected sampled-frame count,
writes its own part, and rank 0 consolidates the index once every rank has closed.
"""

from __future__ import annotations

import os
import stat
import time
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from vtn import __version__
from vtn.config import to_dict
from vtn.errors import UserError
from vtn.extract.backbone import Preprocess, compile_backbone, create_backbone
from vtn.extract.config import BackboneConfig, ExtractConfig, RuntimeConfig
from vtn.extract.inputs import VideoEntry, discover
from vtn.extract.sampling import SamplingConfig, check, effective
from vtn.extract.workers import DecodePool
from vtn.paths import check_cache_out
from vtn.progress import progress_bar
from vtn.runtime import FailTogether, RankFailed, autocast, resolve_device
from vtn.store.layout import DiskFull


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
    import av
    import decord
    import timm
    import zarr

    return {"vtn": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "decord": decord.__version__, "av": av.__version__, "zarr": zarr.__version__,
            "numpy": np.__version__}


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
    n = max(1.0, seconds * rate)
    if cfg.mode == "every":
        return max(1.0, n / cfg.every)
    if cfg.mode == "fps":
        return max(1.0, min(n, seconds * cfg.fps))
    return float(min(n, cfg.num_frames))


def decode_workers(rt: RuntimeConfig, device: torch.device) -> int:
    """`rt.workers`, or its default for a model on `device` (see RuntimeConfig)."""
    if rt.workers is not None:
        return rt.workers
    if device.type == "cpu":
        return 2
    # Processes sharing this machine: one per GPU, or as many as torchrun started here (each may see one GPU).
    processes = max(1, torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(2, len(os.sched_getaffinity(0)) // processes - 1)


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


class _Video:
    """One video in flight: what arrived from the decoder and what came out of the model."""

    def __init__(self, entry: VideoEntry, info):
        self.entry, self.info = entry, info
        self.indices: list[np.ndarray] = []
        self.timestamps: list[np.ndarray] = []
        self.features: list[torch.Tensor] = []
        self.sent = 0  # rows handed to the model (frames x crops)
        self.done = 0  # rows whose features came back
        self.decoded = False  # the decoder sent its last chunk

    @property
    def complete(self) -> bool:
        return self.decoded and self.done == self.sent


class Batcher:
    """Packs preprocessed frames of many videos into batches of exactly `batch_size` rows (the last one padded:
    see the module docstring) and keeps one batch in flight: a batch's features are fetched after the next batch
    is launched. `on_rows(owner, features)` receives each owner's rows in order as they come back."""

    def __init__(self, model, batch_size: int, channels_last: bool, amp, on_rows: Callable):
        self.model, self.batch_size, self.channels_last, self.amp = model, batch_size, channels_last, amp
        self.on_rows = on_rows
        self.pending: list[tuple[object, torch.Tensor]] = []  # (owner, rows) waiting for a full batch
        self.inflight = None  # (features still on the device, [(owner, rows)])

    def add(self, owner, x: torch.Tensor) -> None:
        self.pending.append((owner, x))
        while sum(len(r) for _, r in self.pending) >= self.batch_size:
            self._launch()

    def drop(self, owner) -> None:
        """Forget an owner's waiting rows (its rows in flight still come back; the caller ignores them)."""
        self.pending = [(o, x) for o, x in self.pending if o is not owner]

    def flush(self) -> None:
        while self.pending:
            self._launch()
        self._collect()

    def _launch(self) -> None:
        take, parts, n = [], [], 0
        while self.pending and n < self.batch_size:
            owner, x = self.pending.pop(0)
            k = min(len(x), self.batch_size - n)
            if k < len(x):
                self.pending.insert(0, (owner, x[k:]))
            take.append((owner, k))
            parts.append(x[:k])
            n += k
        x = torch.cat(parts)  # [n, 3, h, w]
        if n < self.batch_size:  # pad: the batch shape never changes
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.amp:
            out = self.model(x)[:n]  # [n, D]; on a GPU this only queues the work
        self._collect()  # the batch before this one, while this one runs
        self.inflight = (out, take)

    def _collect(self) -> None:
        if self.inflight is None:
            return
        out, take = self.inflight
        self.inflight = None
        out = out.float().cpu()  # [n, D]; waits for this batch only, the one launched after it keeps a GPU busy
        row = 0
        for owner, k in take:
            self.on_rows(owner, out[row: row + k])
            row += k


def extract_features(entries: list[VideoEntry], model, preprocess, device: torch.device, cfg: ExtractConfig,
                     store: Callable, fail: Callable[[str, str, str], None],
                     tick: Callable[[], None] = lambda: None) -> None:
    """Decode, preprocess, batch and run `entries` through `model`, calling `store(entry, info, features
    [rows, D], timestamps, frame_indices)` as soon as a video is complete (rows = frames x the preprocessing's
    crops) and `fail(id, error class, message)` for a video that cannot be used. `store` may raise a UserError
    (e.g. features that overflow float16): the video is then recorded as failed, the job goes on; a DiskFull
    stops the job. `tick()` is called between decoded chunks (under torchrun: raises when another rank failed).
    """
    rt = cfg.runtime
    by_id = {e.id: e for e in entries}
    live: dict[str, _Video] = {}

    def finish(v: _Video) -> None:
        if live.get(v.entry.id) is not v or not v.complete:
            return
        del live[v.entry.id]
        try:
            store(v.entry, v.info, torch.cat(v.features).numpy(), np.concatenate(v.timestamps), np.concatenate(v.indices))
        except DiskFull:  # not this video's fault: the job stops, with what it committed kept
            raise
        except UserError as err:
            fail(v.entry.id, type(err).__name__, str(err))

    def on_rows(v: _Video, rows: torch.Tensor) -> None:
        v.features.append(rows)
        v.done += len(rows)
        finish(v)  # a video that failed or restarted since is no longer live: its rows go nowhere

    batcher = Batcher(model, rt.batch_size, rt.channels_last, autocast(device, rt.amp), on_rows)
    jobs = [(e.id, str(e.path)) for e in entries]
    workers = decode_workers(rt, device)
    with DecodePool(jobs, cfg.sampling, workers=workers, timeout=rt.timeout, chunk_bytes=rt.chunk_mb << 20,
                    threads=rt.decode_threads, prefetch=max(4, 2 * workers)) as pool:
        for kind, vid, payload in pool:
            tick()
            if kind == "info":
                live[vid] = _Video(by_id[vid], payload)
            elif kind == "chunk":
                v = live[vid]
                frames = torch.from_numpy(payload.frames)
                if device.type == "cuda":
                    frames = frames.pin_memory()
                with torch.inference_mode():
                    x = preprocess(frames.to(device, non_blocking=True))  # [n * crops, 3, h, w]
                v.indices.append(payload.frame_indices)
                v.timestamps.append(payload.timestamps)
                v.sent += len(x)
                batcher.add(v, x)
            elif kind in ("reset", "fail"):  # reset: decord gave up mid-video and PyAV starts it again
                if vid in live:
                    batcher.drop(live.pop(vid))
                if kind == "fail":
                    fail(vid, *payload)
            elif kind == "done":
                live[vid].decoded = True
                finish(live[vid])
        batcher.flush()


def build_backbone(b: BackboneConfig, rt: RuntimeConfig, device: torch.device, crops: int = 1):
    """The backbone on `device` as the runtime asks (channels_last, compiled), its preprocessing (`crops` per
    frame) and its identity (with the preprocessing) for the cache's attributes. Shared with `vtn predict`."""
    weights = None if b.weights in ("pretrained", "random") else b.weights
    model, data_config, identity = create_backbone(b.name, weights=weights, pretrained=b.weights == "pretrained",
                                                   image_size=b.image_size, seed=b.seed)
    preprocess = Preprocess(data_config, crops).to(device)
    identity["preprocessing"] = preprocess.attrs
    model = model.to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if rt.compile:
        example = torch.zeros(rt.batch_size, 3, *preprocess.size, device=device)
        if rt.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        model = compile_backbone(model, example, autocast(device, rt.amp))
    return model, preprocess, identity


def check_runtime(cfg: ExtractConfig) -> torch.device:
    """Refuse settings that cannot work; the device, with the CPU's threads set. Shared with `vtn predict`."""
    check(cfg.sampling)  # the runtime's ranges are checked when the config is built (extract/config.py)
    device = resolve_device(cfg.runtime.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.runtime.threads or len(os.sched_getaffinity(0)))
    return device


def on_rank0(fn: Callable, rank: int, world_size: int):
    """`fn()` on rank 0 only; whatever it raises stops every rank at once with rank 0's message (the others would
    otherwise wait in their next collective for the job's timeout). Rank 0 raises its own exception; the others a
    UserError for a UserError (one line, exit 2), else a RankFailed naming rank 0's exception."""
    error, result = [None], None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:
            error = [(isinstance(e, UserError), type(e).__name__, str(e))]
            if world_size > 1:
                dist.broadcast_object_list(error, src=0)
            raise
    if world_size > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        user, kind, message = error[0]
        raise UserError(message) if user else RankFailed(f"rank 0 failed: {kind}: {message}")
    return result


def open_writer(out: str, overwrite: bool, rank: int, world_size: int, share: tuple[int, int], **writer_args):
    """This process's CacheWriter: rank 0 creates (or checks) the cache first and claims the job's `share` of the
    videos (store/lease.py: a second job on the same videos is refused); the other ranks join under its claim."""
    from vtn.store import CacheWriter

    writer = on_rank0(lambda: CacheWriter(out, overwrite=overwrite, share=share, **writer_args), rank, world_size)
    return writer if rank == 0 else CacheWriter(out, create=False, **writer_args)


def rank_share(todo: list[VideoEntry], sampling: SamplingConfig, rank: int, world_size: int) -> list[VideoEntry]:
    """This rank's share of the videos still to do, balanced by expected sampled frames (same on every rank)."""
    mine = [todo[i] for i in range(rank, len(todo), world_size)]
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, {e.id: expected_frames(e.path, sampling) for e in mine})
    weights_by_id = {k: v for part in gathered for k, v in part.items()}
    return [todo[i] for i in partition([weights_by_id[e.id] for e in todo], world_size)[rank]]


def run(cfg: ExtractConfig, source: str | Path, out: str, overwrite: bool = False, rank: int = 0,
        world_size: int = 1, shard: tuple[int, int] | None = None, root: str | Path | None = None) -> Summary:
    """Extract every video of `source` (folder or CSV) not yet in the cache at `out`; returns the summary.

    With `world_size` > 1, torch.distributed must be initialised by the caller; every rank calls this.
    The returned summary covers all ranks (on every rank). `shard = (k, n)` keeps only the k-th of n fixed
    shares of the videos (by a hash of the id, so a share never depends on which other files exist), for
    job arrays whose tasks run independently, each writing its own part of the same cache. `root` is the folder
    a manifest's video ids are relative to (see inputs.discover); the root used is recorded with the cache.
    Any failure on any rank ends every rank within seconds, with the first failing rank's message
    (runtime.FailTogether); what each rank committed stays in the cache.
    """
    with FailTogether(rank, world_size) as ranks:
        return _run(cfg, source, out, overwrite, rank, world_size, shard, root, ranks)


def _run(cfg: ExtractConfig, source: str | Path, out: str, overwrite: bool, rank: int, world_size: int,
         shard: tuple[int, int] | None, root: str | Path | None, ranks: FailTogether) -> Summary:
    from vtn.store import consolidate

    t0 = time.monotonic()
    device = check_runtime(cfg)
    entries, class_names, ids_root = discover(source, root)
    # Before the model is built: an --out that is the input, holds it, or is not a vtn cache is refused
    # (vtn/paths.py). The input is the folder, or the CSV and every video it lists. Rank 0 decides, so under
    # torchrun no rank reads a cache that rank 0 may be replacing.
    on_rank0(lambda: check_cache_out(out, inputs=[source, *(e.path for e in entries)], overwrite=overwrite),
             rank, world_size)
    if shard is not None:
        k, n = shard
        if not 0 <= k < n:
            raise UserError(f"--shard {k}/{n}: K must lie in 0..N-1")
        if overwrite and n > 1:
            raise UserError(f"--shard {k}/{n} with --overwrite: each task of the array would replace the cache in "
                            "turn and delete what the others committed, so nothing was changed. To start over, "
                            f"delete {out} once (rm -r), then launch the tasks without --overwrite")
        entries = [e for e in entries if zlib.crc32(e.id.encode()) % n == k]
    model, preprocess, identity = build_backbone(cfg.backbone, cfg.runtime, device)
    attrs = {
        "backbone": identity,
        "sampling": effective(cfg.sampling),
        "decoder": {"primary": "decord", "fallback": "pyav", "frames": "RGB uint8, container presentation order",
                    "timestamps": "seconds from the first frame, from container pts, rounded to 1 us"},
        "config": to_dict(cfg),
        "versions": library_versions(),
        "source": str(Path(source).resolve()),
        "root": str(ids_root),  # video ids are paths relative to it
        # In the identity below: a resumed or sharded job must not mix bf16 with fp32 features, nor compiled with eager
        "precision": {"amp": cfg.runtime.amp, "compile": cfg.runtime.compile},
    }
    writer = open_writer(out, overwrite, rank, world_size, feature_dim=identity["feature_dim"],
                         dtype=cfg.runtime.feature_dtype, class_names=class_names, attrs=attrs,
                         identity=("backbone", "sampling", "precision", "root"), share=shard or (0, 1),
                         commit_every=cfg.runtime.commit_every,
                         name=f"shard{shard[0]}of{shard[1]}-rank{rank}" if shard else f"rank{rank}")
    done = writer.committed_ids()
    todo = [e for e in entries if e.id not in done]
    if world_size > 1:
        dist.barrier()  # every rank has read the same committed set before anyone writes
        # Ranks finish their shares at different times (one long video can keep a rank busy for an hour after the
        # others): they wait for each other on a group of their own whose timeout is not the job's collective
        # timeout, so waiting is never taken for a hang. Made now, while every rank is here to connect.
        finish_group = dist.new_group(backend="gloo", timeout=FINISH_WAIT)
        todo = rank_share(todo, cfg.sampling, rank, world_size)

    summary = Summary()
    bar = None
    if cfg.runtime.progress and rank == 0:
        bar = progress_bar(total=len(todo), unit="video",
                           desc="extract" if world_size == 1 else f"extract (rank 0 of {world_size})")

    def progress() -> None:
        if bar is not None:
            bar.update()
            elapsed = max(time.monotonic() - t0, 1e-9)
            bar.set_postfix_str(f"{bar.n / elapsed:.1f} videos/s, {summary.frames / elapsed:.0f} frames/s, "
                                f"{len(summary.failures)} failed", refresh=False)

    def store(e: VideoEntry, info, features, timestamps, indices) -> None:
        writer.add(e.id, features, timestamps, indices, label=e.label, split=e.split, fps=info.fps,
                   duration=info.duration, num_frames=info.num_frames)
        summary.videos += 1
        summary.frames += len(features)
        progress()

    def fail(vid: str, error: str, message: str) -> None:
        writer.add_failure(vid, error, message)
        summary.failures.append((vid, error, message))
        progress()

    try:
        extract_features(todo, model, preprocess, device, cfg, store, fail, tick=ranks.check)
    finally:
        if bar is not None:
            bar.close()
        writer.close(consolidate=world_size == 1)
    summary.skipped = len(done & {e.id for e in entries})
    if world_size > 1:
        ranks.wait(dist.barrier(group=finish_group, async_op=True))  # every part is closed
        if rank == 0:
            consolidate(out)
        ranks.wait(dist.barrier(group=finish_group, async_op=True))  # the index is written before any rank returns
        parts: list = [None] * world_size
        dist.all_gather_object(parts, summary, group=finish_group)
        summary = parts[0]
        for other in parts[1:]:
            summary = summary.merge(other)
    summary.seconds = time.monotonic() - t0
    return summary
