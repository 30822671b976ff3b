"""`vtn train CACHE --out RUN`: stage two, the temporal encoder + head trained on cached frame features.

One flat job: set up (distributed, cache checks, config, model, optimiser, resume), run (epochs of random
training clips, each followed by an evaluation over whole val videos), save (metrics.jsonl, checkpoints
best/ and last/), clean up.

The schedule is sized in optimiser steps, not epochs alone: a small cache (a few hundred videos) gives a
handful of steps per epoch, so `optim.epochs` is raised until the run makes at least `optim.min_steps`
steps; on a Kinetics-sized cache the epochs decide. The learning rate follows the step, so a schedule
means the same thing on both.

Resuming is exact: clips come from (seed, epoch, index) (store/dataset.py), the batch order from (seed,
epoch), the learning rate from the step, and the checkpoint holds the optimiser state and every process's
RNG state. A run interrupted after any checkpoint (epoch ends, and every `run.checkpoint_every` steps) and
resumed ends with bitwise the same weights as one that was never interrupted (on the CPU; GPU kernels
may not be deterministic). Checkpoints are safetensors + JSON only, never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from vtn.config import merge, resolve, to_dict
from vtn.errors import UserError
from vtn.progress import progress_bar
from vtn.store import open_cache
from vtn.store.dataset import ClipDataset, LengthBucketSampler, collate_clips
from vtn.temporal.data import feature_stats, model_inputs, predict, split_source, whole_videos
from vtn.temporal.metrics import classification_metrics
from vtn.temporal.model import VTN, VTNConfig


@dataclass(frozen=True)
class ModelSection:
    """VTNConfig fields the cache does not decide (see VTNConfig). feature_dim and num_classes come from the
    cache; set them to pin a config to a kind of cache (a 768-D model refuses a 512-D cache)."""

    feature_dim: int | None = None
    num_classes: int | None = None
    hidden_size: int = 768
    num_layers: int = 3
    num_heads: int = 12
    intermediate_size: int = 3072
    attention_window: int | tuple[int, ...] = 18
    max_positions: int = 288
    positions: Literal["index", "time", "none"] = "index"
    position_rate: float = 25.0
    dropout: float = 0.1
    attention_dropout: float = 0.1
    head_dropout: float = 0.5
    backend: Literal["hf", "fast"] = "fast"


@dataclass(frozen=True)
class DataSection:
    train_split: str = "train"
    val_split: str = "val"
    # Training clips: clip_frames frames, stride cached frames apart, from a random start. Videos too short
    # for the span keep the clip length with a smaller stride (or all their frames).
    clip_frames: int = 16
    stride: int = 8
    load: Literal["auto", "memory", "stream"] = "auto"  # auto: into memory when the split fits
    workers: int | None = None  # loader processes; None: 0 in memory, up to 8 when streaming
    normalize: bool = True  # features to zero mean, unit std per dimension (train split statistics)
    eval_batch_size: int = 16


@dataclass(frozen=True)
class OptimSection:
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.05  # not applied to biases, norms and the [CLS] vector
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    momentum: float = 0.9  # sgd
    batch_size: int = 32  # clips per optimiser step over all processes
    epochs: int = 25
    min_steps: int = 1000  # more epochs than `epochs` when needed to make at least this many steps
    schedule: Literal["cosine", "step"] = "cosine"
    warmup: float = 0.05  # share of the steps with a linear warm-up from 0
    milestones: tuple[float, ...] = (0.52, 0.96)  # step schedule: lr *= gamma at these shares of the steps
    gamma: float = 0.1
    clip_grad: float = 1.0  # max gradient norm; 0 = off
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class RunSection:
    seed: int = 0
    device: str = "auto"  # auto: this process's GPU when there is one, else the CPU
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast dtype for the forward pass
    checkpoint_every: int = 1000  # steps between mid-epoch checkpoints (last/); every epoch end checkpoints too


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)


RECIPES = {
    "default": TrainConfig(),
    # The reference code's Kinetics recipe (SlowFast configs/Kinetics/VIT_B_VTN.yaml): SGD lr 1e-3, momentum
    # 0.9, weight decay 1e-4, 16 clips per step, lr x0.1 at epochs 13 and 24 of 25, no clipping. The step
    # count floor (min_steps) still applies, so a small cache gets a usable run.
    "reference": TrainConfig(optim=OptimSection(
        optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4, batch_size=16, epochs=25, schedule="step",
        warmup=0.0, milestones=(13 / 25, 24 / 25), gamma=0.1, clip_grad=0.0,
    )),
}

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def config_for_cache(cfg: TrainConfig, cache) -> TrainConfig:
    """`cfg` with feature_dim and num_classes taken from the cache; a value already set must match it."""
    m = cfg.model
    if m.feature_dim is not None and m.feature_dim != cache.feature_dim:
        raise UserError(
            f"{cache.url}: the cache's features have {cache.feature_dim} dimensions, but the model config asks "
            f"for feature_dim={m.feature_dim}; use a cache extracted with the matching backbone or change "
            "model.feature_dim"
        )
    if not cache.class_names:
        raise UserError(f"{cache.url}: the cache has no class names, so there is nothing to train a classifier on")
    if m.num_classes is not None and m.num_classes != len(cache.class_names):
        raise UserError(
            f"{cache.url}: the cache has {len(cache.class_names)} classes, but the model config asks for "
            f"num_classes={m.num_classes}"
        )
    model = dataclasses.replace(m, feature_dim=cache.feature_dim, num_classes=len(cache.class_names))
    return dataclasses.replace(cfg, model=model)


def vtn_config(cfg: TrainConfig, class_names) -> VTNConfig:
    fields = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model)}
    return VTNConfig(**fields, class_names=tuple(class_names))


def check_split(cache, split: str, what: str) -> None:
    if not len(cache.split_ids(split)):
        known = sorted(set(cache.splits))
        raise UserError(f"{cache.url}: no videos in the {what} split '{split}' (the cache has splits {known}); "
                        f"set data.{what}_split")


def lr_factor(step: int, total: int, optim: OptimSection) -> float:
    """The learning rate of optimiser step `step` (0-based) of `total`, as a multiple of optim.lr."""
    warm = int(optim.warmup * total)
    if step < warm:
        return (step + 1) / warm
    if optim.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return optim.gamma ** sum(step >= m * total for m in optim.milestones)


def _optimizer(model: torch.nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """Weight decay on matrices only: biases, LayerNorm weights and [CLS] are not pulled to zero."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)


# -- checkpoints: a directory of safetensors + JSON, swapped in whole ------------------------------------------

def _replace_dir(tmp: Path, final: Path) -> None:
    """Put `tmp` in the place of `final`; a crash at any point leaves `final` or `final`.old complete."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _checkpoint_dir(run: Path, name: str) -> Path | None:
    for d in (run / name, run / (name + ".old")):
        if (d / "state.json").is_file():
            return d
    return None


def _write_model(path: Path, model: VTN, info: dict) -> None:
    model.save_pretrained(path)
    (path / "state.json").write_text(json.dumps(info, indent=2) + "\n")


def _save_last(run: Path, model: VTN, opt, scaler, rng_states: list[dict], state: dict) -> None:
    tmp = run / "last.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain.setdefault(str(i), {})[k] = v
    _write_model(tmp, model, {**state, "optimizer": {"param_groups": sd["param_groups"], "state": plain},
                                     "scaler": scaler.state_dict()})
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {f"{kind}.{r}": torch.frombuffer(bytearray(b), dtype=torch.uint8)
           for r, states in enumerate(rng_states) for kind, b in states.items()}
    save_file(rng, str(tmp / "rng.safetensors"))
    _replace_dir(tmp, run / "last")


def _load_optimizer(opt, path: Path, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in load_file(str(path / "optimizer.safetensors")).items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    for i, d in meta["state"].items():
        state.setdefault(int(i), {}).update(d)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state().numpy().tobytes()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).numpy().tobytes()
    return state


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def train(cache_url: str, out: str | Path, cfg: TrainConfig | None = None, resume: bool = False,
          progress: bool = True) -> dict:
    """Train VTN on the cache at `cache_url` into the run directory `out`; returns the final summary.

    `cfg` None means the defaults, or when resuming, the run's saved config. Under torchrun every process
    calls this; rank 0 writes the run directory.
    """
    # -- distributed and device: decided once, here ------------------------------------------------------
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    given = cfg
    cfg = cfg or TrainConfig()
    if cfg.run.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.run.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        # -- the run directory and the config -----------------------------------------------------------
        run = Path(out)
        cache = open_cache(cache_url)
        saved_path = run / "config.yaml"
        resuming = resume and _checkpoint_dir(run, "last") is not None
        if not resume and _checkpoint_dir(run, "last") is not None:
            raise UserError(f"{run} already holds a run; pass --resume to continue it, or choose another --out")
        if resuming:
            saved = resolve(TrainConfig, saved_path)
            if given is not None:
                mine = _flat(to_dict(config_for_cache(given, cache)))
                diff = [f"{k}: {v!r} (saved {w!r})" for k, w in _flat(to_dict(saved)).items() if (v := mine.get(k)) != w]
                if diff:
                    raise UserError(f"--resume continues {run} with its saved config ({saved_path}); these settings "
                                    f"differ: {'; '.join(diff)}. Drop them, or train into another --out")
            cfg = saved
        cfg = config_for_cache(cfg, cache)
        check_split(cache, cfg.data.train_split, "train")
        check_split(cache, cfg.data.val_split, "val")
        model_cfg = vtn_config(cfg, cache.class_names)
        if cfg.optim.batch_size % world:
            raise UserError(f"optim.batch_size {cfg.optim.batch_size} is not divisible by the {world} processes")
        batch_size = cfg.optim.batch_size // world
        amp_dtype = AMP_DTYPES[cfg.run.amp]

        # -- data ---------------------------------------------------------------------------------------
        train_source = split_source(cache, cfg.data.train_split, cfg.data.load, local_world)
        val_source = split_source(cache, cfg.data.val_split, cfg.data.load, local_world)
        streaming = train_source is cache
        workers = cfg.data.workers if cfg.data.workers is not None else (
            min(8, (os.cpu_count() or 1) // local_world) if streaming else 0)
        train_set = ClipDataset(train_source, split=cfg.data.train_split, clip_frames=cfg.data.clip_frames,
                                stride=cfg.data.stride, train=True, seed=cfg.run.seed)
        labelled = np.flatnonzero(train_set.labels >= 0)  # unlabelled videos cannot teach a classifier
        if not len(labelled):
            raise UserError(f"{cache.url}: the train split '{cfg.data.train_split}' has no labelled videos")
        sampler = LengthBucketSampler(train_set.sample_lengths()[labelled], batch_size, shuffle=True,
                                      seed=cfg.run.seed, num_replicas=world, rank=rank)
        val_set = whole_videos(val_source, cfg.data.val_split, model_cfg.max_positions)
        steps_per_epoch = len(sampler)
        epochs = max(cfg.optim.epochs, math.ceil(cfg.optim.min_steps / steps_per_epoch))
        total_steps = epochs * steps_per_epoch

        # -- model, optimiser, state ------------------------------------------------------------------
        torch.manual_seed(cfg.run.seed)
        model = VTN(model_cfg).to(device)
        torch.manual_seed(cfg.run.seed + rank)  # dropout differs between processes, as their data does
        opt = _optimizer(model, cfg.optim)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.run.amp == "fp16")
        state = {"cache": cache.url, "world_size": world, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                 "total_steps": total_steps, "epoch": 0, "step_in_epoch": 0, "step": 0, "elapsed": 0.0,
                 "loss_sum": 0.0, "loss_count": 0, "best": None}
        if resuming:
            ckpt = _checkpoint_dir(run, "last")
            saved_state = json.loads((ckpt / "state.json").read_text())
            saved_model = VTN.from_pretrained(ckpt)
            if saved_model.config != model_cfg:
                raise UserError(f"{cache.url} does not fit the checkpoint {ckpt}: it was trained on features of "
                                f"{saved_model.config.feature_dim} dimensions and classes "
                                f"{list(saved_model.config.class_names)}; this cache has {model_cfg.feature_dim} "
                                f"and {list(model_cfg.class_names)}")
            if saved_state["world_size"] != world:
                raise UserError(f"{ckpt} was written by {saved_state['world_size']} processes; resume it with the "
                                f"same number (the batch order depends on it), not {world}")
            model.load_state_dict(saved_model.state_dict())  # weights and the feature normalisation
            _load_optimizer(opt, ckpt, saved_state.pop("optimizer"))
            scaler.load_state_dict(saved_state.pop("scaler"))
            rng = load_file(str(ckpt / "rng.safetensors"))
            torch.set_rng_state(rng[f"cpu.{rank}"])
            if device.type == "cuda" and f"cuda.{rank}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda.{rank}"], device)
            state.update(saved_state)
        elif cfg.data.normalize:
            model.set_feature_stats(*feature_stats(train_source, cfg.data.train_split))
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model

        if rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            saved_path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            metrics_path = run / "metrics.jsonl"
            # Lines written after the checkpoint we resume from belong to the lost part of the run.
            lines = metrics_path.read_text().splitlines() if resuming and metrics_path.exists() else []
            metrics_path.write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= state["step"]))
            n_params = sum(p.numel() for p in model.parameters())
            print(f"vtn train: {len(labelled)} train / {len(val_set)} val videos from {cache.url} "
                  f"({'memory' if not streaming else 'streamed'}), {n_params / 1e6:.2f} M parameters, "
                  f"{epochs} epochs x {steps_per_epoch} steps of {cfg.optim.batch_size} clips on {device}"
                  + (f" x {world} processes" if world > 1 else "")
                  + (f"; resuming at step {state['step']}" if resuming else ""), flush=True)

        def checkpoint_last() -> None:
            rngs = [None] * world
            if world > 1:
                dist.all_gather_object(rngs, _rng_state(device))
            else:
                rngs = [_rng_state(device)]
            if rank == 0:
                _save_last(run, model, opt, scaler, rngs, state)

        def evaluate() -> dict:
            logits, index = predict(model, val_set, device, cfg.data.eval_batch_size, (rank, world),
                                    amp_dtype)
            if world > 1:
                parts = [None] * world
                dist.all_gather_object(parts, (logits, index))
                logits = np.concatenate([p[0] for p in parts])
                index = np.concatenate([p[1] for p in parts])
            return classification_metrics(logits, val_set.labels[index])

        # -- run ----------------------------------------------------------------------------------------
        bar = progress_bar(total=total_steps, initial=state["step"], disable=not progress or rank != 0, unit="step")
        started = time.perf_counter() - state["elapsed"]
        dropped = torch.zeros((), dtype=torch.long)  # frames past max_positions, masked out
        model.train()
        for epoch in range(state["epoch"], epochs):
            bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
            train_set.set_epoch(epoch)
            sampler.set_epoch(epoch)
            batches = [[int(labelled[i]) for i in b] for b in sampler][state["step_in_epoch"]:]
            # Its own generator, so making the loader does not draw from the global RNG (dropout's).
            loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, collate_fn=collate_clips,
                                                 num_workers=workers, generator=torch.Generator())
            tick, clips = time.perf_counter(), 0
            for batch in loader:
                for group in opt.param_groups:
                    group["lr"] = cfg.optim.lr * lr_factor(state["step"], total_steps, cfg.optim)
                features, mask, positions = model_inputs(batch, model_cfg, device)
                dropped += (batch["mask"].sum() - mask.sum()).cpu()
                labels = batch["labels"].to(device)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    logits = ddp(features, mask, positions)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.optim.label_smoothing)
                scaler.scale(loss).backward()
                if cfg.optim.clip_grad > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)

                value = float(loss.detach())
                state["loss_sum"] += value
                state["loss_count"] += 1
                state["step"] += 1
                state["step_in_epoch"] += 1
                clips += len(batch["labels"]) * world
                now = time.perf_counter()
                bar.set_postfix(loss=f"{value:.3f}", clips_s=f"{clips / max(now - tick, 1e-9):.0f}", refresh=False)
                bar.update()
                if cfg.run.checkpoint_every and state["step"] % cfg.run.checkpoint_every == 0 \
                        and state["step_in_epoch"] < steps_per_epoch:
                    state["elapsed"] = time.perf_counter() - started
                    checkpoint_last()

            # -- end of epoch: evaluate, log, checkpoint ---------------------------------------------------
            loss_sum = torch.tensor([state["loss_sum"], state["loss_count"]], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(loss_sum)
            val = evaluate()
            state.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, loss_count=0,
                         elapsed=time.perf_counter() - started)
            record = {"epoch": epoch + 1, "step": state["step"], "lr": opt.param_groups[0]["lr"],
                      "train_loss": float(loss_sum[0] / max(loss_sum[1], 1)),
                      **{f"val_{k}": v for k, v in val.items()}, "elapsed": round(state["elapsed"], 2)}
            best = state["best"]
            improved = best is None or (val["top1"], -val["loss"]) > (best["val_top1"], -best["val_loss"])
            if improved:
                state["best"] = record
            if rank == 0:
                with open(run / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if improved:
                    tmp = run / "best.tmp"
                    shutil.rmtree(tmp, ignore_errors=True)
                    _write_model(tmp, model, record)
                    _replace_dir(tmp, run / "best")
            checkpoint_last()
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_top1=f"{val['top1']:.3f}", refresh=False)
        bar.close()

        # -- summary -------------------------------------------------------------------------------------
        best = state["best"]
        summary = {"run": str(run), "epochs": epochs, "steps": state["step"], "seconds": round(state["elapsed"], 1),
                   "best": best, "last": json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
                   if rank == 0 else None}
        if rank == 0:
            if int(dropped):
                print(f"note: {int(dropped)} training frames lay past model.max_positions={model_cfg.max_positions} "
                      "and were left out; raise it, or use model.positions=time", flush=True)
            print(f"vtn train: {epochs} epochs, {state['step']} steps in {state['elapsed']:.0f} s; best val top-1 "
                  f"{best['val_top1']:.1%} (top-5 {best['val_top5']:.1%}, mean class "
                  f"{best['val_mean_class_accuracy']:.1%}) at epoch {best['epoch']}; last top-1 "
                  f"{summary['last']['val_top1']:.1%}\n  checkpoints: {run / 'best'}, {run / 'last'}; "
                  f"metrics: {run / 'metrics.jsonl'}", flush=True)
        return summary
    finally:
        if own_group:
            dist.destroy_process_group()


FLAGS = {  # command-line flag -> config key
    "frames": ("data", "clip_frames"), "stride": ("data", "stride"), "epochs": ("optim", "epochs"),
    "batch_size": ("optim", "batch_size"), "lr": ("optim", "lr"), "amp": ("run", "amp"), "seed": ("run", "seed"),
    "device": ("run", "device"),
}


def main(args) -> int:
    """`vtn train`: recipe, then --config, then --set, then the explicit flags; none of them with --resume
    means "the run's saved config"."""
    updates: dict = {}
    for flag, (section, key) in FLAGS.items():
        if getattr(args, flag) is not None:
            updates.setdefault(section, {})[key] = getattr(args, flag)
    cfg = None
    if args.recipe or args.config or args.sets or updates or not args.resume:
        cfg = merge(resolve(TrainConfig, args.config, args.sets, base=RECIPES[args.recipe or "default"]), updates)
    train(args.cache, args.out, cfg, resume=args.resume, progress=not args.quiet)
    return 0
