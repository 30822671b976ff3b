"""`vtn finetune RUN --out RUN2 [--videos INPUT]`: backbone + encoder + head trained end to end from raw video.

It starts from a stage-two run's best/ checkpoint: the encoder and head (with their feature normalisation) from
it, the backbone rebuilt from the identity recorded with it (timm name, weights checked by sha256, the same
preprocessing; a mismatch is refused naming both hashes), composed as one `VideoVTN` (temporal/e2e.py). The
videos are INPUT, by default the folder or CSV the cache was extracted from (recorded in the cache).

Training clips are the ones stage two draws from the cache (splits.py's `load_data`: the same split, held-out
share and length buckets); only their frames are decoded, in stage one's decode workers (`ClipFrames`), and must
be the cache's frames, else the video is not the one the cache was made from. A video that fails is recorded
once (`Failures`) and left out of its batch (the batch's loss keeps its weight: nothing is put in its place).
Evaluation runs whole val videos (one frame in view_stride, up to max_positions spread over each, as in stage
two) through stage one's pipeline (`extract_features`) and the same model.

The steps, schedule, metrics.jsonl, best/ and last/ checkpoints and exact --resume are loop.py's pieces, so a
run resumed after an interruption ends with the weights of an uninterrupted one (on the CPU); the backbone's and
the encoder's gradients are clipped each on its own.

The settings that depend on what the backbone already knows (its learning rate, BatchNorm) default to None and are
chosen from its provenance as the cache recorded it (`provenance_defaults`), said in the run's first line. After the
first step the run says how long it will take (`Clock`), and at the end where the time went.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vtn.config import job_config, ranged, resolve, to_dict
from vtn.errors import UserError
from vtn.paths import canonical_cache, check_run_dir
from vtn.plots import curves_png
from vtn.extract.config import ExtractConfig, RuntimeConfig
from vtn.extract.inputs import discover
from vtn.extract.pipeline import decode_workers, extract_features, size_model_threads
from vtn.extract.workers import DecodePool
from vtn.runtime import Processes, autocast, on_rank0, peak_memory, setup_processes
from vtn.store import collate_clips, open_cache
from vtn.temporal import checkpoint
from vtn.temporal.data import check_inputs, model_inputs, whole_video_sampling
from vtn.temporal.e2e import VideoVTN, rebuild_backbone, sampling_of
from vtn.temporal.model import VTN, frame_positions
from vtn.temporal.loop import (Loop, clip_loss, diverged_warning, epoch_shares, eval_interval, gathered_metrics,
                               new_loop, run_config, run_epochs, schedule_text, start_run_dir)
from vtn.temporal.settings import FLAGS, DataSection, OptimSection, RunSection, TrainConfig
from vtn.temporal.splits import Data, load_data


@dataclass(frozen=True)
class FinetuneSection:
    # The backbone's learning rate as a multiple of optim.lr. None: by the backbone's provenance, recorded with the
    # cache (`provenance_defaults`): 10 for a random-init backbone (it learns from scratch, at a from-scratch rate:
    # at the encoder's fine-tuning rate its BatchNorm gammas, which timm's ResNets start at 0, barely move), 0.1 for
    # trained weights (timm's or a file: adapted, not relearned).
    backbone_lr: float | None = ranged(None, ge=0)
    # The encoder's and head's learning rate as a multiple of optim.lr. None: by provenance: 10 with a random-init
    # backbone (stage two fitted them to features that carry nothing the fine-tuning will keep: they are relearnt
    # with the backbone, at stage two's from-scratch rate; at 1x the head's logits grow too slowly to be confident
    # in a short run), 1 with trained weights (the encoder fits their features already: it is adapted).
    encoder_lr: float | None = ranged(None, ge=0)
    # Layer-wise decay: a backbone layer n layers below the last (timm's group_matcher: ViT blocks, ResNet stages)
    # learns at backbone_lr x layer_decay^n (BEiT/MAE fine-tuning takes 0.65-0.75). 1: one rate for the backbone.
    layer_decay: float = ranged(1.0, gt=0, le=1)
    frozen_steps: int = ranged(0, ge=0)  # the first steps train only the encoder and head (no backbone gradient)
    # BatchNorm keeps its running statistics (eval mode). None: by provenance: kept for trained weights (a step's
    # frames are a few clips of similar images, poor batch statistics); batch statistics for a random-init backbone,
    # whose running statistics are the init's (mean 0, var 1) and whose ResNet blocks start with their last
    # BatchNorm at gamma 0 (timm's zero_init_last): frozen, they stay nearly off. When BatchNorm trains, each
    # micro-batch mixes the frames of many clips (VideoVTN.frame_features), so chunking does not change what it sees.
    freeze_bn: bool | None = None
    # The encoder's input normalisation follows the features as the backbone changes them: a running estimate of
    # their mean and std (std floored as temporal/data.py's `normalising_scale`), updated from each step's fresh
    # features with this momentum, as BatchNorm's. 0: stage two's statistics stay fixed.
    feature_momentum: float = ranged(0.1, ge=0, le=1)
    # Feature memory bank (TALLFormer): only this many contiguous frames of each clip (at a random place) are
    # decoded and run through the backbone with gradients; the clip's other frames take their features from this
    # process's in-memory copy of the train split's cached features (the cache itself is never written), into which
    # the fresh features are written back. None: every frame of the clip is fresh.
    bank_frames: int | None = ranged(None, ge=1)
    # Memory controls (temporal/e2e.py), exact (plain training's loss and gradients with BatchNorm frozen). The
    # defaults suit any clip length and batch size: a step's frames go through the backbone `micro_batch` at a time
    # (None: MICRO_BATCH on a GPU, where memory binds; on a CPU all in one call, see `micro_batch_for`), and exact
    # chunked backprop (each micro-batch's activations dropped after its forward and recomputed in the backward
    # pass) is on whenever a step has more frames than one micro-batch (chunked null: that rule; true/false:
    # always/never). So the backbone holds one micro-batch's activations, not the step's, for one more backbone
    # forward per step (`vtn bench finetune` measures both; README, Benchmarks). timm's activation checkpointing
    # (backbone, and each encoder layer) is off: alone it saves less, and inside chunked micro-batches it would
    # cost a third forward.
    micro_batch: int | None = ranged(None, ge=1)
    grad_checkpointing: bool = False
    chunked: bool | None = None
    # Augmentation of the training clips' decoded uint8 frames (never of evaluation's), before preprocessing: a
    # random resized crop taking a share in augment_scale of the frame's area at the frame's own aspect ratio times
    # [3/4, 4/3] (drawn as torchvision's RandomResizedCrop draws; Preprocess then resizes it and centre-crops it as
    # it does every frame), and with augment_flip a horizontal flip half the time. The share is at least 0.8 by
    # default: a crop of half the frame removes whole objects (the label) from many clips. The aspect ratio follows
    # the frame's, so a wide frame's crop is not made square here and then cut again by the centre crop. One draw
    # per clip, the same for all its frames, so motion stays coherent (timm's transforms draw per image); drawn
    # from (seed, epoch, item), so a resumed run sees the same crops. The flip is off by default: it turns "left to
    # right" into "right to left", another class in the generated videos (and in Something-Something). With a
    # memory bank only the fresh frames are augmented (the stored features are not).
    augment: bool = True
    augment_scale: tuple[float, float] = ranged((0.8, 1.0), gt=0, le=1)
    augment_flip: bool = False
    workers: int | None = ranged(None, ge=0)  # decode processes (None: stage one's rule); 0: a thread of this process
    timeout: float = ranged(120.0, gt=0)  # seconds a decode may go without producing a frame
    eval_frames: int = ranged(64, ge=1)  # frames per backbone call in evaluation


@dataclass(frozen=True)
class FinetuneConfig:
    """data, optim and run mean what they mean in `vtn train` (data defaults to the stage-two run's)."""

    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-4, batch_size=8, epochs=5, warmup=0.1))
    run: RunSection = field(default_factory=RunSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)


def default_config(stage_two: Path) -> FinetuneConfig:
    """The defaults for a run started from `stage_two`: its data settings (clip length, stride, splits) and seed."""
    path = stage_two / "config.yaml"
    if not path.is_file():
        return FinetuneConfig()
    saved = resolve(TrainConfig, path)
    return FinetuneConfig(data=saved.data, run=replace(RunSection(), seed=saved.run.seed))


MICRO_BATCH = 8  # frames per backbone call on a GPU by default


def micro_batch_for(ft: FinetuneSection, device: torch.device) -> int | None:
    """finetune.micro_batch, or by default MICRO_BATCH frames per backbone call on a GPU and every frame of a step
    in one call on a CPU: memory rarely binds there, and there small calls plus chunked backprop's recompute took
    the step to over 2x the backbone's own forward and backward (`vtn bench finetune`)."""
    return ft.micro_batch or (None if device.type == "cpu" else MICRO_BATCH)


TRAINED = {"timm-pretrained": "pretrained (timm's weights)", "file": "trained (weights from a file)"}


def provenance_defaults(ft: FinetuneSection, identity: dict | None) -> tuple[FinetuneSection, str]:
    """`ft` with its provenance-dependent settings left at None chosen by the backbone's recorded `identity`
    (its "weights": random-init, timm-pretrained or file), and a line saying what was chosen and why."""
    weights = (identity or {}).get("weights")
    random = weights == "random-init"
    chosen = {k: v for k, v in (("backbone_lr", 10.0 if random else 0.1), ("encoder_lr", 10.0 if random else 1.0),
                                ("freeze_bn", not random)) if getattr(ft, k) is None}
    ft = replace(ft, **chosen)
    why = {"backbone_lr": "the backbone learns from scratch, at a from-scratch rate" if random else
           "trained weights are adapted, not relearned",
           "encoder_lr": "the encoder and head are relearnt with the features, at stage two's rate" if random else
           "the encoder already fits these features",
           "freeze_bn": "BatchNorm on batch statistics: its running ones are the init's; micro-batches mix the "
           "frames of many clips" if random else "BatchNorm keeps its trained statistics: a step's frames are a "
           "few clips of similar images"}
    told = "; ".join(f"finetune.{k}={str(v).lower()} ({why[k]})" for k, v in chosen.items())
    what = "random-init" if random else TRAINED.get(weights, f"of unknown provenance ({weights}), taken as trained")
    return ft, (f"the backbone is {what}, as the cache records: " + told + " (each can be set with --set)"
                if chosen else f"the backbone is {what}; finetune.backbone_lr, encoder_lr and freeze_bn as given")


class Failures:
    """RUN2/failures.jsonl: every video that could not be used, once (id, error class, message, phase). Under DDP
    each process records what it met itself, and `sync` tells every process what the others met, so a video that
    failed is decoded by one process, once, and recorded once."""

    def __init__(self, run: Path, procs: Processes):
        self.path, self.procs = run / "failures.jsonl", procs
        if procs.rank == 0:
            self.path.touch()  # empty when nothing failed
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.ids = {json.loads(x)["id"] for x in lines}
        self.new: list[str] = []  # recorded here since the last sync

    def record(self, vid: str, error: str, message: str, phase: str) -> None:
        if vid in self.ids:
            return
        self.ids.add(vid)
        self.new.append(vid)
        # Each process appends its own lines (one write each, so lines never interleave).
        with open(self.path, "a") as f:
            f.write(json.dumps({"id": vid, "error": error, "message": message, "phase": phase}) + "\n")
        print(f"vtn finetune: {vid} failed ({error}: {message}); left out", flush=True)

    def sync(self) -> None:
        """Every process learns the failures the others recorded since the last sync (a collective: every
        process calls it at the same point)."""
        if self.procs.world > 1:
            parts: list = [None] * self.procs.world
            torch.distributed.all_gather_object(parts, self.new)
            self.ids.update(v for part in parts for v in part)
        self.new = []


def augment_clip(frames: np.ndarray, rng: np.random.Generator, scale: tuple[float, float] = (0.8, 1.0),
                 flip: bool = False) -> np.ndarray:
    """A clip's frames [t, H, W, 3] uint8 -> one random crop [t, h, w, 3] for all of them (area share in `scale`,
    aspect ratio W/H times a log-uniform factor in [3/4, 4/3], up to 10 draws as torchvision's RandomResizedCrop,
    else the whole frame), with `flip` mirrored left-right half the time. No resize here: Preprocess resizes every
    clip."""
    H, W = frames.shape[1:3]
    y, x, h, w = 0, 0, H, W
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        ratio = W / H * math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= W and 0 < ch <= H:
            y, x, h, w = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1)), ch, cw
            break
    out = frames[:, y:y + h, x:x + w]  # [t, h, w, 3]
    if flip and rng.random() < 0.5:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


class ClipFrames:
    """The decoded frames of an epoch's batches of training clips, in order: a batch is collate_clips' batch of
    the clips' cached items (positions, times, labels) plus "frames", one uint8 [t, H, W, 3] tensor per clip.
    Every clip of the epoch is queued in the decode workers at once; the workers stop when the pool's queue is
    full, so at most that many chunks wait while the model trains."""

    def __init__(self, dataset, batches: list[list[int]], epoch: int, paths: dict, sampling, rt: RuntimeConfig,
                 failures: Failures, bank_frames: int | None = None, augment: FinetuneSection | None = None):
        self.dataset, self.batches, self.epoch, self.paths = dataset, batches, epoch, paths
        self.sampling, self.rt, self.workers, self.failures = sampling, rt, rt.workers, failures
        self.bank_frames, self.augment = bank_frames, augment  # augment: its augment_* settings, None: none

    def __len__(self) -> int:
        return len(self.batches)

    def _rows(self, i: int) -> tuple[np.ndarray, slice]:
        """The rows of item i's clip among its video's sampled frames (the very clip ClipDataset draws, see
        store/dataset.py), and which of the clip's frames are fresh (all, or `bank_frames` contiguous ones)."""
        ds = self.dataset
        rows = ds.pick(i)
        k = self.bank_frames
        if k is None or k >= len(rows):
            return rows, slice(0, len(rows))
        start = int(ds.rng(i, 1).integers(0, len(rows) - k + 1))
        return rows, slice(start, start + k)

    def __iter__(self):
        ds = self.dataset
        ds.set_epoch(self.epoch)
        fresh = {i: self._rows(i) for b in self.batches for i in b}
        jobs = [(ds.ids[i], str(self.paths[ds.ids[i]]),
                 replace(self.sampling, view_rows=tuple(fresh[i][0][fresh[i][1]].tolist())))
                for b in self.batches for i in b if ds.ids[i] not in self.failures.ids]
        videos: dict[str, dict] = {}
        with DecodePool(jobs, self.sampling, workers=self.workers, timeout=self.rt.timeout,
                        chunk_bytes=self.rt.chunk_mb << 20, prefetch=max(8, 2 * self.workers)) as pool:
            events = iter(pool)
            for batch in self.batches:
                wanted = [i for i in batch if ds.ids[i] not in self.failures.ids]
                while any(ds.ids[i] not in self.failures.ids and not videos.get(ds.ids[i], {}).get("done")
                          for i in wanted):
                    kind, vid, payload = next(events)
                    self._event(videos, kind, vid, payload)
                items = []
                for i in wanted:
                    v = videos.pop(ds.ids[i], None)
                    if v is None or ds.ids[i] in self.failures.ids:
                        continue
                    item, (rows, part) = ds[i], fresh[i]
                    decoded = np.concatenate(v["indices"]) if v["indices"] else np.zeros(0, np.int64)
                    expected = item["positions"].numpy()[part]
                    if not np.array_equal(decoded, expected):
                        self.failures.record(ds.ids[i], "VideoChanged", f"{self.paths[ds.ids[i]]}: the decoded frames "
                                             f"{decoded.tolist()} are not the cache's {expected.tolist()}; is it the "
                                             "video the cache was extracted from?", "train")
                        continue
                    # With a bank: where the fresh frames' features live in the in-memory split, for the write-back.
                    at = ds.source.video_rows(int(ds.rows[i])).start + rows[part] if self.bank_frames else None
                    frames = np.concatenate(v["frames"])  # [t, H, W, 3] uint8
                    size = frames.shape[1:3]  # the video's, before the crop
                    if self.augment is not None:
                        frames = augment_clip(frames, ds.rng(i, 2),
                                              self.augment.augment_scale, self.augment.augment_flip)
                    items.append({**item, "frames": torch.from_numpy(frames), "part": part, "bank_rows": at,
                                  "size": size})
                if not items:
                    yield {"labels": torch.zeros(0, dtype=torch.long), "frames": []}
                    continue
                out = collate_clips(items)
                out["frames"] = [x["frames"] for x in items]
                out["fresh"] = torch.zeros_like(out["mask"])  # [B, T]: the frames decoded now
                for j, x in enumerate(items):
                    out["fresh"][j, x["part"]] = True
                out["bank_rows"] = [x["bank_rows"] for x in items]
                out["sizes"] = [x["size"] for x in items]  # [(H, W)] of each clip's video frames
                yield out

    def _event(self, videos: dict, kind: str, vid: str, payload) -> None:
        if kind in ("info", "reset"):  # reset: decord gave up mid-video and PyAV starts it again
            videos[vid] = {"frames": [], "indices": [], "done": False}
        elif kind == "chunk":
            videos[vid]["frames"].append(payload.frames)
            videos[vid]["indices"].append(payload.frame_indices)
        elif kind == "done":
            videos[vid]["done"] = True
        elif kind == "fail":
            videos.pop(vid, None)
            self.failures.record(vid, *payload, "train")


def memory_postfix(device: torch.device) -> dict:
    """The peak memory for the progress bar: what fine-tuning runs out of first, so it is in view while it runs."""
    return {"peak": f"{peak_memory(device) / 2**20:.0f}MiB"}


def backbone_groups(backbone: torch.nn.Module, lr: float, layer_decay: float) -> list[tuple[list, float]]:
    """(parameters, base lr) groups of the backbone: `lr` for all, or with `layer_decay` < 1 lr x
    layer_decay^(layers above), layers as timm's group_matcher numbers them (the last layer and the final norm
    get `lr`)."""
    params = dict(backbone.named_parameters())
    if layer_decay >= 1.0:
        return [(list(params.values()), lr)]
    if not hasattr(backbone, "group_matcher"):
        raise UserError(f"finetune.layer_decay needs a timm backbone with group_matcher; {type(backbone).__name__} "
                        "has none (set finetune.layer_decay=1)")
    from timm.models import group_parameters

    layer_of = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)  # name -> layer
    top = max(layer_of.values())
    return [([p for n, p in params.items() if layer_of[n] == i], lr * layer_decay ** (top - i))
            for i in sorted(set(layer_of.values()))]


def clip_tensor(model: VideoVTN, frames: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Each clip's uint8 frames preprocessed on `device` (clips may differ in size), padded to [B, T, 3, h, w]."""
    with torch.no_grad():
        xs = [model.preprocess(f.to(device)) for f in frames]  # each [t, 3, h, w]
    out = xs[0].new_zeros(len(xs), max(len(x) for x in xs), *xs[0].shape[1:])  # [B, T, 3, h, w]
    for j, x in enumerate(xs):
        out[j, :len(x)] = x
    return out


def evaluate_videos(model: VideoVTN, dataset, paths: dict, cfg: ExtractConfig, device: torch.device,
                    procs: Processes, failures: Failures) -> dict:
    """Metrics of the composed model over whole val videos (this process's share, gathered): frames through the
    backbone in stage one's pipeline, then the model's encoder and head."""
    from vtn.extract.inputs import InputEntry

    label = dict(zip(dataset.ids, dataset.labels.tolist()))
    mine = [InputEntry(v, Path(paths[v]), label[v], "val") for v in dataset.ids[procs.rank::procs.world]
            if v not in failures.ids]
    logits, labels = [], []

    def store(entry, info, features, timestamps, indices) -> None:
        item = {"features": torch.from_numpy(features), "positions": torch.from_numpy(indices),
                "times": torch.from_numpy(timestamps).float(), "label": entry.label, "id": entry.id}
        with torch.no_grad(), autocast(device, cfg.runtime.amp):
            out = VTN.forward(model, *model_inputs(collate_clips([item]), model.config, device))
        logits.append(out.float().cpu().numpy()[0])
        labels.append(entry.label)

    was_training = model.training
    model.eval()
    try:
        extract_features(mine, model.backbone, model.preprocess, device, cfg, store,
                         lambda vid, error, message: failures.record(vid, error, message, "val"))
    finally:
        model.train(was_training)
    classes = model.config.num_classes
    return gathered_metrics(np.array(logits, np.float32).reshape(-1, classes), np.array(labels, np.int64), procs)


def video_paths(cache, videos: str | None) -> tuple[dict[str, Path], str]:
    """Where each of the cache's videos is, and the folder or manifest that says so. Video ids are paths relative
    to the root recorded with the cache (for a manifest made with --root, not the manifest's folder), so by default
    they are looked up there; `videos` (--videos) is a folder they are relative to, or a manifest listing them."""
    where = videos or cache.attrs.get("root") or cache.attrs.get("source")  # "root": caches of this vtn
    made_from = cache.attrs.get("source") or where
    if not where or not Path(where).exists():
        raise UserError(f"{where if videos else cache.url}: " + (
            "no such folder or manifest (--videos)" if videos else
            f"the cache was extracted from {made_from}, which is not there") +
            "; give the videos' folder (or a manifest of them) with --videos")
    if Path(where).is_file():
        return {e.id: Path(e.path) for e in discover(where)[0]}, where
    return {vid: Path(where) / vid for vid in cache.ids}, where


@dataclass
class Tuning:
    """A fine-tuning run set up to train: its loop, composed model, data, config and what its clips and
    evaluations are read with."""

    loop: Loop  # its model: the composed VideoVTN
    data: Data
    cfg: FinetuneConfig
    paths: dict
    failures: Failures
    sampling: object  # the cache's frame sampling (stage one's SamplingConfig)
    eval_cfg: ExtractConfig  # its runtime: the decode workers' count, what ClipFrames decodes with


def open_stage_two(best: Path, cache_url: str | None, videos: str | None) -> tuple[dict, object, dict, str]:
    """(inputs.json of the stage-two checkpoint `best`, its cache, where each video is, the folder or manifest
    that says so)."""
    inputs = checkpoint.read_inputs(best)
    if not inputs or not inputs.get("cache"):
        raise UserError(f"{best}: the checkpoint does not record the cache it was trained on; fine-tuning needs a "
                        "stage-two run of this vtn")
    try:
        cache = open_cache(cache_url or inputs["cache"])
    except UserError as e:
        if cache_url:
            raise
        raise UserError(f"{e}; {best} was trained on it: if it moved, give its new place with --cache") from None
    check_inputs(inputs, cache, best)
    paths, source = video_paths(cache, videos)
    return inputs, cache, paths, source


def check_videos(data: Data, cache, paths: dict, source: str, cfg: FinetuneConfig) -> set[str]:
    """The run's videos that are not there (each split must keep some); refuses settings its data cannot take."""
    ft = cfg.finetune
    missing = {v for v in [*data.train.ids, *data.val.ids] if v not in paths or not paths[v].is_file()}
    for what, ids in (("train", data.train.ids), ("val", data.val.ids)):
        if all(v in missing for v in ids):  # nothing to train or score: refused before anything is written
            made_from = cache.attrs.get("source")
            raise UserError(f"{source}: none of the {len(ids)} {what} videos of {cache.url} is there (e.g. "
                            f"{paths.get(ids[0], ids[0])})" + (f"; the cache was made from {made_from}" if made_from
                                                              else "") + ": give the videos with --videos")
    if ft.bank_frames is not None and data.streaming:
        raise UserError(f"finetune.bank_frames={ft.bank_frames}: needs the train split in memory "
                        f"(data.load is {cfg.data.load}; the split was {'streamed' if data.streaming else 'loaded'})")
    lo, hi = ft.augment_scale
    if lo > hi:  # each in (0, 1] by its range
        raise UserError(f"finetune.augment_scale={list(ft.augment_scale)}: needs low <= high (shares of the "
                        "frame's area)")
    return missing


def start_finetune(run: Path, best: Path, videos: str | None, cfg: FinetuneConfig | None, resume: bool,
                   procs: Processes, device: torch.device, cache_url: str | None) -> Tuning:
    """Everything before the first step: the stage-two run's cache and videos, the config (the saved one when
    resuming), the composed model, data, schedule, optimiser, state, the run directory and its failures."""
    inputs, cache, paths, source = open_stage_two(best, cache_url, videos)
    cfg, last = run_config(run, FinetuneConfig, cfg, resume, lambda: default_config(best.parent), procs)
    # config.yaml keeps None ("by provenance"), so a resumed run chooses the same from the same cache.
    ft, chose = provenance_defaults(cfg.finetune, inputs.get("backbone"))
    if procs.rank == 0:
        print(f"vtn finetune: {chose}", flush=True)

    # The backbone first: timm's random init seeds the global RNG, which the run then reseeds.
    backbone, preprocess, bc, identity = rebuild_backbone(inputs, best, device)
    vtn = VTN.from_pretrained(best)
    video = {"backbone": identity, "backbone_config": to_dict(bc), "sampling": inputs["sampling"],
             "finetuned_from": str(best)}
    model = VideoVTN.compose(vtn, backbone, preprocess, video)
    model.set_memory(micro_batch_for(ft, device), ft.chunked, ft.grad_checkpointing)
    model.freeze_bn, model.feature_momentum = ft.freeze_bn, ft.feature_momentum
    data = load_data(cache, cfg, vtn.config, procs)
    missing = check_videos(data, cache, paths, source, cfg)

    temporal = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [*backbone_groups(model.backbone, cfg.optim.lr * ft.backbone_lr, ft.layer_decay),
              (temporal, cfg.optim.lr * ft.encoder_lr)]
    ckpt_inputs = {**inputs, "cache": canonical_cache(cache.url), "finetuned_from": str(best)}  # where it is now
    # A frozen warm-up leaves the backbone without gradients for a while, which DDP must be told.
    # Clipped apart: the backbone's gradient norm (large, many parameters) must not shrink the encoder's.
    loop, why = new_loop(run, cfg, model, groups, data, cache, ckpt_inputs, last, procs, device,
                         clip_groups=[list(model.backbone.parameters()), temporal],
                         find_unused_parameters=ft.frozen_steps > 0)

    # Before any process records a failure there; an error in it stops every process with its message.
    on_rank0(lambda: start_run_dir(run, cfg, loop.state["step"]), procs.rank, procs.world)
    failures = Failures(run, procs)
    for v in sorted(missing) if procs.rank == 0 else []:  # every process knows them; one records them
        failures.record(v, "NotAVideo", f"{v} is in {cache.url} but not in {source}", "train")
    if procs.rank == 0:
        n_backbone = sum(p.numel() for p in model.backbone.parameters())
        print(f"vtn finetune: {bc.name} ({n_backbone / 1e6:.2f} M) + VTN ({sum(p.numel() for p in temporal) / 1e6:.2f}"
              f" M) from {best}; {len(data.train)} train and {len(data.val)} val videos from {source} on {device}"
              + schedule_text(loop, cfg.optim.batch_size, why, last is not None), flush=True)

    sampling = sampling_of(inputs)
    rt = RuntimeConfig(device=str(device), batch_size=ft.eval_frames, amp=cfg.run.amp, workers=ft.workers,
                       timeout=ft.timeout, progress=False, threads=cfg.run.threads)
    rt = replace(rt, workers=decode_workers(rt, device, procs.local_world))
    size_model_threads(rt, device, procs.local_world)  # extraction's rule: the decode workers beside the model
    eval_cfg = ExtractConfig(whole_video_sampling(sampling, vtn.config), bc, rt)
    return Tuning(loop, data, replace(cfg, finetune=ft), paths, failures, sampling, eval_cfg)


# On a CPU a run expected to take longer than this is told the settings that shorten it.
LONG_RUN = 600.0
CPU_RECIPE = ("--frames 4 (frames per clip), --batch-size 8 (clips per step), --set finetune.bank_frames=2 (only 2 "
              "frames of each clip through the backbone, the others' features from the cache), a smaller --set "
              "finetune.eval_frames; README, Fine-tuning on a CPU")


class Clock:
    """Where a run's time goes: waiting for the data (decoding, the transfer from the decode workers, crops,
    collation), the steps (forward, backward, clipping, optimiser: from a batch's arrival to the request for the
    next), the evaluations, and the rest (checkpoints, metrics); after the first step, the expected time per step
    and for the run."""

    def __init__(self, loop: Loop):
        self.loop, self.data, self.evaluation, self.steps, self.n, self.first = loop, 0.0, 0.0, 0.0, 0, None
        self.start = time.perf_counter()

    def timed(self, batches):
        """`batches` with the time spent waiting for each counted as data, and the time until the next is asked
        for as the step's."""
        it = iter(batches)
        while True:
            tick = time.perf_counter()
            batch = next(it, None)
            self.data += time.perf_counter() - tick
            if batch is None:
                return
            tick = time.perf_counter()
            yield batch
            self.steps, self.n = self.steps + time.perf_counter() - tick, self.n + 1

    def evaluate(self, fn):
        tick = time.perf_counter()
        try:
            return fn()
        finally:
            self.evaluation += time.perf_counter() - tick

    def step(self, evaluations: int) -> None:
        """At each step's start: after the first, print the expected time per step and for the run."""
        state, now = self.loop.state, time.perf_counter()
        if self.first is None:
            self.first = (now, self.data, state["step"])
            return
        start, data, step = self.first
        if step is None or state["step"] != step + 1 or self.loop.procs.rank != 0:
            return
        self.first = (start, data, None)
        seconds, left = now - start, state["total_steps"] - step
        long = self.loop.device.type == "cpu" and seconds * left > LONG_RUN
        print(f"vtn finetune: the first step took {seconds:.1f} s ({self.data - data:.1f} s of it waiting for clips): "
              f"about {seconds * left / 60:.1f} min for the {left} steps, plus {evaluations} "
              f"evaluation{'s' * (evaluations != 1)}"
              + (f". On a CPU, shorter: {CPU_RECIPE}" if long else ""), flush=True)

    def summary(self) -> str:
        total = time.perf_counter() - self.start
        rest = total - self.data - self.evaluation - self.steps
        return (f"{total:.0f} s here: {self.steps:.0f} s in {self.n} steps ({self.steps / max(self.n, 1):.2f} s each), "
                f"{self.data:.0f} s waiting for clips, {self.evaluation:.0f} s evaluating, {rest:.0f} s checkpoints "
                "and the rest")


def frame_note(size: tuple[int, int], preprocess) -> str | None:
    """What the backbone's preprocessing cuts from non-square video frames of `size` (H, W), or None."""
    H, W = size
    attrs = preprocess.attrs
    if H == W or attrs.get("crop_mode", "center") != "center":
        return None
    kept = attrs["crop_pct"] * min(H, W) / max(H, W)
    return (f"vtn finetune: note: frames are {W}x{H}; the backbone's preprocessing (timm's centre crop, recorded with "
            f"the cache, so extraction and evaluation see the same) keeps the middle {kept:.0%} of each frame's "
            f"{'width' if W > H else 'height'}: what lies outside is never seen")


def track_features(model: VideoVTN, feats: torch.Tensor | None, procs: Processes) -> None:
    """After a step's forward, the input normalisation follows the fresh features `feats` [N, D] of every process
    (None: this process had none): a collective under DDP, called by every process at every step."""
    if model.feature_momentum <= 0 or model.backbone_frozen:
        return
    f = feats.float() if feats is not None else model.feature_mean.new_zeros(0, model.config.feature_dim)
    stats = torch.stack([f.sum(0), (f * f).sum(0), f.new_full(f.shape[1:], len(f))])  # [3, D]
    if procs.world > 1:
        torch.distributed.all_reduce(stats)
    model.track_features(stats[0], stats[1], int(stats[2, 0]))


def run_finetune(job: Tuning, progress: bool) -> dict:
    """The steps and evaluations of the run, from its state on; returns where the time went (`Clock.summary`)."""
    loop, model, data, cfg, failures = job.loop, job.loop.model, job.data, job.cfg, job.failures
    ft, state, device, procs, ddp = cfg.finetune, loop.state, loop.device, loop.procs, loop.ddp
    clock, note = Clock(loop), [procs.rank == 0]
    evaluations = math.ceil((state["epochs"] - state["epoch"]) / eval_interval(state["epochs"], cfg.run.eval_every))

    def loss_fn(batch: dict, weight: float) -> torch.Tensor:
        clock.step(evaluations)
        if note[0] and batch["frames"]:  # once, on rank 0
            note[0] = False
            text = frame_note(batch["sizes"][0], model.preprocess)  # the video's frames, not a training crop
            if text:
                print(text, flush=True)
        model.backbone_frozen = state["step"] < ft.frozen_steps
        if not batch["frames"]:  # every clip of this process failed: it still takes part in the step (under
            # DDP every process's backward all-reduces the gradients, paired step by step), with two black
            # frames (BatchNorm in training needs more than one) through the model whose loss counts 0: an
            # all-zero gradient, so the optimiser and fp16's scaler step as the others do and this process adds
            # nothing (nor to the feature normalisation).
            x = torch.zeros(1, 2, 3, *model.preprocess.size, device=device)  # [1, 2, 3, h, w], preprocessed
            one = torch.ones(1, 2, dtype=torch.long, device=device)
            positions = frame_positions(model.config, one - 1, one.float() - 1, one.bool())
            with autocast(device, cfg.run.amp):
                logits = ddp(x, one.bool(), None if positions is None else positions.to(device))
            track_features(model, None, procs)
            return logits.float().sum() * 0.0
        stored, mask, positions = model_inputs(batch, model.config, device)
        if ft.bank_frames:
            with torch.no_grad():
                x = torch.cat([model.preprocess(f.to(device)) for f in batch["frames"]])  # [N fresh, 3, h, w]
            with autocast(device, cfg.run.amp):
                logits = ddp(x, mask, positions, bank=stored, fresh=batch["fresh"].to(device))
            bank = data.train.source.features  # this process's copy of the split: the fresh features go back
            bank[np.concatenate(batch["bank_rows"])] = model.fresh_features.float().cpu().numpy().astype(bank.dtype)
        else:
            x = clip_tensor(model, batch["frames"], device)  # [B, T, 3, h, w]
            with autocast(device, cfg.run.amp):
                logits = ddp(x, mask, positions)
        track_features(model, model.fresh_features, procs)
        return clip_loss(logits, batch["labels"].to(device), cfg.optim, weight)

    def batches(epoch: int):
        failures.sync()  # at each epoch's start, before its clips are queued for decoding
        shares = epoch_shares(data.sampler, epoch, state)
        return (clock.timed(ClipFrames(data.train, [b for b, _ in shares], epoch, job.paths, job.sampling,
                                       job.eval_cfg.runtime, failures, ft.bank_frames, ft if ft.augment else None)),
                [w for _, w in shares])

    run_epochs(loop, cfg.run, batches, loss_fn,
               lambda: clock.evaluate(lambda: evaluate_videos(model, data.val, job.paths, job.eval_cfg, device, procs,
                                                              failures)), progress,
               lambda: memory_postfix(device))
    return clock.summary()


def finish_finetune(job: Tuning, spent: str = "") -> dict:
    """The summary of a run whose steps are done (`spent`: where this process's time went); rank 0 draws
    curves.png and reports."""
    loop, failures = job.loop, job.failures
    state, run = loop.state, loop.dir
    failures.sync()  # the summary (and exit status) of every process counts every process's failures
    best_record = state["best"]
    if loop.procs.rank == 0:
        curves_png([json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()], run / "curves.png")
        print(f"vtn finetune: {state['step']} steps in {state['elapsed']:.0f} s ({spent}); best val top-1 "
              f"{best_record['val_top1']:.1%} at epoch {best_record['epoch']}\n  checkpoints: {run / 'best'}, "
              f"{run / 'last'}; metrics: {run / 'metrics.jsonl'}, curves: {run / 'curves.png'}; failures: "
              f"{len(failures.ids)} ({run / 'failures.jsonl'})", flush=True)
    if loop.board:  # no confusion figure: fine-tuning evaluates raw video, not a cache's val split
        loop.board.close(best_record)
    diverged_warning(loop)
    return {"run": str(run), "epochs": state["epochs"], "steps": state["step"], "best": best_record,
            "failures": sorted(failures.ids)}


def finetune(stage_two: str | Path, out: str | Path, videos: str | None = None, cfg: FinetuneConfig | None = None,
             resume: bool = False, progress: bool = True, cache_url: str | None = None) -> dict:
    """Fine-tune the stage-two run `stage_two` end to end on the videos of `videos` (default: the cache's root)
    into `out`; returns the summary. `cfg` None: the defaults (see `default_config`), or when resuming, the run's
    saved config. `cache_url`: the stage-two cache where it is now (default: where the run recorded it)."""

    run = check_run_dir(out)  # never over a file or a folder that is not a run, before anything is read or written
    best = checkpoint.locate(stage_two)
    procs, device, own_group = setup_processes((cfg or FinetuneConfig()).run.device)
    try:
        job = start_finetune(run, best, videos, cfg, resume, procs, device, cache_url)
        return finish_finetune(job, run_finetune(job, progress))
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


FINETUNE_FLAGS = {**FLAGS, "micro_batch": "finetune.micro_batch", "workers": "finetune.workers",
                  "chunked": {"finetune.chunked": True}}


def main(args) -> int:
    """`vtn finetune`: the stage-two run's data settings, then --config, then --set, then the explicit flags;
    none of them with --resume means "the run's saved config"."""
    cfg = job_config(FinetuneConfig, args, FINETUNE_FLAGS, base=default_config(checkpoint.locate(args.run).parent))
    summary = finetune(args.run, args.out, args.videos, cfg, resume=args.resume, progress=not args.quiet,
                       cache_url=args.cache)
    return 3 if summary["failures"] else 0  # as vtn extract: some videos failed (recorded), the rest trained
