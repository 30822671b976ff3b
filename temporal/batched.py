"""Batched stage-two runs: members that differ only in seed, learning rate and weight decay, trained as one model.

The members' weights are stacked (one [members, ...] tensor per parameter) and `members_forward`, VTN.forward
vmapped over the members' weights, computes every member's logits in one pass; each member's loss is
weighted exactly as its own `vtn train` run weights it, and the summed loss's backward gives every member its
own gradient. Each member keeps its own VTN module, AdamW/SGD optimiser (its lr and weight decay), schedule,
counters and run directory, all through temporal/loop.py's pieces (`start_run`, `set_lr`, `finish_step`,
`step_checkpoint`, `close_epoch`, `gathered_metrics`, `finish_run`), so every member is a normal `vtn train` run:
config.yaml, metrics.jsonl, best/, last/, and `vtn evaluate` and `vtn train --resume` work on it. Evaluation is
batched too: one pass over the val videos gives every member's logits (`members_predict`).

Equal to the separate runs. A member is initialised from its seed as its separate run is (`start_run` seeds
the same way), and draws the same clips in the same order: clips come from (seed, epoch, item) and the batch
order from (seed, epoch) (store/dataset.py), so each member takes its own batch at every step. Batches of
different members are padded to a common shape (masked frames; stand-in clips weighted 0), which changes the
result only by float rounding. What cannot be made equal is dropout: a separate run draws its masks from the
global generator inside fused kernels (scaled_dot_product_attention's attention dropout among them), which the
batched pass cannot replay. So only runs without dropout (model.dropout, attention_dropout and head_dropout all
0), with fp32 or bf16 autocast (fp16's loss scaler is per run) and the `fast` backend are batched; every other
run trains on its own (`batch_key` says which). tests/temporal/test_sweep.py proves the equality.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from vtn.config import to_dict
from vtn.errors import UserError
from vtn.progress import progress_bar
from vtn.runtime import autocast, setup_processes
from vtn.store.dataset import ClipDataset, LengthBucketSampler, collate_clips
from vtn.temporal.data import model_inputs
from vtn.temporal.model import VTN
from vtn.paths import check_run_dir
from vtn.temporal.loop import (close_epoch, epoch_batches, eval_interval, finish_run, finish_step, gathered_metrics,
                               set_lr, start_run, step_checkpoint)
from vtn.temporal.settings import TrainConfig

# What batched members may differ in; everything else of their configs must be equal.
MEMBER_KEYS = (("run", "seed"), ("optim", "lr"), ("optim", "weight_decay"))


def unbatchable(cfg: TrainConfig) -> str | None:
    """Why this run cannot train batched (see the module docstring), in words a user can act on; None if it can."""
    m = cfg.model
    dropout = {k: getattr(m, k) for k in ("dropout", "attention_dropout", "head_dropout") if getattr(m, k)}
    if dropout:
        return "dropout is on (" + ", ".join(f"model.{k}={v:g}" for k, v in dropout.items()) + "; set them to 0 to batch)"
    if cfg.run.amp == "fp16":
        return "run.amp=fp16 (its loss scaler is per run)"
    if m.backend != "fast":
        return f"model.backend={m.backend} (only the fast backend batches)"
    if cfg.optim.steps is None and cfg.optim.epochs is None:
        return "the default length (each run stops on its own val; set optim.steps or optim.epochs to batch)"
    return None


def batch_key(cfg: TrainConfig) -> str | None:
    """Runs with the same key can train as one batched model; None: this run trains on its own (`unbatchable`)."""
    if unbatchable(cfg):
        return None
    shared = to_dict(cfg)
    for section, key in MEMBER_KEYS:
        del shared[section][key]
    return json.dumps(shared, sort_keys=True)


def _pad(inputs: list[tuple], labels: list[torch.Tensor], weights: list[float], device: torch.device):
    """Each member's (features [B, T, D], mask, positions) padded to the largest B and T and stacked: [M, B, T, ...];
    labels [M, B]; per-clip loss weights [M, B] (the member's batch weight, 0 for a stand-in clip)."""
    B = max(len(y) for y in labels)
    T = max(x.shape[1] for x, _, _ in inputs)
    xs, ms, ps, ys, ws = [], [], [], [], []
    for (x, m, p), y, w in zip(inputs, labels, weights):
        b, t = x.shape[:2]
        extra = [0] * (B - b)  # stand-in clips: copies of the first, weighted 0
        xs.append(F.pad(x, (0, 0, 0, T - t))[[*range(b), *extra]])
        ms.append(F.pad(m, (0, T - t), value=False)[[*range(b), *extra]])
        if p is not None:
            ps.append(F.pad(p, (0, T - t))[[*range(b), *extra]])
        ys.append(y.to(device)[[*range(b), *extra]])
        ws.append(torch.tensor([w] * b + [0.0] * (B - b), device=device))
    return torch.stack(xs), torch.stack(ms), torch.stack(ps) if ps else None, torch.stack(ys), torch.stack(ws)


def members_forward(template: VTN, w: dict, features: torch.Tensor, mask: torch.Tensor,
                    positions: torch.Tensor | None) -> torch.Tensor:
    """Logits [M, B, classes] of M members of `template`'s architecture (a VTN without dropout) whose parameters
    and buffers, by VTN's state-dict names, are stacked in `w` ([M, ...] each): VTN.forward itself, run on every
    member's weights at once (torch.func.vmap of torch.func.functional_call), so the weighted layers run as one
    batched matmul over the members.

    features [M, B, T, D]; mask [M, B, T] bool; positions [M, B, T] long (checked by each member's own
    VTN._frame_positions beforehand), or None with positions="none".
    """
    def member(weights: dict, x: torch.Tensor, m: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        return functional_call(template, weights, (x, m, p), {"positions_checked": True})

    # The CPU's fused attention kernel has no vmap batching rule (vmap would call it once per member); its math
    # form batches. CUDA's fused kernels have one.
    with sdpa_kernel(SDPBackend.MATH) if features.device.type == "cpu" else contextlib.nullcontext():
        return vmap(member, in_dims=(0, 0, 0, None if positions is None else 0))(w, features, mask, positions)


def stacked(models: list[VTN]) -> dict:
    """The members' parameters and buffers stacked, [M, ...] each by VTN's state-dict names, for members_forward.
    Stacked afresh at every step (the members' own tensors change in their optimiser steps); the backward pass
    through the stack gives each member's parameters their own gradient."""
    tensors = [dict(itertools.chain(mod.named_parameters(), mod.named_buffers())) for mod in models]
    return {n: torch.stack([t[n] for t in tensors]) for n in models[0].state_dict()}


@torch.no_grad()
def members_predict(models: list[VTN], dataset: ClipDataset, device: torch.device, batch_size: int,
                    amp: str) -> tuple[np.ndarray, np.ndarray]:
    """Every member's logits [M, n, classes] (float32) of the dataset's items, and their indices into the
    dataset: `predict` (temporal/data.py) for all members in one pass over the data."""
    batches = list(LengthBucketSampler(dataset.sample_lengths(), batch_size, shuffle=False))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_clips)
    w, M, out = stacked(models), len(models), []
    for batch in loader:
        x, m, p = model_inputs(batch, models[0].config, device)
        with autocast(device, amp):
            logits = members_forward(models[0], w, x.expand(M, *x.shape), m.expand(M, *m.shape),
                                     None if p is None else p.expand(M, *p.shape))
        out.append(logits.float().cpu())
    index = np.array([i for b in batches for i in b], dtype=np.int64)
    logits = torch.cat(out, dim=1).numpy() if out else np.zeros((M, 0, models[0].config.num_classes), np.float32)
    return logits, index


def train_batched(cache, runs: list[tuple[Path, TrainConfig]], sources: dict | None = None,
                  progress: bool = True) -> list[dict]:
    """Train the fresh runs `runs` ((run directory, config) with one `batch_key`) together; returns each run's
    summary, as `train` would."""
    keys = {batch_key(cfg) for _, cfg in runs}
    if len(keys) != 1 or None in keys:
        raise UserError("batched runs must share everything but run.seed, optim.lr and optim.weight_decay, and have "
                        "no dropout, fp16 or hf backend: " + ", ".join(str(r) for r, _ in runs))
    procs, device, _ = setup_processes(runs[0][1].run.device)
    if procs.world > 1:
        raise UserError("batched runs train in one process; run vtn sweep without torchrun")
    jobs = [start_run(check_run_dir(run), cache, cfg, False, procs, device, sources, announce=False)
            for run, cfg in runs]
    steps = {(j.loop.state["epochs"], j.loop.state["total_steps"]) for j in jobs}
    if len(steps) != 1:  # the same data and schedule give the same steps; guard against a future difference
        raise UserError(f"batched runs have different schedules {sorted(steps)}: {[str(r) for r, _ in runs]}")
    models = [j.loop.model for j in jobs]
    cfg, epochs, total = jobs[0].cfg, jobs[0].loop.state["epochs"], jobs[0].loop.state["total_steps"]
    every = eval_interval(epochs, cfg.run.eval_every)
    bar = progress_bar(total=total, disable=not progress, unit="step",
                       desc=f"{len(jobs)} batched runs")
    started = time.perf_counter()
    for j in jobs:
        j.loop.started = started
        j.loop.model.train()
    for epoch in range(epochs):
        loaders = [epoch_batches(j.data, j.loop.state, epoch) for j in jobs]
        for step in zip(*(zip(loader, weights) for loader, weights in loaders)):
            inputs = []
            for j, (batch, _) in zip(jobs, step):
                set_lr(j.loop)
                x, m, p = model_inputs(batch, j.loop.model.config, device)
                if p is not None:
                    j.loop.model._frame_positions(p, m)  # refuses positions outside the table, as a run does
                inputs.append((x, m, p))
            x, m, p, y, w = _pad(inputs, [b["labels"] for b, _ in step], [wt for _, wt in step], device)
            with autocast(device, cfg.run.amp):
                logits = members_forward(models[0], stacked(models), x, m, p)  # [M, B, classes]
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none",
                                     label_smoothing=cfg.optim.label_smoothing).view(y.shape)
            member_loss = (losses * w).sum(1)  # [M]: each member's loss, weighted as its own run weights it
            member_loss.sum().backward()  # members share no tensor, so each gets exactly its own gradient
            for j, value in zip(jobs, member_loss.tolist()):
                finish_step(j.loop, value)
                step_checkpoint(j.loop, cfg.run.checkpoint_every)
            bar.update()
        # Members share the schedule, so all evaluate at the same epochs: the first member's close_epoch that
        # evaluates runs every member's evaluation in one pass over the val videos (the same for all members).
        evaluated = []

        def evaluate(i: int) -> dict:
            if not evaluated:
                logits, index = members_predict(models, jobs[0].data.val, device, cfg.data.eval_batch_size,
                                                cfg.run.amp)
                labels = jobs[0].data.val.labels[index]
                evaluated.extend(gathered_metrics(member, labels, procs) for member in logits)
            return evaluated[i]

        for i, j in enumerate(jobs):
            close_epoch(j.loop, epoch, epochs, every, cfg.run.checkpoint_every, lambda i=i: evaluate(i))
    bar.close()
    return [finish_run(j.loop, announce=False, val=j.data.val) for j in jobs]
