"""`vtn bench temporal`: forward+backward time and peak memory of the `hf` and `fast` encoder backends.

Each (device, windows, T, backend) runs in a fresh Python process, so one measurement's allocations never
flatter or burden the next. Time is the median of `repeats` steps after a warm-up step, in train mode
(dropout on), fp32. Peak memory is the growth during one more step over the footprint before it (model,
inputs, initialised libraries): activations and parameter gradients. On CUDA it is
torch.cuda.max_memory_allocated; on the CPU the resident-set high-water mark (see common.cpu_peak_bytes).

Then training throughput from the cache next to what the backbone would cost: why stage two is fast.
Stage two trains the encoder + head on cached features; end-to-end training also runs the backbone forward
and backward over every frame of every clip. `throughput` measures both on this machine and prints the ratio:
- encoder + head: clips/s of real training steps (forward, backward, optimiser step) on clips read from
  the cache with the training pipeline (ClipDataset, collate, normalisation), data loading included;
- backbone: forward + backward of the timm model over `clip_frames` frames, on a few clips of random
  frames (the backbone's cost does not depend on the pixels), extrapolated to clips/s.
The backbone defaults to the one recorded in the cache's attributes, at its preprocessing size, with
random weights (nothing is downloaded).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from vtn.bench import common

WINDOW_SETS = ((16, 32, 64), (256,))
LENGTHS = (16, 64, 256, 1024, 4096)
FRAMES_PER_STEP = 512  # 32 clips of 16 frames, 8 of 64, 2 of 256, 1 of 1024 or 4096


@dataclass(frozen=True)
class BenchConfig:
    """What `vtn bench temporal` measures; modest sizes so the CPU run takes a few minutes on 2 cores."""

    batch: int | None = None  # clips per step; None: about FRAMES_PER_STEP frames, as training batches are sized
    hidden: int = 256
    heads: int = 4
    lengths: tuple[int, ...] = LENGTHS
    repeats: int = 3
    threads: int = 1  # CPU threads; one keeps timings stable on a shared machine (idle threads stall at barriers)
    devices: tuple[str, ...] = ("cpu", "cuda")  # cuda is skipped where there is none


def measure(device: str, backend: str, windows: list[int], T: int, batch: int, hidden: int, heads: int,
            repeats: int, threads: int) -> dict:
    """One fwd+bwd measurement in this process: median seconds and peak memory growth in bytes."""
    import torch

    torch.set_num_threads(threads)

    from vtn.temporal.model import VTN, VTNConfig

    torch.manual_seed(0)
    config = VTNConfig(
        feature_dim=hidden, hidden_size=hidden, num_layers=len(windows), num_heads=heads,
        intermediate_size=4 * hidden, attention_window=tuple(windows), max_positions=T, num_classes=10,
        backend=backend,
    )
    model = VTN(config).to(device).train()
    features = torch.randn(batch, T, hidden, device=device)
    mask = torch.ones(batch, T, dtype=torch.bool, device=device)
    positions = torch.arange(T, device=device).expand(batch, T)

    def step():
        model(features, mask, positions).sum().backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: lazy initialisation (kernels, thread pools, allocator caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = common.cuda_peak_bytes(step) if device == "cuda" else common.cpu_peak_bytes(step)
    return {"seconds": statistics.median(times), "peak_bytes": peak}


def measure_in_subprocess(**spec) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "vtn.bench.encoder", json.dumps(spec)], capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"benchmark of {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(cfg: BenchConfig) -> list[dict]:
    """Measure every combination and print one table per device; returns the rows."""
    import torch

    devices = [d for d in cfg.devices if d == "cpu" or torch.cuda.is_available()]
    rows = []
    for device in devices:
        batches = "max(1, 512 / T) clips" if cfg.batch is None else f"{cfg.batch} clips"
        print(f"\nvtn bench temporal: {device}, batch {batches}, hidden {cfg.hidden}, {cfg.heads} heads, "
              f"FFN {4 * cfg.hidden}, one layer per window, fp32, train mode, {cfg.threads} CPU thread(s); "
              f"forward+backward, median of {cfg.repeats}; peak = memory growth during a step")
        print(f"{'windows':<14}{'T':>6}{'batch':>6}{'hf ms':>10}{'fast ms':>10}{'speed-up':>10}{'hf MiB':>10}{'fast MiB':>10}"
              f"{'fast KiB/frame':>16}")
        for windows in WINDOW_SETS:
            for T in cfg.lengths:
                batch = cfg.batch or max(1, FRAMES_PER_STEP // T)
                r = {"device": device, "windows": list(windows), "T": T, "batch": batch}
                for backend in ("hf", "fast"):
                    m = measure_in_subprocess(device=device, backend=backend, windows=list(windows), T=T,
                                              batch=batch, hidden=cfg.hidden, heads=cfg.heads,
                                              repeats=cfg.repeats, threads=cfg.threads)
                    r[backend] = m
                rows.append(r)
                hf, fast = r["hf"], r["fast"]
                print(f"{str(list(windows)):<14}{T:>6}{batch:>6}{hf['seconds'] * 1e3:>10.1f}{fast['seconds'] * 1e3:>10.1f}"
                      f"{hf['seconds'] / fast['seconds']:>9.1f}x{hf['peak_bytes'] / 2**20:>10.1f}"
                      f"{fast['peak_bytes'] / 2**20:>10.1f}{fast['peak_bytes'] / 1024 / (batch * T):>16.1f}",
                      flush=True)
    return rows


# -- training throughput from the cache next to what the backbone would cost ---------------------------------

def encoder_clips_per_second(cache_url: str, model: VTNConfig, clip_frames: int, stride: int, batch_size: int,
                             steps: int, device: torch.device, split: str = "train") -> float:
    """Clips/s of `steps` AdamW training steps on clips of the cache's split (after one warm-up step)."""
    import torch
    import torch.nn.functional as F

    from vtn.store import open_cache
    from vtn.store.dataset import ClipDataset, LengthBucketSampler, collate_clips
    from vtn.temporal.data import feature_stats, model_inputs, split_source
    from vtn.temporal.model import VTN

    cache = open_cache(cache_url)
    source = split_source(cache, split)
    dataset = ClipDataset(source, split=split, clip_frames=clip_frames, stride=stride, train=True)
    batches = list(LengthBucketSampler(dataset.sample_lengths(), batch_size, seed=0))
    batches = (batches * (steps // max(len(batches), 1) + 2))[: steps + 1]  # repeat a small split's batches
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_clips)
    vtn = VTN(model).to(device).train()
    vtn.set_feature_stats(*feature_stats(dataset, cache_url))
    opt = torch.optim.AdamW(vtn.parameters(), lr=1e-4)
    clips, start = 0, None
    for i, batch in enumerate(loader):
        if i == 1:  # the first step (allocations, kernel selection) is not timed
            common.sync(device)
            start = time.perf_counter()
        features, mask, positions = model_inputs(batch, model, device)
        labels = batch["labels"].clamp_min(0).to(device)
        F.cross_entropy(vtn(features, mask, positions), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clips += len(labels) if i >= 1 else 0
    common.sync(device)
    return clips / (time.perf_counter() - start)


def backbone_clips_per_second(name: str, image_size: int, clip_frames: int, clips: int,
                              device: torch.device) -> float:
    """Clips/s of the backbone's forward + backward over `clip_frames` frames per clip (after a warm-up)."""
    import timm
    import torch

    kwargs = {"img_size": image_size} if "vit" in name or "deit" in name else {}
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).to(device).train()
    frames = torch.randn(clip_frames, 3, image_size, image_size, device=device)
    for i in range(clips + 1):
        if i == 1:
            common.sync(device)
            start = time.perf_counter()
        net(frames).float().sum().backward()
        net.zero_grad(set_to_none=True)
    common.sync(device)
    return clips / (time.perf_counter() - start)


def throughput(cache: str, model: VTNConfig | None = None, clip_frames: int = 16, stride: int = 8,
               batch_size: int = 32, steps: int = 10, backbone: str | None = None, image_size: int | None = None,
               backbone_clips: int = 2, device: str = "auto") -> dict:
    """Measure and print encoder + head training clips/s from `cache` and the backbone's clips/s; returns both.

    `model` defaults to the paper's configuration (VTNConfig defaults) with the cache's feature dimension and
    class count. `backbone` / `image_size` default to the cache's recorded backbone and preprocessing size.
    """
    import torch

    from vtn.store import open_cache
    from vtn.temporal.model import VTNConfig

    dev = common.device(device)
    c = open_cache(cache)
    model = model or VTNConfig(feature_dim=c.feature_dim, num_classes=max(1, len(c.class_names)))
    recorded = c.attrs.get("backbone", {})
    backbone = backbone or recorded.get("name") or "vit_base_patch16_224"
    size = image_size or (recorded.get("preprocessing", {}).get("input_size") or [3, 224, 224])[-1]
    torch.manual_seed(0)
    encoder = encoder_clips_per_second(cache, model, clip_frames, stride, batch_size, steps, dev)
    spatial = backbone_clips_per_second(backbone, size, clip_frames, backbone_clips, dev)
    ratio = encoder / spatial  # (backbone + encoder) time per clip over encoder time per clip, less the 1
    print(f"training throughput on {dev}, clips of {clip_frames} frames:")
    print(f"  encoder + head from the cache   {encoder:10.1f} clips/s  ({model.num_layers} layers, d={model.hidden_size}, "
          f"batch {batch_size}; fwd+bwd+step, data loading included)")
    print(f"  backbone {backbone} @{size}  {spatial:10.2f} clips/s  (fwd+bwd over {clip_frames} frames, "
          f"{backbone_clips} clips)")
    print(f"  end-to-end pays {1 + ratio:.0f}x the time per clip of training on the cache "
          f"(the backbone alone {ratio:.0f}x)")
    return {"device": str(dev), "encoder_clips_per_s": encoder, "backbone": backbone, "image_size": size,
            "backbone_clips_per_s": spatial, "end_to_end_over_cached": 1 + ratio}


def throughput_bench(cache: str | None = None, backbone: str | None = None, device: str | None = None) -> dict:
    """`vtn bench temporal`'s throughput part: on `cache`, or on a synthetic cache shaped like ViT-B/16
    features of Kinetics clips (768-D, 10 s at 8 sampled frames per second), built in a temporary folder."""
    import shutil
    import tempfile

    import numpy as np

    from vtn.store import CacheWriter

    tmp = None
    if cache is None:
        tmp = tempfile.mkdtemp(prefix="vtn-bench-temporal-")
        cache = f"{tmp}/cache.zarr"
        rng = np.random.default_rng(0)
        classes = [f"class{i}" for i in range(10)]
        attrs = {"backbone": {"name": "vit_base_patch16_224", "preprocessing": {"input_size": [3, 224, 224]}}}
        with CacheWriter(cache, feature_dim=768, class_names=classes, attrs=attrs) as w:
            for v in range(400):
                w.add(f"class{v % 10}/{v:04d}.mp4", rng.standard_normal((80, 768)), np.arange(80) / 8, np.arange(80) * 3,
                      label=v % 10, split="val" if v % 5 == 0 else "train")
    try:
        return throughput(cache, backbone=backbone, device=device or "auto")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # one measurement, run by measure_in_subprocess
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
