"""`vtn bench inference`: the paper's inference argument, measured: one view over the whole video (`full`) against
PySlowFast's 10 clips x 3 crops (`10x3`), from raw video, on the same generated videos with the same model.

The model is trained as `vtn demo` trains it (generated videos whose classes differ only in the order of events,
a random-init ViT-Tiny), then `vtn predict`'s Predictor runs each mode over the val videos. Printed per mode:
seconds per video, frames through the backbone per video, top-1.

`latency`: what one short clip costs a user, with a real backbone (ViT-B/16, random init): a warm Predictor's
seconds against the backbone's own time for the same number of frames (the rest is decoding, preprocessing,
batching and the encoder: the goal is at most 1.5x), and a cold `vtn predict` process (imports, model build).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run(videos_per_class: int = 6, views: tuple[str, ...] = ("full", "10x3"), workdir: str | None = None,
        workers: int = 0, device: str = "auto", train_videos: int = 40, steps: int | None = None) -> dict:
    from vtn.config import merge, resolve
    from vtn.demo import BACKBONE, SAMPLING, TRAIN_SETS
    from vtn.evaluate.predict import Predictor, entries_of
    from vtn.extract import job as extract_job
    from vtn import synth
    from vtn.extract.config import ExtractConfig, RuntimeConfig
    from vtn.temporal.settings import TrainConfig
    from vtn.temporal.loop import fit

    work = Path(workdir or tempfile.mkdtemp(prefix="vtn-bench-inference-"))
    try:
        data, cache, run_dir = work / "videos", str(work / "cache"), work / "run"
        if not data.exists():
            synth.make_dataset(data, per_split={"train": train_videos, "val": videos_per_class}, seed=0)
        if not (run_dir / "best").exists():
            print("training the model (as vtn demo does)", flush=True)
            cfg = merge(ExtractConfig(), {"backbone": BACKBONE, "sampling": SAMPLING,
                                          "runtime": {"device": "cpu", "workers": 0, "progress": False}})
            extract_job.run(cfg, data, cache, overwrite=True)
            length = {"optim": {"steps": steps}} if steps else {}
            fit(cache, run_dir, merge(resolve(TrainConfig, None, TRAIN_SETS), {"run": {"device": "cpu"}, **length}),
                progress=False)
        entries, classes = entries_of(data / "val")
        results = {}
        for mode in views:
            predictor = Predictor.from_run(run_dir, views=mode, runtime=RuntimeConfig(device=device, workers=workers,
                                                                                       progress=False))
            predictor.predict(entries[:2])  # warm-up: allocations, thread pools
            started = time.perf_counter()
            out = predictor.predict(entries)
            seconds = time.perf_counter() - started
            top1 = np.mean([predictor.class_names[int(np.argmax(r["logits"]))] == classes[r["label"]] for r in out])
            results[mode] = {"videos": len(out), "seconds_per_video": seconds / len(out),
                             "frames_per_video": float(np.mean([r["frames_through_backbone"] for r in out])),
                             "top1": float(top1)}
        print(f"\n{len(entries)} generated val videos ({synth.CLASSES[0]} ... {len(classes)} classes), backbone "
              f"{BACKBONE['name']} at {BACKBONE['image_size']} px on {predictor.device}, {workers} decode workers")
        for mode, r in results.items():
            print(f"{mode:>6}: {r['seconds_per_video'] * 1000:7.1f} ms per video, {r['frames_per_video']:6.1f} frames "
                  f"through the backbone per video, top-1 {r['top1']:.1%}")
        if "full" in results and "10x3" in results:
            full, multi = results["full"], results["10x3"]
            frame_ratio = multi["frames_per_video"] / full["frames_per_video"]
            time_ratio = multi["seconds_per_video"] / full["seconds_per_video"]
            print(f"10x3 runs {frame_ratio:.2f}x the frames of full and takes {time_ratio:.2f}x its time: full gets "
                  f"{time_ratio / frame_ratio:.2f} of the speed-up its frame count allows (target >= 0.8); top-1 "
                  f"full {full['top1']:.1%} vs 10x3 {multi['top1']:.1%}")
        return results
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def latency(backbone: str = "vit_base_patch16_224", seconds: float = 2.0, fps: float = 4.0, repeats: int = 3,
            workdir: str | None = None) -> dict:
    """One `seconds` clip through a run whose features came from `backbone` (random init, sampled at `fps`): the
    backbone alone on that many frames and a warm Predictor (seconds, median of `repeats`), and one cold
    `vtn predict` process, on the CPU."""
    import torch

    from vtn import synth
    from vtn.cli import main
    from vtn.evaluate.predict import Predictor
    from vtn.extract.config import RuntimeConfig

    work = Path(workdir or tempfile.mkdtemp(prefix="vtn-bench-latency-"))
    try:
        data, cache, run_dir, clip = work / "videos", work / "cache", work / "run", work / "clip.mp4"
        if not (run_dir / "best").exists():  # what is timed is prediction: a few short videos, a few steps
            print(f"building a run on {backbone} features (a few steps)", flush=True)
            synth.make_dataset(data, per_split={"train": 2}, classes=synth.CLASSES[:2], seconds=(1.0, 1.5), seed=0)
            common = ["--device", "cpu", "--quiet"]
            for command in (["extract", str(data), "--out", str(cache), "--backbone", backbone, "--random-init",
                             "--fps", str(fps), "--overwrite", *common],
                            ["train", str(cache), "--out", str(run_dir), "--model", "tiny", "--steps", "2", *common]):
                if main(command):
                    raise RuntimeError(f"vtn {' '.join(command)} failed")
        synth.make_video(clip, synth.CLASSES[0], seconds, 25.0, (320, 240), seed=1)

        def median_time(call) -> float:
            call()  # warm-up: allocations, thread pools
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                call()
                times.append(time.perf_counter() - started)
            return statistics.median(times)

        predictor = Predictor.from_run(run_dir, runtime=RuntimeConfig(device="cpu", progress=False))
        frames = predictor([clip])[0]["frames_through_backbone"]
        x = torch.randn(frames, 3, *predictor.preprocess.size)
        with torch.inference_mode():
            alone = median_time(lambda: predictor.backbone(x))
        warm = median_time(lambda: predictor([clip]))
        started = time.perf_counter()  # once: a warm-up would not make a new process any warmer
        subprocess.run([sys.executable, "-m", "vtn", "predict", str(clip), "--model", str(run_dir), "--device", "cpu",
                        "--quiet"], check=True, stdout=subprocess.DEVNULL)
        cold = time.perf_counter() - started
        print(f"\none {seconds:g} s clip (320x240), {backbone} (random init) on {torch.get_num_threads()} CPU threads, "
              f"{frames} frames through the backbone: backbone alone {alone:.2f} s; warm Predictor {warm:.2f} s "
              f"({warm / alone:.2f}x the backbone, goal <= 1.5x); cold `vtn predict` process {cold:.2f} s")
        return {"frames": frames, "backbone_seconds": alone, "warm_seconds": warm, "cold_seconds": cold}
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
