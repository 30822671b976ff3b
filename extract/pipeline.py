"""Stage one's pipeline, shared by the extraction job, fine-tuning and prediction: decode workers, batching
across videos, the backbone as the runtime asks.

`extract_features` overlaps decoding and compute: decode workers stream uint8 chunks; each chunk is moved to the
device and preprocessed there at once (so only model-sized frames wait), and frames from many videos are packed
into batches of `batch_size`. The last batch is padded to `batch_size` only where a fixed shape pays: a compiled
model (one shape, compiled once), and the extraction job, where it makes each frame's features independent of
which other frames share its batch, so a resumed or multi-process run gives bitwise the same cache on the CPU
(a CPU kernel may round differently at another batch size). Elsewhere (`vtn predict`, fine-tuning's
evaluation) the last batch holds only its frames: one short clip costs its own frames, not `batch_size` of them.
One batch stays in flight: its features come back after the next batch is launched, so on a GPU the host's work
(receiving, pinning and preprocessing the next frames) overlaps the model instead of alternating with it.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from vtn.errors import UserError
from vtn.extract.backbone import Intermediates, Preprocess, compile_backbone, create_backbone, pooled_dim
from vtn.extract.config import BackboneConfig, ExtractConfig, RuntimeConfig
from vtn.extract.decode import StreamInfo
from vtn.extract.inputs import InputEntry
from vtn.extract.sampling import check, sample
from vtn.extract.workers import DecodePool
from vtn.runtime import autocast, resolve_device, size_threads
from vtn.store.layout import DiskFull


def decode_workers(rt: RuntimeConfig, device: torch.device, local_world: int = 1) -> int:
    """`rt.workers`, or its default for a model on `device` (see RuntimeConfig); `local_world` is the number of
    processes torchrun started on this machine (runtime.Processes)."""
    if rt.workers is not None:
        return rt.workers
    if device.type == "cpu":
        return 2
    # Processes sharing this machine: one per GPU, or as many as torchrun started here (each may see one GPU).
    processes = max(1, torch.cuda.device_count(), local_world)
    return max(2, len(os.sched_getaffinity(0)) // processes - 1)


class _Video:
    """One video being decoded: what arrived from the decoder, held once for every backbone that runs on it."""

    def __init__(self, entry: InputEntry, info: StreamInfo, backbones):
        self.entry, self.info = entry, info
        self.indices: list[np.ndarray] = []
        self.timestamps: list[np.ndarray] = []
        self.decoded = False  # the decoder sent its last chunk
        self.parts = {k: _Assembly(self, k) for k in backbones}  # the backbones still to finish it


class _Assembly:
    """One video's features from backbone `k` being assembled: what came out of that model."""

    def __init__(self, video: _Video, k: int):
        self.video, self.k = video, k
        self.features: list[torch.Tensor] = []
        self.sent = 0  # rows handed to the model (frames x crops)
        self.done = 0  # rows whose features came back

    @property
    def complete(self) -> bool:
        return self.video.decoded and self.done == self.sent


class Batcher:
    """Packs preprocessed frames of many videos into batches of `batch_size` rows (the last one padded to that size
    when `pad`: see the module docstring) and keeps one batch in flight: a batch's features are fetched after the next batch
    is launched. `on_rows(owner, features)` receives each owner's rows in order as they come back."""

    def __init__(self, model, batch_size: int, channels_last: bool, amp, on_rows: Callable, pad: bool = True):
        self.model, self.batch_size, self.channels_last, self.amp = model, batch_size, channels_last, amp
        self.pad = pad
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
        if self.pad and n < self.batch_size:  # the batch shape never changes
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


def extract_features(entries: list[InputEntry], model, preprocess, device: torch.device, cfg: ExtractConfig,
                     store: Callable, fail: Callable[[str, str, str], None],
                     tick: Callable[[], None] = lambda: None, workers: int | None = None, pad: bool = False,
                     progress: Callable[[float, int], None] = lambda videos, frames: None) -> None:
    """Decode, preprocess, batch and run `entries` through `model`, calling `store(entry, info, features
    [rows, D], timestamps, frame_indices)` as soon as a video is complete (rows = frames x the preprocessing's
    crops) and `fail(id, error class, message)` for a video that cannot be used. `store` may raise a UserError
    (e.g. features that overflow float16): the video is then recorded as failed, the job goes on; a DiskFull
    stops the job. `tick()` is called between decoded chunks (under torchrun: raises when another rank failed).
    `workers`: decode processes (None: `decode_workers` for a single process on this machine). `pad`: pad the last
    batch to `batch_size` (see the module docstring; always when the model is compiled). `progress(videos, frames)`
    is called as frames are decoded, with the share of a video they are (its sampled frames are known from its
    first event) and their count, and once a video is done or failed with the rest of it: the videos add up to
    one each, so a progress bar moves from the first chunk, long before the first video is complete.
    """
    extract_many(entries, [(model, preprocess)], device, cfg, lambda k, *video: store(*video),
                 lambda vid, error, message, backbones: fail(vid, error, message), tick=tick, workers=workers,
                 pad=pad, progress=progress)


def extract_many(entries: list[InputEntry], backbones: list[tuple], device: torch.device, cfg: ExtractConfig,
                 store: Callable, fail: Callable, needs: Callable[[InputEntry], list[int]] | None = None,
                 tick: Callable[[], None] = lambda: None, workers: int | None = None, pad: bool = False,
                 progress: Callable[[float, int], None] = lambda videos, frames: None) -> None:
    """`extract_features` for several backbones from one decode pass: `backbones` is [(model, preprocess)], each
    video's uint8 frames are decoded once, moved to the device once, and each backbone preprocesses them its own
    way into its own batches. `needs(entry)`: the backbones (indices) to run on a video (default: all), so a
    resumed job runs a model only where its cache lacks the video. `store(k, entry, info, features, timestamps,
    frame_indices)` for backbone k; `fail(id, error class, message, ks)`: the video could not be used for the
    backbones `ks` (all it needed when decoding failed; one when its `store` raised a UserError). A video counts
    as done for `progress` once every backbone it needed has finished it (or it failed)."""
    rt = cfg.runtime
    by_id = {e.id: e for e in entries}
    live: dict[str, _Video] = {}
    counted: dict[str, float] = {}  # the share of each video reported to `progress`
    expected: dict[str, int] = {}  # each video's sampled frames

    def advance(vid: str, share: float, frames: int = 0) -> None:
        share = min(share, 1.0 - counted.get(vid, 0.0))  # a video restarted by another decoder counts once
        counted[vid] = counted.get(vid, 0.0) + share
        progress(share, frames)

    def finish(a: _Assembly) -> None:
        v = a.video
        if live.get(v.entry.id) is not v or v.parts.get(a.k) is not a or not a.complete:
            return
        del v.parts[a.k]
        try:
            store(a.k, v.entry, v.info, torch.cat(a.features).numpy(), np.concatenate(v.timestamps),
                  np.concatenate(v.indices))
        except DiskFull:  # not this video's fault: the job stops, with what it committed kept
            raise
        except UserError as err:
            fail(v.entry.id, type(err).__name__, str(err), [a.k])
        if not v.parts:
            del live[v.entry.id]
            advance(v.entry.id, 1.0)

    def on_rows(a: _Assembly, rows: torch.Tensor) -> None:
        a.features.append(rows)
        a.done += len(rows)
        finish(a)  # a video that failed or restarted since is no longer live: its rows go nowhere

    amp = autocast(device, rt.amp)
    batchers = [Batcher(model, rt.batch_size, rt.channels_last, amp, on_rows, pad or rt.compile) for model, _ in backbones]
    wanted = {e.id: list(range(len(backbones))) if needs is None else needs(e) for e in entries}
    jobs = [(e.id, str(e.path)) for e in entries]
    workers = decode_workers(rt, device) if workers is None else workers
    with DecodePool(jobs, cfg.sampling, workers=workers, timeout=rt.timeout, chunk_bytes=rt.chunk_mb << 20,
                    threads=rt.decode_threads, prefetch=max(4, 2 * workers)) as pool:
        for kind, vid, payload in pool:
            tick()
            if kind == "info":
                live[vid] = _Video(by_id[vid], payload, wanted[vid])
                expected[vid] = max(1, len(sample(payload.timestamps, cfg.sampling)))
            elif kind == "chunk":
                v = live[vid]
                advance(vid, len(payload.frames) / expected[vid], len(payload.frames))
                frames = torch.from_numpy(payload.frames)
                if device.type == "cuda":
                    frames = frames.pin_memory()
                frames = frames.to(device, non_blocking=True)  # once, whatever the number of backbones
                v.indices.append(payload.frame_indices)
                v.timestamps.append(payload.timestamps)
                for k, a in v.parts.items():
                    with torch.inference_mode():
                        x = backbones[k][1](frames)  # [n * crops, 3, h, w]
                    a.sent += len(x)
                    batchers[k].add(a, x)
            elif kind in ("reset", "fail"):  # reset: decord gave up mid-video and PyAV starts it again
                if vid in live:
                    for k, a in live.pop(vid).parts.items():
                        batchers[k].drop(a)
                if kind == "fail":
                    fail(vid, *payload, wanted[vid])
                    advance(vid, 1.0)
            elif kind == "done":
                v = live[vid]
                v.decoded = True
                for a in list(v.parts.values()):
                    finish(a)
                if not v.parts and live.get(vid) is v:  # no backbone needed it
                    del live[vid]
                    advance(vid, 1.0)
        for batcher in batchers:
            batcher.flush()


def build_backbone(b: BackboneConfig, rt: RuntimeConfig, device: torch.device, crops: int = 1):
    """The backbone on `device` as the runtime asks (channels_last, compiled), its preprocessing (`crops` per
    frame) and its identity (with the preprocessing) for the cache's attributes. Shared with `vtn predict`."""
    weights = None if b.weights in ("pretrained", "random") else b.weights
    model, data_config, identity = create_backbone(b.name, weights=weights, pretrained=b.weights == "pretrained",
                                                   image_size=b.image_size, seed=b.seed)
    preprocess = Preprocess(data_config, crops).to(device)
    if b.layers:  # the chosen blocks' pooled outputs, concatenated; they make a cache of another identity
        model = Intermediates(model, b.layers, preprocess.size)
        identity.update(layers=list(b.layers), feature_dim=pooled_dim(model))
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


def check_runtime(cfg: ExtractConfig, local_world: int = 1) -> torch.device:
    """Refuse settings that cannot work; the device, with this process's torch threads sized (once, at the top of
    the job: the extraction job, `vtn predict`). Beside a CPU model the decode workers block once they are ahead
    (decoding is many times faster than the model: README, Benchmarks), so the model keeps every core; beside a
    GPU decoding sets the pace, so this process takes only the cores its decode workers leave."""
    check(cfg.sampling)  # the runtime's ranges are checked when the config is built (extract/config.py)
    device = resolve_device(cfg.runtime.device)
    size_model_threads(cfg.runtime, device, local_world)
    return device


def size_model_threads(rt: RuntimeConfig, device: torch.device, local_world: int = 1) -> int:
    """The torch threads of a process running a model beside decode workers (extraction, `vtn finetune`): see
    check_runtime."""
    return size_threads(0 if device.type == "cpu" else decode_workers(rt, device, local_world), rt.threads)
