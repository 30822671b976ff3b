"""Stage two's training loop, shared by `vtn train`, `vtn finetune` and `vtn sweep`.

A run is composed of pieces: `setup_processes` (vtn/runtime.py: device and torchrun), `schedule` (how many
steps), `build_optimizer` + `lr_factor`, `train_epoch` (one epoch of optimiser steps around a loss function),
`evaluate_views` (whole videos, gathered over processes), `end_epoch` (metrics.jsonl, best/ and last/ through
temporal/checkpoint.py). No trainer class: each piece is a function of what it uses; `Loop` holds what the steps
of one run share. `fit` is a whole stage-two run on cached features. The schedule's length is OptimSection's
rule (`schedule`); the learning rate follows the step, so a schedule means the same on a small and a large cache.
A run of the default length stops once val top-1 stalls for its patience (`early_stop`), a decision kept in the
state, so a resumed run stops where an uninterrupted one does.

Resuming is exact: clips come from (seed, epoch, index) (store/dataset.py), the batch order from (seed,
epoch), the learning rate from the step, and the checkpoint holds the optimiser state and every process's
RNG state. A run interrupted after any checkpoint (epoch ends, and every `run.checkpoint_every` steps) and
resumed ends with bitwise the same weights as one that was never interrupted (on the CPU; GPU kernels
may not be deterministic). Under torchrun every global batch is split over the processes and the loss is
weighted by the global batch size, so N processes take the same steps as one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from vtn.config import flat_dict, resolve, to_dict
from vtn.errors import UserError
from vtn.paths import canonical_cache, check_run_dir
from vtn.plots import curves_png
from vtn.progress import progress_bar
from vtn.runtime import FailTogether, Processes, autocast, setup_processes, size_threads
from vtn.store import open_cache
from vtn.store.dataset import ClipDataset, LengthBucketSampler, collate_clips
from vtn.temporal import checkpoint
from vtn.temporal.data import cache_inputs, check_inputs, feature_stats, model_inputs, predict
from vtn.temporal.metrics import classification_metrics, rank
from vtn.temporal.model import VTN
from vtn.temporal.settings import DEFAULT_EPOCHS, OptimSection, RunSection, TrainConfig, model_config
from vtn.temporal.splits import Data, data_fingerprint, load_data
from vtn.temporal.tensorboard import open_board


def schedule(optim: OptimSection, steps_per_epoch: int) -> tuple[int, int, str, int | None]:
    """(epochs, total optimiser steps, what decided them, the patience in epochs or None) for `steps_per_epoch`
    steps per epoch. The learning rate follows the total steps; a run that stops early ends part-way along it."""
    if optim.steps is not None:
        return math.ceil(optim.steps / steps_per_epoch), optim.steps, f"optim.steps={optim.steps}", None
    if optim.epochs is not None:
        return optim.epochs, optim.epochs * steps_per_epoch, f"optim.epochs={optim.epochs}", None
    epochs = max(DEFAULT_EPOCHS, math.ceil(optim.min_steps / steps_per_epoch))
    why = (f"the default {DEFAULT_EPOCHS} epochs" if epochs == DEFAULT_EPOCHS else
           f"the default {DEFAULT_EPOCHS} epochs raised to reach optim.min_steps={optim.min_steps}")
    if optim.patience == 0:
        return epochs, epochs * steps_per_epoch, why + " (optim.patience=0: no early stop)", None
    patience = optim.patience or max(1, epochs // 5)
    why += (f", at most: it stops early once val top-1 has not improved for {patience} epochs (optim.patience"
            f"{'' if optim.patience else ': a fifth of the run'}; --steps or --epochs train exactly)")
    return epochs, epochs * steps_per_epoch, why, patience


def lr_factor(step: int, total: int, optim: OptimSection) -> float:
    """The learning rate of optimiser step `step` (0-based) of `total`, as a multiple of the group's base lr."""
    warm = int(optim.warmup * total)
    if step < warm:
        return (step + 1) / warm
    if optim.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return optim.gamma ** sum(step >= m * total for m in optim.milestones)


def build_optimizer(groups: list[tuple[list[torch.nn.Parameter], float]], optim: OptimSection) -> torch.optim.Optimizer:
    """An optimiser over (parameters, base lr) groups. Weight decay on matrices only: biases, LayerNorm weights
    and [CLS] are not pulled to zero. Each group keeps its `base_lr`, which the schedule scales."""
    params = []
    for ps, lr in groups:
        for decay in (True, False):
            mine = [p for p in ps if (p.ndim >= 2) == decay]
            if mine:
                params.append({"params": mine, "weight_decay": optim.weight_decay if decay else 0.0,
                               "lr": lr, "base_lr": lr})
    # The fused update (one kernel per group, on the CPU and on CUDA) equals the default loop up to float rounding
    # and is several times faster on an encoder's many small tensors (README, Benchmarks: vtn bench sweep).
    fused = all(p.device.type in ("cpu", "cuda") for group in params for p in group["params"])
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, fused=fused)
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, fused=fused)


# -- processes, steps, evaluation ------------------------------------------------------------------------------

@dataclass
class Loop:
    """What the steps of a training job share: the run directory, the model and its optimiser, the counters."""

    dir: Path
    procs: Processes
    device: torch.device
    model: torch.nn.Module  # what is saved
    ddp: torch.nn.Module  # what is called: the model, wrapped for DDP under torchrun
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    optim: OptimSection
    state: dict  # counters, saved in last/state.json
    inputs: dict  # what the features are (checkpoint inputs.json)
    started: float = 0.0  # perf_counter() at the run's start, less the time of the part before a resume
    clip_groups: list | None = None  # parameter lists clipped to optim.clip_grad each on its own; None: all as one
    board: Any = None  # the run's TensorBoard events (temporal/tensorboard.py): rank 0, when on


def check_resume(saved: dict, mine: dict, ckpt: Path) -> None:
    """Refuse to resume when what decides the steps changed: the processes, the training videos, the schedule."""
    keys = ("world_size", "steps_per_epoch", "total_steps", "epochs")
    diffs = [f"{k}: {saved.get(k)!r} then, {mine[k]!r} now" for k in keys if saved.get(k) != mine[k]]
    then = dict(saved.get("data", {}))
    if then.get("cache"):  # a run that recorded the path as typed (before it was made canonical)
        then["cache"] = canonical_cache(then["cache"])
    diffs += [f"data.{k}: {then.get(k)!r} then, {v!r} now" for k, v in mine["data"].items() if then.get(k) != v]
    if diffs:
        raise UserError(f"cannot resume {ckpt} exactly, these differ from the interrupted run: {'; '.join(diffs)}. "
                        "Resume with the same cache and settings, or train into another --out")


def checkpoint_last(loop: Loop) -> None:
    """last/ as of now: the state (with the run's time so far), the weights, the optimiser, every process's RNG."""
    loop.state["elapsed"] = time.perf_counter() - loop.started
    rngs = [checkpoint.rng_state(loop.device)]
    if loop.procs.world > 1:
        rngs = [None] * loop.procs.world
        dist.all_gather_object(rngs, checkpoint.rng_state(loop.device))
    if loop.procs.rank == 0:
        checkpoint.save_last(loop.dir, loop.model, loop.opt, loop.scaler, rngs, loop.state, loop.inputs)


def set_lr(loop: Loop) -> None:
    """The learning rate of the coming optimiser step, from the schedule."""
    factor = lr_factor(loop.state["step"], loop.state["total_steps"], loop.optim)
    for group in loop.opt.param_groups:
        group["lr"] = group["base_lr"] * factor


def finish_step(loop: Loop, loss: float) -> None:
    """After the backward pass of a step with this loss: clip, step the optimiser, count."""
    state, opt = loop.state, loop.opt
    if loop.optim.clip_grad > 0:
        loop.scaler.unscale_(opt)
        # foreach: a few ops for all tensors (PyTorch picks it on CUDA only; on the CPU the loop over the small
        # tensors cost more than the fused optimiser step)
        for params in loop.clip_groups or [list(loop.model.parameters())]:
            torch.nn.utils.clip_grad_norm_(params, loop.optim.clip_grad, foreach=True)
    loop.scaler.step(opt)
    loop.scaler.update()
    opt.zero_grad(set_to_none=True)
    state["loss_sum"] += loss
    state["loss_count"] += 1
    state["step"] += 1
    state["step_in_epoch"] += 1
    if not math.isfinite(loss) and state.get("diverged_at") is None:  # .get: a run saved before this key existed
        state["diverged_at"] = state["step"]


def diverged_warning(loop: Loop) -> None:
    """After a run: say so, loudly, when its train loss became NaN or infinite (the run kept training)."""
    step, best = loop.state.get("diverged_at"), loop.state["best"]
    if step is not None and loop.procs.rank == 0:
        print(f"warning: {loop.dir}: the train loss became NaN or infinite at step {step}: the run diverged, and its "
              f"weights from then on are not usable (best/ is from epoch {best['epoch']}). Lower optim.lr"
              f"{'' if loop.optim.clip_grad else ', or set optim.clip_grad (gradient clipping is off)'}.",
              file=sys.stderr, flush=True)


def train_epoch(loop: Loop, loader, weights: list[float], loss_fn: Callable, bar, on_step: Callable[[], None],
                postfix: Callable[[], dict] = dict) -> None:
    """The optimiser steps of one epoch (what is left of it): `loss_fn(batch, weight)` gives this process's
    weighted loss of a batch; each step is `set_lr`, backward, `finish_step`, then `on_step()`; the bar shows
    the loss, clips/s and `postfix()`."""
    tick, clips = time.perf_counter(), 0
    for batch, weight in zip(loader, weights):
        set_lr(loop)
        loss = loss_fn(batch, weight)
        loop.scaler.scale(loss).backward()
        value = float(loss.detach())
        finish_step(loop, value)
        clips += len(batch["labels"]) * loop.procs.world
        bar.set_postfix(loss=f"{value:.3f}", clips_s=f"{clips / max(time.perf_counter() - tick, 1e-9):.0f}",
                        **postfix(), refresh=False)
        bar.update()
        on_step()


def eval_interval(epochs: int, eval_every: int | None) -> int:
    """Epochs between evaluations: `eval_every`, or about 25 evaluations per run."""
    return eval_every or max(1, math.ceil(epochs / 25))


def step_checkpoint(loop: Loop, checkpoint_every: int) -> None:
    """After a step: last/ every `checkpoint_every` steps, between evaluations (an evaluated epoch's end saves its own)."""
    state = loop.state
    ends_epoch = state["step_in_epoch"] == state["steps_per_epoch"] or state["step"] == state["total_steps"]
    if checkpoint_every and state["step"] % checkpoint_every == 0 and not ends_epoch:
        checkpoint_last(loop)


def close_epoch(loop: Loop, epoch: int, epochs: int, every: int, checkpoint_every: int,
                evaluate: Callable[[], dict]) -> dict | None:
    """After the steps of `epoch`: every `every` epochs (and the last) `evaluate()` gives the val metrics for
    `end_epoch` (its record is returned); otherwise the state moves to the next epoch, saving last/ when a
    checkpoint falls due."""
    if (epoch + 1) % every == 0 or epoch + 1 == epochs:
        return end_epoch(loop, epoch, evaluate())
    state = loop.state
    state.update(epoch=epoch + 1, step_in_epoch=0)
    if checkpoint_every and state["step"] % checkpoint_every == 0:
        checkpoint_last(loop)
    return None


def clip_loss(logits: torch.Tensor, labels: torch.Tensor, optim: OptimSection, weight: float) -> torch.Tensor:
    """This process's weighted loss of a batch: the summed cross-entropy times the batch's weight (see
    LengthBucketSampler.shares), so that the processes' losses together are the global batch's mean."""
    return F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=optim.label_smoothing) * weight


def epoch_shares(sampler: LengthBucketSampler, epoch: int, state: dict) -> list[tuple[list[int], float]]:
    """This process's (items, weight) of each of the epoch's steps still to run: from the state's step in the
    epoch on, and no further than the run's last step."""
    sampler.set_epoch(epoch)
    return sampler.shares()[state["step_in_epoch"]:][:state["total_steps"] - state["step"]]


def run_epochs(loop: Loop, *args, **kwargs) -> None:
    """`each_epoch`, failing together: an exception on any rank ends every rank within seconds with its message,
    never leaving the others in a gradient all-reduce until the job's timeout (runtime.FailTogether)."""
    with FailTogether(loop.procs.rank, loop.procs.world, watch=True):
        each_epoch(loop, *args, **kwargs)


def each_epoch(loop: Loop, run: RunSection, batches: Callable, loss_fn: Callable, evaluate: Callable[[], dict],
               progress: bool, postfix: Callable[[], dict] = dict) -> None:
    """The run's epochs from the state's on, under a progress bar (with `postfix()` as well): `batches(epoch)`
    gives the epoch's (loader, weights) from the state's step in it on; every `run.eval_every` epochs (and the
    last) `evaluate()` gives the val metrics for `end_epoch`; last/ is also saved every `run.checkpoint_every` steps."""
    state, epochs, checkpoint_every = loop.state, loop.state["epochs"], run.checkpoint_every
    bar = progress_bar(total=state["total_steps"], initial=state["step"], disable=not progress or loop.procs.rank != 0,
                       unit="step")
    loop.started = time.perf_counter() - state["elapsed"]
    loop.model.train()
    every = eval_interval(epochs, run.eval_every)
    for epoch in range(state["epoch"], epochs):
        if state.get("stopped_at") is not None:  # .get: a run saved before early stopping existed
            break
        bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
        loader, weights = batches(epoch)
        train_epoch(loop, loader, weights, loss_fn, bar, lambda: step_checkpoint(loop, checkpoint_every), postfix)
        record = close_epoch(loop, epoch, epochs, every, checkpoint_every, evaluate)
        if record is not None:
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_top1=f"{record['val_top1']:.3f}", **postfix(),
                            refresh=False)
    bar.close()


def epoch_batches(data: Data, state: dict, epoch: int) -> tuple[torch.utils.data.DataLoader, list[float]]:
    """The loader of what is left of `epoch` (from the state's step in it, up to the run's last step) and the
    weight of each of its batches."""
    data.train.set_epoch(epoch)
    shares = epoch_shares(data.sampler, epoch, state)
    # Its own generator, so making the loader does not draw from the global RNG (dropout's).
    loader = torch.utils.data.DataLoader(data.train, batch_sampler=[b for b, _ in shares], collate_fn=collate_clips,
                                         num_workers=data.workers, generator=torch.Generator())
    return loader, [w for _, w in shares]


def evaluate_views(model: VTN, dataset: ClipDataset, device: torch.device, batch_size: int, procs: Processes,
                   amp: str) -> dict:
    """Metrics of the model over every item of `dataset` (whole videos), the work split over processes."""
    logits, index = predict(model, dataset, device, batch_size, (procs.rank, procs.world), amp)
    return gathered_metrics(logits, dataset.labels[index], procs)


def gathered_metrics(logits: np.ndarray, labels: np.ndarray, procs: Processes) -> dict:
    """Classification metrics of every process's (logits [n, classes], labels [n]) together."""
    if procs.world > 1:
        parts = [None] * procs.world
        dist.all_gather_object(parts, (logits, labels))
        logits = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
    return classification_metrics(logits, labels)


def end_epoch(loop: Loop, epoch: int, val: dict) -> dict:
    """Log the epoch's record to metrics.jsonl, keep the best checkpoint, save last/; returns the record."""
    state = loop.state
    loss = torch.tensor([state["loss_sum"], state["loss_count"]], dtype=torch.float64)
    if loop.procs.world > 1:
        dist.all_reduce(loss)
    state.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, loss_count=0,
                 elapsed=time.perf_counter() - loop.started)
    record = {"epoch": epoch + 1, "step": state["step"], "lr": loop.opt.param_groups[0]["lr"],
              "train_loss": float(loss[0] / max(loss[1], 1)), **{f"val_{k}": v for k, v in val.items()},
              "elapsed": round(state["elapsed"], 2)}
    best = state["best"]
    improved = best is None or rank(record) > rank(best)
    if improved:
        state["best"] = record
    early_stop(state, record)
    if loop.procs.rank == 0:
        with open(loop.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if loop.board:
            loop.board.record(record, loop.opt, loop.device)
        if improved:
            checkpoint.save_best(loop.dir, loop.model, record, loop.inputs)
    checkpoint_last(loop)
    return record


def early_stop(state: dict, record: dict) -> None:
    """After an evaluation: note the epoch of the best val top-1 so far, and stop the run (state "stopped_at")
    when the schedule has a patience and top-1 has not risen for that many epochs. A top-1 no better than
    guessing could reach (`chance`) does not count: a model that must learn the frames' order
    can sit there for a long time before it starts to learn. Kept in the state, so a resumed run stops where the
    uninterrupted one did."""
    top = state.get("top1_best")
    if record["val_top1"] > max(state.get("chance", 0.0), top["val_top1"] if top else 0.0):
        state["top1_best"] = top = {"epoch": record["epoch"], "val_top1": record["val_top1"]}
    patience = state.get("patience")
    if patience and top and record["epoch"] - top["epoch"] >= patience and record["epoch"] < state["epochs"]:
        state["stopped_at"] = record["epoch"]


def start_run_dir(run: Path, cfg, step: int) -> None:
    """The run directory with its config.yaml, and metrics.jsonl as of `step`: lines written after the checkpoint
    a run resumes from belong to its lost part."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    path.write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= step))


# Settings that change what a run reports, not the steps it takes: a resumed run may set them anew.
RESUME_MAY_CHANGE = ("run.tensorboard",)


def resume_config(cls, run: Path, given):
    """The saved config of the run in `run`; `given` (None: no settings on the command line) must equal it, but
    for RESUME_MAY_CHANGE, which it sets."""
    saved_path = run / "config.yaml"
    saved = resolve(cls, saved_path)
    if given is not None:
        mine = flat_dict(given)
        diff = [f"{k}: {v!r} (saved {w!r})" for k, w in flat_dict(saved).items()
                if (v := mine.get(k)) != w and k not in RESUME_MAY_CHANGE]
        if diff:
            raise UserError(f"--resume continues {run} with its saved config ({saved_path}); these settings "
                            f"differ: {'; '.join(diff)}. Drop them, or train into another --out")
        for key in RESUME_MAY_CHANGE:
            section, name = key.split(".")
            mine_section = replace(getattr(saved, section), **{name: getattr(getattr(given, section), name)})
            saved = replace(saved, **{section: mine_section})
    return saved


def run_config(run: Path, cls, cfg, resume: bool, default: Callable[[], Any], procs: Processes) -> tuple[Any, Path | None]:
    """(the config of the run in `run`, the last/ checkpoint it resumes from or None): `cfg`, or `default()` when
    None, or when resuming the run's saved config. Refuses a folder holding a run without --resume, and a batch
    that does not split over the processes."""
    last = checkpoint.find(run, "last")
    if last is not None and not resume:
        raise UserError(f"{run} already holds a run; pass --resume to continue it, or choose another --out")
    resuming = resume and last is not None
    cfg = resume_config(cls, run, cfg) if resuming else (cfg or default())
    if cfg.optim.batch_size % procs.world:
        raise UserError(f"optim.batch_size {cfg.optim.batch_size} is not divisible by the {procs.world} processes")
    return cfg, last if resuming else None


def chance(labels: np.ndarray) -> float:
    """The val top-1 that guessing reaches: the share of the most frequent class among these labels (-1:
    unlabelled), plus two standard errors of a top-1 measured on that many videos: on 24 val videos, one video
    more than the most frequent class is luck, not learning."""
    labels = labels[labels >= 0]
    if not len(labels):
        return 0.0
    share = np.bincount(labels).max() / len(labels)
    return float(share + 2 * np.sqrt(share * (1 - share) / len(labels)))


def new_loop(run: Path, cfg, model: torch.nn.Module, groups: list, data: Data, cache, inputs: dict, last: Path | None,
             procs: Processes, device: torch.device, clip_groups: list | None = None, **ddp) -> tuple[Loop, str]:
    """The loop of a run on `data` (and what decided its schedule): the optimiser over (parameters, base lr)
    `groups`, the scaler, the state (loaded from last/ when resuming, refusing a run that would not take the same
    steps), and the model wrapped for DDP under torchrun (`ddp`: DDP's options). Seeds this process's dropout.
    `clip_groups`: see Loop."""
    steps_per_epoch = len(data.sampler)
    epochs, total_steps, why, patience = schedule(cfg.optim, steps_per_epoch)
    torch.manual_seed(cfg.run.seed + procs.rank)  # dropout differs between processes, as their data does
    opt = build_optimizer(groups, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.run.amp == "fp16")
    state = {"world_size": procs.world, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
             "total_steps": total_steps, "data": data_fingerprint(data, cache), "epoch": 0, "step_in_epoch": 0,
             "step": 0, "elapsed": 0.0, "loss_sum": 0.0, "loss_count": 0, "best": None, "diverged_at": None,
             "patience": patience, "chance": chance(data.val.labels), "top1_best": None, "stopped_at": None}
    if last is not None:
        saved_state = checkpoint.load_last(last, model, opt, scaler, procs.rank, device)
        check_resume(saved_state, state, last)
        state.update(saved_state)
    ddp_model = model if procs.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **ddp)
    return Loop(run, procs, device, model, ddp_model, opt, scaler, cfg.optim, state, inputs, clip_groups=clip_groups,
                board=open_board(run, cfg, procs.rank == 0, state["step"])), why


def schedule_text(loop: Loop, batch_size: int, why: str, resuming: bool) -> str:
    state, world = loop.state, loop.procs.world
    return ((f" x {world} processes" if world > 1 else "") +
            f"\n  schedule: {state['total_steps']} steps ({state['epochs']} epochs x {state['steps_per_epoch']} steps "
            f"of {batch_size} clips), set by {why}" + (f"; resuming at step {state['step']}" if resuming else ""))


# -- a run -----------------------------------------------------------------------------------------------------

@dataclass
class Started:
    """A run set up to train: its loop (model, optimiser, counters, schedule), data and config."""

    loop: Loop
    data: Data
    cfg: TrainConfig


def start_run(run: Path, cache, cfg: TrainConfig | None, resume: bool, procs: Processes, device: torch.device,
              sources: dict | None = None, announce: bool = True, size: str = "") -> Started:
    """Everything before the first step of the run in `run` (checked by check_run_dir): its config (the saved
    one when resuming), data, schedule, model (seeded by run.seed), optimiser, state (a resumed run's from
    last/), config.yaml and the start of metrics.jsonl. `sources`: loaded splits to share with other runs of
    this process (see `shared_source`). `size`: which encoder size and why, for the first log line."""
    cfg, last = run_config(run, TrainConfig, cfg, resume, TrainConfig, procs)
    model_cfg = model_config(cfg, cache)
    # A resumed run keeps the model it started with, as its checkpoint describes it (one saved before a field
    # existed keeps that field's value of then).
    if last is not None:
        saved = VTN.from_pretrained(last).config
        if (saved.feature_dim, saved.class_names) != (model_cfg.feature_dim, model_cfg.class_names):
            raise UserError(f"{cache.url} does not fit the checkpoint {last}: it was trained on features of "
                            f"{saved.feature_dim} dimensions and classes {list(saved.class_names)}; this cache "
                            f"has {model_cfg.feature_dim} and {list(model_cfg.class_names)}")
        check_inputs(checkpoint.read_inputs(last), cache, last)
        model_cfg = saved
    data = load_data(cache, cfg, model_cfg, procs, sources)
    model_cfg = data.model
    size_threads(data.workers, cfg.run.threads)

    torch.manual_seed(cfg.run.seed)
    model = VTN(model_cfg).to(device)
    if last is None:  # the train videos' statistics only; they also refuse a video with NaN features, normalised or not
        stats = feature_stats(data.train, cache.url)
        if cfg.data.normalize:
            model.set_feature_stats(*stats)
    inputs = {**cache_inputs(cache), "clip_frames": cfg.data.clip_frames, "stride": cfg.data.stride}
    loop, why = new_loop(run, cfg, model, [(list(model.parameters()), cfg.optim.lr)], data, cache, inputs, last,
                         procs, device)

    if procs.rank == 0:
        start_run_dir(run, cfg, loop.state["step"])
        if data.holdout is not None:
            (run / "holdout.json").write_text(json.dumps({"split": cfg.data.train_split, "share": cfg.data.holdout,
                                                          "ids": data.holdout}, indent=1) + "\n")
    if procs.rank == 0 and announce:
        n_params = sum(p.numel() for p in model.parameters())
        val_from = (f"{len(data.val)} val videos" if data.holdout is None else
                    f"{len(data.val)} val videos held out of '{cfg.data.train_split}' (no '{cfg.data.val_split}' "
                    f"split; {cfg.data.holdout:.0%} of each class by a hash of the id; listed in "
                    f"{run / 'holdout.json'})")
        print(f"vtn train: {len(data.train)} train videos and {val_from} from {cache.url} "
              f"({'streamed' if data.streaming else 'memory'}), {n_params / 1e6:.2f} M parameters on {device}"
              + (f"\n  encoder: {size}" if size else "")
              + schedule_text(loop, cfg.optim.batch_size, why, last is not None)
              + f"\n  training views: {data.sampling}", flush=True)
        if data.left_out:
            print(data.left_out, file=sys.stderr, flush=True)
        if len(cache.class_names) == 1:
            print(f"warning: {cache.url} has a single class ({cache.class_names[0]}); every prediction is that "
                  "class and accuracy means nothing", flush=True)
    return Started(loop, data, cfg)


def finish_run(loop: Loop, announce: bool = True, val: ClipDataset | None = None) -> dict:
    """The summary of a run whose steps are done; rank 0 draws curves.png and reports (and closes its TensorBoard
    events with best/'s confusion on `val`)."""
    state, run, rank, epochs = loop.state, loop.dir, loop.procs.rank, loop.state["epoch"]
    best = state["best"]
    summary = {"run": str(run), "epochs": epochs, "steps": state["step"], "seconds": round(state["elapsed"], 1),
               "diverged_at": state.get("diverged_at"), "best": best, "last": json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
               if rank == 0 else None}
    if rank == 0:
        curves_png([json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()], run / "curves.png")
    if rank == 0 and loop.board:
        loop.board.close(best, val, loop.device)
    if rank == 0 and announce:
        stopped = state.get("stopped_at")
        if stopped is not None:
            top = state["top1_best"]
            print(f"vtn train: stopped early at epoch {stopped} of {state['epochs']}: val top-1 had not risen above "
                  f"{top['val_top1']:.1%} (first reached at epoch {top['epoch']}) for {state['patience']} epochs",
                  flush=True)
        print(f"vtn train: {epochs} epochs, {state['step']} steps in {state['elapsed']:.0f} s; best val top-1 "
              f"{best['val_top1']:.1%} (top-5 {best['val_top5']:.1%}, mean class "
              f"{best['val_mean_class_accuracy']:.1%}) at epoch {best['epoch']}; last top-1 "
              f"{summary['last']['val_top1']:.1%}\n  checkpoints: {run / 'best'}, {run / 'last'}; "
              f"metrics: {run / 'metrics.jsonl'}, curves: {run / 'curves.png'}", flush=True)
        diverged_warning(loop)
    return summary


def fit(cache_url: str, out: str | Path, cfg: TrainConfig | None = None, resume: bool = False,
        progress: bool = True, cache=None, sources: dict | None = None, size: str = "") -> dict:
    """Train VTN on the cache at `cache_url` into the run directory `out`; returns the final summary.

    `cfg` None means the defaults, or when resuming, the run's saved config. Under torchrun every process
    calls this; rank 0 writes the run directory. `cache` (the cache already open) and `sources` (its loaded
    splits, see `shared_source`) let a sweep train many runs in one process without reloading them. `size`: the
    encoder size chosen and why (settings.train_config), for the first log line.
    """
    procs, device, own_group = setup_processes((cfg or TrainConfig()).run.device)
    try:
        run = check_run_dir(out)  # never over a file or a folder that is not a run
        cache = cache if cache is not None else open_cache(cache_url)
        job = start_run(run, cache, cfg, resume, procs, device, sources, size=size)
        loop, data, cfg = job.loop, job.data, job.cfg

        def loss_fn(batch: dict, weight: float) -> torch.Tensor:
            features, mask, positions = model_inputs(batch, loop.model.config, device)
            with autocast(device, cfg.run.amp):
                logits = loop.ddp(features, mask, positions)
            return clip_loss(logits, batch["labels"].to(device), cfg.optim, weight)

        run_epochs(loop, cfg.run, lambda epoch: epoch_batches(data, loop.state, epoch), loss_fn,
                   lambda: evaluate_views(loop.model, data.val, device, cfg.data.eval_batch_size, procs, cfg.run.amp),
                   progress)
        return finish_run(loop, val=data.val)
    finally:
        if own_group:
            dist.destroy_process_group()
