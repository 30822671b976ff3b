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

import contextlib
import os
import stat
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vtn import __version__
from vtn.config import to_dict
from vtn.errors import UserError
from vtn.extract.backbone import Preprocess, compile_backbone, create_backbone
from vtn.extract.config import ExtractConfig, RuntimeConfig
from vtn.extract.inputs import VideoEntry, discover
from vtn.extract.sampling import SamplingConfig, check, effective
from vtn.extract.workers import DecodePool
from vtn.paths import check_cache_out
from vtn.progress import progress_bar


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


def resolve_device(spec: str) -> torch.device:
    """"auto" is cuda when available, else cpu; anything else must be a usable torch device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec!r}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available on this machine")
    return device


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


def autocast_context(device: torch.device, amp: str):
    """The autocast context for `--amp` ("none", "bf16", "fp16") on `device`."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


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
        self.sent = 0  # frames handed to the model
        self.done = 0  # frames whose features came back
        self.decoded = False  # the decoder sent its last chunk


def extract_features(entries: list[VideoEntry], model, preprocess, device: torch.device, cfg: ExtractConfig,
                     writer, progress=None) -> Summary:
    """Decode, preprocess, batch and run `entries` through `model`; store each video as soon as it is complete.

    Failed videos go to `writer.add_failure`; `progress(videos, frames, failures)` is called as videos finish.
    """
    rt = cfg.runtime
    summary = Summary()
    by_id = {e.id: e for e in entries}
    live: dict[str, _Video] = {}
    pending: list[tuple[str, torch.Tensor]] = []  # preprocessed frames waiting for a full batch
    pending_n = 0
    autocast = autocast_context(device, rt.amp)

    def drop(vid: str) -> None:
        nonlocal pending, pending_n
        live.pop(vid, None)
        pending = [(v, x) for v, x in pending if v != vid]
        pending_n = sum(len(x) for _, x in pending)

    def fail(vid: str, error: str, message: str) -> None:
        drop(vid)
        writer.add_failure(vid, error, message)
        summary.failures.append((vid, error, message))
        if progress:
            progress(0, 0, 1)

    def finish(vid: str) -> None:
        v = live.get(vid)
        if v is None or not v.decoded or v.done != v.sent:
            return
        del live[vid]
        feats = torch.cat(v.features).numpy()
        e = v.entry
        try:
            writer.add(vid, feats, np.concatenate(v.timestamps), np.concatenate(v.indices), label=e.label,
                       split=e.split, fps=v.info.fps, duration=v.info.duration, num_frames=v.info.num_frames)
        except UserError as err:  # e.g. features that overflow float16: record, do not crash the job
            fail(vid, type(err).__name__, str(err))
            return
        summary.videos += 1
        summary.frames += len(feats)
        if progress:
            progress(1, len(feats), 0)

    inflight = None  # the last batch launched: (its features, still on the device; whose frames they are)

    def collect() -> None:
        """Bring the last batch's features back and store the videos it completes."""
        nonlocal inflight
        if inflight is None:
            return
        out, take = inflight
        inflight = None
        out = out.float().cpu()  # [n, D]; waits for this batch only, the one launched after it keeps a GPU busy
        row = 0
        for v, k in take:  # a video that failed or restarted since is no longer in `live`: its rows go nowhere
            v.features.append(out[row: row + k])
            v.done += k
            row += k
        for v in dict.fromkeys(v for v, _ in take):
            if live.get(v.entry.id) is v:
                finish(v.entry.id)

    def run_batch() -> None:
        nonlocal pending, pending_n, inflight
        take, parts, n = [], [], 0
        while pending and n < rt.batch_size:
            vid, x = pending.pop(0)
            k = min(len(x), rt.batch_size - n)
            if k < len(x):
                pending.insert(0, (vid, x[k:]))
            take.append((live[vid], k))
            parts.append(x[:k])
            n += k
        pending_n -= n
        x = torch.cat(parts)  # [n, 3, h, w]
        if n < rt.batch_size:  # pad: the batch shape never changes (see the module docstring)
            x = torch.cat([x, x.new_zeros((rt.batch_size - n, *x.shape[1:]))])
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast:
            out = model(x)[:n]  # [n, D]; on a GPU this only queues the work
        collect()  # the batch before this one, while this one runs
        inflight = (out, take)

    jobs = [(e.id, str(e.path)) for e in entries]
    workers = decode_workers(rt, device)
    with DecodePool(jobs, cfg.sampling, workers=workers, timeout=rt.timeout, chunk_bytes=rt.chunk_mb << 20,
                    threads=rt.decode_threads, prefetch=max(4, 2 * workers)) as pool:
        for kind, vid, payload in pool:
            if kind == "info":
                live[vid] = _Video(by_id[vid], payload)
            elif kind == "chunk":
                v = live[vid]
                frames = torch.from_numpy(payload.frames)
                if device.type == "cuda":
                    frames = frames.pin_memory()
                with torch.inference_mode():
                    x = preprocess(frames.to(device, non_blocking=True))  # [n, 3, h, w]
                v.indices.append(payload.frame_indices)
                v.timestamps.append(payload.timestamps)
                v.sent += len(x)
                pending.append((vid, x))
                pending_n += len(x)
                while pending_n >= rt.batch_size:
                    run_batch()
            elif kind == "reset":  # decord gave up mid-video; PyAV starts it again from scratch
                drop(vid)
            elif kind == "done":
                live[vid].decoded = True
                finish(vid)
            else:
                fail(vid, *payload)
        while pending:
            run_batch()
        collect()
    return summary


def run(cfg: ExtractConfig, source: str | Path, out: str, overwrite: bool = False, rank: int = 0,
        world_size: int = 1, shard: tuple[int, int] | None = None) -> Summary:
    """Extract every video of `source` (folder or CSV) not yet in the cache at `out`; returns the summary.

    With `world_size` > 1, torch.distributed must be initialised by the caller; every rank calls this.
    The returned summary covers all ranks (on every rank). `shard = (k, n)` keeps only the k-th of n fixed
    shares of the videos (by a hash of the id, so a share never depends on which other files exist), for
    job arrays whose tasks run independently, each writing its own part of the same cache.
    """
    from vtn.store import CacheWriter, consolidate

    t0 = time.monotonic()
    check(cfg.sampling)
    if cfg.runtime.batch_size < 1:
        raise UserError(f"runtime.batch_size must be >= 1, got {cfg.runtime.batch_size}")
    if cfg.runtime.workers is not None and cfg.runtime.workers < 0:
        raise UserError(f"runtime.workers must be >= 0, got {cfg.runtime.workers}")
    device = resolve_device(cfg.runtime.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.runtime.threads or len(os.sched_getaffinity(0)))
    entries, class_names = discover(source)
    # Before the model is built: an --out that is the input, holds it, or is not a vtn cache is refused
    # (vtn/paths.py). The input is the folder, or the CSV and every video it lists. Rank 0 decides, so under
    # torchrun no rank reads a cache that rank 0 may be replacing, and every rank stops with one message.
    verdict = [None]
    if rank == 0:
        try:
            check_cache_out(out, inputs=[source, *(e.path for e in entries)], overwrite=overwrite)
        except UserError as e:
            verdict = [str(e)]
    if world_size > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise UserError(verdict[0])
    if shard is not None:
        k, n = shard
        if not 0 <= k < n:
            raise UserError(f"--shard {k}/{n}: K must lie in 0..N-1")
        entries = [e for e in entries if zlib.crc32(e.id.encode()) % n == k]
    b = cfg.backbone
    weights = None if b.weights in ("pretrained", "random") else b.weights
    model, data_config, identity = create_backbone(b.name, weights=weights, pretrained=b.weights == "pretrained",
                                                   image_size=b.image_size, seed=b.seed)
    preprocess = Preprocess(data_config).to(device)
    identity["preprocessing"] = preprocess.attrs
    model = model.to(device)
    if cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.runtime.compile:
        example = torch.zeros(cfg.runtime.batch_size, 3, *preprocess.size, device=device)
        if cfg.runtime.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        model = compile_backbone(model, example, autocast_context(device, cfg.runtime.amp))
    attrs = {
        "backbone": identity,
        "sampling": effective(cfg.sampling),
        "decoder": {"primary": "decord", "fallback": "pyav", "frames": "RGB uint8, container presentation order",
                    "timestamps": "seconds from the first frame, from container pts, rounded to 1 us"},
        "config": to_dict(cfg),
        "versions": library_versions(),
        "source": str(Path(source).resolve()),
    }
    writer_args = dict(feature_dim=identity["feature_dim"], dtype=cfg.runtime.feature_dtype,
                       class_names=class_names, attrs=attrs, identity=("backbone", "sampling"),
                       name=f"shard{shard[0]}of{shard[1]}-rank{rank}" if shard else f"rank{rank}", commit_every=cfg.runtime.commit_every)

    if world_size == 1:
        writer = CacheWriter(out, overwrite=overwrite, **writer_args)
    else:
        # Rank 0 creates (or checks) the cache first; the others join it only if that worked, so a refused
        # cache stops every rank with the same message instead of leaving them at a barrier.
        error = [None]
        if rank == 0:
            try:
                writer = CacheWriter(out, overwrite=overwrite, **writer_args)
            except UserError as e:
                error = [str(e)]
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise UserError(error[0])
        if rank != 0:
            writer = CacheWriter(out, create=False, **writer_args)
    done = writer.committed_ids()
    todo = [e for e in entries if e.id not in done]
    if world_size > 1:
        dist.barrier()  # every rank has read the same committed set before anyone writes
        mine = [todo[i] for i in range(rank, len(todo), world_size)]
        local = {e.id: expected_frames(e.path, cfg.sampling) for e in mine}
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, local)
        weights_by_id = {k: v for part in gathered for k, v in part.items()}
        share = partition([weights_by_id[e.id] for e in todo], world_size)[rank]
        todo = [todo[i] for i in share]

    bar = None
    if cfg.runtime.progress and rank == 0:
        bar = progress_bar(total=len(todo), unit="video",
                           desc="extract" if world_size == 1 else f"extract (rank 0 of {world_size})")
    counts = {"frames": 0, "failures": 0}

    def progress(videos: int, frames: int, failures: int) -> None:
        counts["frames"] += frames
        counts["failures"] += failures
        bar.update(videos + failures)
        elapsed = max(time.monotonic() - t0, 1e-9)
        bar.set_postfix_str(f"{bar.n / elapsed:.1f} videos/s, {counts['frames'] / elapsed:.0f} frames/s, "
                            f"{counts['failures']} failed", refresh=False)

    try:
        summary = extract_features(todo, model, preprocess, device, cfg, writer, progress if bar else None)
    finally:
        if bar is not None:
            bar.close()
        writer.close(consolidate=world_size == 1)
    summary.skipped = len(done & {e.id for e in entries})
    if world_size > 1:
        dist.barrier()  # every part is closed
        if rank == 0:
            consolidate(out)
        parts: list = [None] * world_size
        dist.all_gather_object(parts, summary)
        summary = parts[0]
        for other in parts[1:]:
            summary = summary.merge(other)
        dist.barrier()  # the index is written before any rank returns
    summary.seconds = time.monotonic() - t0
    return summary
