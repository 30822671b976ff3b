"""`vtn bench finetune`: peak memory and time per optimiser step of end-to-end fine-tuning under each memory
control, and what a clip costs end to end against stage two on the cache.

The frames are decoded from a generated video (vtn/synth.py); the model is a `VideoVTN` (temporal/e2e.py) of a
small timm backbone with random weights (nothing is downloaded) and a small VTN encoder (2 layers, d=128). One
step is what `vtn finetune` does per batch: preprocess, forward, cross-entropy, backward, AdamW step, fp32, train
mode with BatchNorm frozen (the memory controls' rows: exact) or as finetune's defaults choose for a random-init
backbone (BatchNorm on batch statistics: the default row and the backbone's own rows). Each measurement runs in a fresh process (forked from a server
that has imported torch and timm but run nothing, so no measurement inherits another's allocations): one warm-up
step, the median of `repeats` timed steps, then one more step for peak memory, the growth over the footprint
before it (activations, gradients, temporaries; the model and the optimiser state are there before), measured as
`vtn bench temporal` measures it (vtn/bench/common.py: CUDA max_memory_allocated; on the CPU the resident-set
high-water mark, reset just before the step, with glibc made to return freed buffers to the OS).

Controls, each alone, then the default (FinetuneSection's defaults):
- plain: every frame of the step through the backbone in one call, all activations kept for the backward pass;
- micro-batch: `micro_batch` frames per backbone call (activations of all calls still kept);
- grad checkpointing: timm's activation checkpointing in the backbone (and per layer in the encoder);
- chunked: exact chunked backprop over micro-batches (each recomputed in the backward pass);
- memory bank: only `bank_frames` frames of each clip run with gradients, the others' features are given.
And the compute a step cannot avoid: the backbone alone, forward + backward on the step's frames in one call (no
encoder, no optimiser), and its forward alone (what chunked backprop's recompute adds). The default step is
reported against the first (`vtn finetune`'s goal: at most 2x on a CPU). Then the chunked backprop's gradients against the plain ones (max abs difference), and seconds per clip of
stage-two training (the same VTN on the same clips' cached features, read from a cache through the training
pipeline) against end-to-end fine-tuning with the default controls.
"""

from __future__ import annotations

import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vtn.bench import common

CONTROLS = ("plain", "micro-batch", "grad checkpointing", "chunked", "memory bank", "default")
COMPUTE = ("backbone fwd+bwd", "backbone fwd")  # the backbone alone on the same frames
PHASES = ("preprocess", "forward", "backward", "optimiser")  # a step's parts, timed apart


@dataclass(frozen=True)
class FinetuneBenchConfig:
    """What `vtn bench finetune` measures; sized to take a few minutes on 2 shared CPU cores."""

    backbones: tuple[tuple[str, int], ...] = (("vit_tiny_patch16_224", 112), ("resnet18", 112))  # (timm name, px)
    lengths: tuple[int, ...] = (16, 64)  # frames per clip
    clips: int = 1  # clips per step
    micro_batch: int | None = None  # None: MICRO_BATCH in the micro-batch and chunked rows, the device's default in the default row
    bank_frames: int = 16  # K of the memory-bank row
    repeats: int = 2  # timed steps after one warm-up step
    stage_two_steps: int = 10  # timed stage-two steps
    threads: int = 1  # CPU threads per measurement: one keeps a loaded shared machine from stalling at barriers
    device: str = "auto"  # cpu, cuda, or auto (cuda where present)


def settings(control: str, micro_batch: int, bank_frames: int, default_micro: int | None = None) -> dict:
    """The `VideoVTN.set_memory` arguments and the bank size of one row of the table."""
    from vtn.temporal.finetune import FinetuneSection, provenance_defaults

    plain = {"micro_batch": None, "chunked": False, "grad_checkpointing": False, "bank_frames": None, "freeze_bn": True}
    if control in ("default", *COMPUTE):  # finetune's defaults for these random-init backbones
        ft, _ = provenance_defaults(FinetuneSection(), {"weights": "random-init"})
        return {"micro_batch": default_micro, "chunked": ft.chunked, "grad_checkpointing": ft.grad_checkpointing,
                "bank_frames": ft.bank_frames, "freeze_bn": ft.freeze_bn}
    return {**plain, **{"plain": {}, "micro-batch": {"micro_batch": micro_batch},
                        "grad checkpointing": {"grad_checkpointing": True},
                        "chunked": {"micro_batch": micro_batch, "chunked": True},
                        "memory bank": {"bank_frames": bank_frames}}[control]}


def _model(backbone: str, image_size: int, T: int, device, freeze_bn: bool = True):
    """A VideoVTN of the timm backbone (seeded random weights) and a small VTN, in train mode."""
    import torch

    from vtn.extract.backbone import Preprocess, create_backbone
    from vtn.temporal.e2e import VideoVTN
    from vtn.temporal.model import VTNConfig

    net, data_config, _ = create_backbone(backbone, image_size=image_size, seed=0)
    cfg = VTNConfig(feature_dim=int(net.num_features), hidden_size=128, num_layers=2, num_heads=4,
                    intermediate_size=512, attention_window=16, max_positions=max(T, 16), num_classes=4)
    torch.manual_seed(0)
    model = VideoVTN(cfg, net, Preprocess(data_config), {})
    model.freeze_bn = freeze_bn
    return model.to(device).train()


def measure(spec: dict) -> dict:
    """One (backbone, T, control) measurement in this process: median seconds per step and peak bytes."""
    import torch

    torch.set_num_threads(spec["threads"])
    device = common.device(spec["device"])
    T, clips = spec["T"], spec["clips"]
    s = settings(spec["control"], spec["micro_batch"], spec["bank_frames"], spec["default_micro"])
    model = _model(spec["backbone"], spec["image_size"], T, device, s["freeze_bn"])
    model.set_memory(s["micro_batch"], s["chunked"], s["grad_checkpointing"])
    frames = torch.from_numpy(np.load(spec["frames"])[:T]).to(device)  # [T, H, W, 3] uint8
    frames = frames.expand(clips, *frames.shape)  # [B, T, H, W, 3]
    positions = torch.arange(T, device=device).expand(clips, T)
    labels = torch.arange(clips, device=device) % model.config.num_classes
    bank = fresh = None
    if s["bank_frames"] is not None and s["bank_frames"] < T:
        # The bank's features stand for the cached ones; K contiguous frames of each clip are fresh.
        bank = torch.randn(clips, T, model.config.feature_dim, device=device)
        fresh = torch.zeros(clips, T, dtype=torch.bool, device=device)
        fresh[:, (T - s["bank_frames"]) // 2:(T + s["bank_frames"]) // 2] = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    phases: dict[str, list[float]] = {p: [] for p in PHASES}

    def lap(phase: str, tick: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        phases[phase].append(now - tick)
        return now

    def step():
        tick = time.perf_counter()
        with torch.no_grad():
            x = model.preprocess(frames[fresh] if bank is not None else frames.flatten(0, 1))  # [N, 3, h, w]
        tick = lap("preprocess", tick)
        if spec["control"] in COMPUTE:  # the backbone alone, all frames in one call
            with torch.set_grad_enabled(spec["control"] == "backbone fwd+bwd"):
                out = model.backbone(x).sum()
            if out.requires_grad:
                out.backward()
                model.zero_grad(set_to_none=True)
            return
        if bank is None:
            x = x.view(clips, T, *x.shape[1:])  # [B, T, 3, h, w]
        loss = torch.nn.functional.cross_entropy(model(x, None, positions, bank=bank, fresh=fresh), labels)
        tick = lap("forward", tick)
        loss.backward()
        tick = lap("backward", tick)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lap("optimiser", tick)

    step()  # warm-up: lazy initialisation, the optimiser's state
    times = []
    for p in PHASES:
        phases[p].clear()
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    split = {p: statistics.median(v) for p, v in phases.items() if v}
    peak = common.cuda_peak_bytes(step) if device.type == "cuda" else common.cpu_peak_bytes(step)
    return {"seconds": statistics.median(times), "peak_bytes": peak, "phases": split}


def gradient_difference(spec: dict) -> dict:
    """Max abs difference between plain and chunked backprop's gradients over all parameters, one step's worth
    (same frames, same seed), and the largest gradient for scale."""
    import torch

    torch.set_num_threads(spec["threads"])
    device = common.device(spec["device"])
    T = spec["T"]
    model = _model(spec["backbone"], spec["image_size"], T, device)
    x = model.preprocess(torch.from_numpy(np.load(spec["frames"])[:T]).to(device))[None]  # [1, T, 3, h, w]
    positions = torch.arange(T, device=device)[None]

    def grads(**memory):
        model.set_memory(**memory)
        torch.manual_seed(1)  # the same dropout draws
        torch.nn.functional.cross_entropy(model(x, None, positions), torch.tensor([1], device=device)).backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out

    plain, chunked = grads(), grads(micro_batch=spec["micro_batch"], chunked=True)
    return {"max_abs_diff": max(float((plain[n] - chunked[n]).abs().max()) for n in plain),
            "max_abs_grad": max(float(g.abs().max()) for g in plain.values())}


def stage_two_seconds_per_clip(spec: dict) -> float:
    """Seconds per clip of stage-two training steps on the same clips' features: the backbone's features of the
    frames (eval mode, no gradients) written to a cache of 8 videos, trained on with stage two's pipeline."""
    import torch

    from vtn.bench.encoder import encoder_clips_per_second
    from vtn.store import CacheWriter

    torch.set_num_threads(spec["threads"])
    device = common.device(spec["device"])
    T = spec["T"]
    model = _model(spec["backbone"], spec["image_size"], T, device).eval()
    with torch.no_grad():
        feats = model.backbone(model.preprocess(torch.from_numpy(np.load(spec["frames"])[:T]).to(device)))
    feats = feats.float().cpu().numpy()  # [T, D]
    with tempfile.TemporaryDirectory(prefix="vtn-bench-finetune-") as tmp:
        cache = f"{tmp}/cache.zarr"
        with CacheWriter(cache, feature_dim=feats.shape[1], class_names=[f"c{i}" for i in range(4)]) as w:
            for v in range(8):
                w.add(f"v{v}.mp4", feats, np.arange(T) / 25, np.arange(T), label=v % 4, split="train")
        torch.manual_seed(0)
        return 1.0 / encoder_clips_per_second(cache, model.config, T, 1, spec["clips"], spec["stage_two_steps"], device)


def _call(kind: str, spec: dict):
    return {"step": measure, "grad": gradient_difference, "stage_two": stage_two_seconds_per_clip}[kind](spec)


def generated_frames(path: Path, frames: int) -> Path:
    """`frames` RGB frames decoded from a generated video (112x80 px, 25 fps), saved as one .npy file."""
    import av

    from vtn import synth

    video = synth.make_video(path.with_suffix(".mp4"), synth.CLASSES[0], seconds=frames / 25 + 0.5, fps=25,
                             size=(112, 80), seed=0)
    with av.open(str(video)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    np.save(path, np.stack(decoded[:frames]))  # [frames, 80, 112, 3] uint8
    return path


def run(cfg: FinetuneBenchConfig = FinetuneBenchConfig()) -> dict:
    """Measure every (backbone, clip length, control), the chunked gradient check and stage two vs end to end;
    print the tables; return {"rows": [...], "gradients": [...], "speed": [...]}."""
    import torch

    from vtn.temporal.finetune import MICRO_BATCH, FinetuneSection, micro_batch_for

    micro = cfg.micro_batch or MICRO_BATCH
    ctx = multiprocessing.get_context("forkserver")
    # The server imports torch and timm once; each measurement is a fresh process forked from it.
    ctx.set_forkserver_preload(["torch", "timm", "vtn.temporal.e2e", "vtn.bench.finetune"])
    rows, gradients, speed = [], [], []
    with tempfile.TemporaryDirectory(prefix="vtn-bench-finetune-") as tmp, \
            ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:
        frames = str(generated_frames(Path(tmp) / "frames.npy", max(cfg.lengths)))
        device = cfg.device if cfg.device != "auto" else pool.submit(_call_device).result()
        default_micro = cfg.micro_batch or micro_batch_for(FinetuneSection(), torch.device(device))

        def isolated(kind: str, **spec):
            base = {"frames": frames, "clips": cfg.clips, "micro_batch": micro, "default_micro": default_micro,
                    "bank_frames": cfg.bank_frames,
                    "repeats": cfg.repeats, "threads": cfg.threads, "device": device,
                    "stage_two_steps": cfg.stage_two_steps}
            return pool.submit(_call, kind, {**base, **spec}).result()

        print(f"vtn bench finetune: {device}" + (f", {cfg.threads} threads per measurement (a shared machine: other "
              "work on its cores slows the times)" if device == "cpu" else "")
              + f"; {cfg.clips} clip(s) per step of frames decoded from a generated video; random-init backbone + "
              "2-layer VTN (d=128), fp32, train mode, BatchNorm frozen (default and backbone rows: on batch "
              f"statistics, finetune's default for a random-init backbone); one warm-up step, median of {cfg.repeats} "
              "timed steps (preprocess, forward, backward, AdamW step); peak = memory growth during one more step; "
              f"micro-batch {micro} frames, memory bank K={cfg.bank_frames}; default = FinetuneSection's (micro_batch "
              f"{default_micro or 'off'} on {device}, chunked when a step has more frames than that)", flush=True)
        print(f"{'backbone':<26}{'T':>4}  {'control':<20}{'peak MiB':>10}{'x plain':>9}{'s/step':>9}", flush=True)
        for name, size in cfg.backbones:
            for T in cfg.lengths:
                plain = None
                for control in (*CONTROLS, *COMPUTE):
                    m = isolated("step", backbone=name, image_size=size, T=T, control=control)
                    plain = plain or m["peak_bytes"]
                    r = {"backbone": name, "image_size": size, "T": T, "control": control, **m,
                         "x_plain": m["peak_bytes"] / plain}
                    rows.append(r)
                    print(f"{f'{name} @{size}':<26}{T:>4}  {control:<20}{m['peak_bytes'] / 2**20:>10.1f}"
                          f"{r['x_plain']:>9.2f}{m['seconds']:>9.2f}", flush=True)
        print_compute(rows, default_micro, cfg.clips)
        T = max(cfg.lengths)
        print(f"\nexact chunked backprop (micro-batch {micro}) vs plain, one {T}-frame clip: gradients of every "
              "parameter", flush=True)
        for name, size in cfg.backbones:
            g = isolated("grad", backbone=name, image_size=size, T=T)
            gradients.append({"backbone": name, "T": T, **g})
            print(f"  {f'{name} @{size}':<26} max abs diff {g['max_abs_diff']:.2e} (largest gradient "
                  f"{g['max_abs_grad']:.2e})", flush=True)
        print(f"\nseconds per clip: stage two on cached features (same VTN, same clips, {cfg.clips} clip(s) per "
              "step, read from a cache) vs end-to-end fine-tuning (default controls)", flush=True)
        print(f"{'backbone':<26}{'T':>4}{'stage two':>12}{'end to end':>12}{'ratio':>9}", flush=True)
        for name, size in cfg.backbones:
            for T in cfg.lengths:
                cached = isolated("stage_two", backbone=name, image_size=size, T=T)
                e2e = next(r["seconds"] for r in rows if (r["backbone"], r["T"], r["control"]) == (name, T, "default"))
                e2e /= cfg.clips
                speed.append({"backbone": name, "T": T, "stage_two": cached, "end_to_end": e2e})
                print(f"{f'{name} @{size}':<26}{T:>4}{cached:>12.4f}{e2e:>12.3f}{e2e / cached:>8.0f}x", flush=True)
    return {"rows": rows, "gradients": gradients, "speed": speed}


def print_compute(rows: list[dict], micro: int | None, clips: int) -> None:
    """The default step against the backbone's own forward + backward on the same frames, and what the rest is."""
    print(f"\nthe default step against its compute: the backbone alone, forward + backward of the step's frames in one "
          f"call; the default's chunked recompute is one more backbone forward (micro-batches: {micro or 'off'})",
          flush=True)
    print(f"{'backbone':<26}{'T':>4}{'step s':>9}{'bb f+b s':>10}{'x compute':>11}{'recompute s':>13}"
          f"{'rest s':>9}   the step's parts, s", flush=True)
    for (name, size, T) in dict.fromkeys((r["backbone"], r["image_size"], r["T"]) for r in rows):
        got = {r["control"]: r for r in rows if (r["backbone"], r["T"]) == (name, T)}
        step, both, fwd = (got[c]["seconds"] for c in ("default", "backbone fwd+bwd", "backbone fwd"))
        recompute = fwd if micro and clips * T > micro else 0.0
        parts = ", ".join(f"{p} {v:.3f}" for p, v in got["default"].get("phases", {}).items())
        print(f"{f'{name} @{size}':<26}{T:>4}{step:>9.3f}{both:>10.3f}{step / both:>10.2f}x{recompute:>13.3f}"
              f"{step - both - recompute:>9.3f}   {parts}", flush=True)
    print("  (a run's own time outside its steps, waiting for decoded clips, evaluating, checkpoints, is printed by "
          "`vtn finetune` at its end)", flush=True)


def _call_device() -> str:
    return str(common.device("auto"))


def main(args) -> int:
    """`vtn bench finetune` with its flags applied to FinetuneBenchConfig."""
    cfg = FinetuneBenchConfig()
    given = {k: getattr(args, k) for k in ("clips", "repeats", "threads", "micro_batch", "bank_frames")
             if getattr(args, k) is not None}
    if args.lengths:
        given["lengths"] = tuple(args.lengths)
    if args.backbones:
        given["backbones"] = tuple((b, args.image_size or 112) for b in args.backbones)
    elif args.image_size:
        given["backbones"] = tuple((b, args.image_size) for b, _ in cfg.backbones)
    run(replace(cfg, device=args.device, **given))
    return 0
