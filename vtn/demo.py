"""`vtn demo`: the whole pipeline on generated videos, in a few minutes on a laptop CPU.

1. Generate labelled videos (vtn/synth.py) whose classes differ only in the temporal order of events:
   a blob crossing left-to-right or right-to-left, then a red flash and a green one in either order.
2. Extract one feature per sampled frame with a small random-init timm ViT (nothing is downloaded).
3. Train VTN's temporal encoder on the cache, then evaluate it on whole val videos.
4. Compare with an order-blind baseline: logistic regression on each video's mean-pooled features.
   Every class shows the same frames, so the baseline stays near chance (25 %); VTN, which sees the
   order, should be near 100 %.

`vtn demo --finetune` then shows what end-to-end fine-tuning adds (`finetune_stage`): on generated videos whose
classes differ only in where two identical striped squares sit relative to each other (vtn/synth.py's layout
kind), a random-init ResNet's pooled per-frame features are the same for every class, so stage two on the frozen
cache stays near chance; `vtn finetune` from that run trains the backbone too and learns the layout.
"""

from __future__ import annotations

import time
from pathlib import Path

# Sized so the demo finishes in minutes on a laptop CPU.
VIDEOS = {"train": 40, "val": 15}  # per class
BACKBONE = {"name": "vit_tiny_patch16_224", "weights": "random", "image_size": 64}
SAMPLING = {"mode": "fps", "fps": 12.0}
# Positions from time at the sampling rate: consecutive samples get consecutive positions whatever the source's
# frame rate (15-30 fps here), which frame indices would not. No dropout: on 160 videos it mostly delays the
# moment the encoder starts to use the frames' order.
def small_encoder(fps: float) -> list[str]:
    """The demo's encoder settings, for features sampled at `fps`."""
    return ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=128",
            "model.attention_window=8", "model.positions=time", f"model.position_rate={fps}",
            "model.dropout=0.0", "model.attention_dropout=0.0", "model.head_dropout=0.0"]


# One torch thread: the same result on any number of cores (the features are the same already), and on a model
# this small more threads only wait for each other.
TRAIN_SETS = [*small_encoder(SAMPLING["fps"]), "data.clip_frames=16", "data.stride=2", "optim.batch_size=16",
              "optim.lr=0.001", "optim.min_steps=1500", "run.threads=1"]

# `--finetune`: a random-init ResNet-10t, whose residual branches start at zero, so its pooled feature averages
# local features over the frame: what makes the layout invisible to it.
FT_VIDEOS = {"train": 48, "val": 10}  # per class
FT_BACKBONE = {"name": "resnet10t", "weights": "random", "image_size": 64}
FT_SAMPLING = {"mode": "fps", "fps": 8.0}
# The classes are spatial, so no temporal convolution: with it the 120 fine-tuning steps below reached 50 %.
FT_TRAIN_SETS = [*small_encoder(FT_SAMPLING["fps"]), "model.temporal_conv=0", "data.clip_frames=8", "data.stride=1",
                 "optim.batch_size=16", "optim.lr=0.001", "optim.steps=60", "run.eval_every=1"]
# `vtn finetune`'s defaults (it reads from the cache that the backbone is random-init and chooses for it); only the
# run's size is set here: short clips in batches of many clips keep a step cheap on a CPU and its frames varied,
# two whole-video evaluations (epochs 5 and 10), decoding in this process (these files decode in milliseconds).
FINETUNE_SETS = ["optim.batch_size=16", "optim.epochs=10", "run.eval_every=5", "data.clip_frames=4", "data.stride=2",
                 "finetune.workers=0"]


def register(sub) -> None:
    """Add `vtn demo` to `vtn`."""
    p = sub.add_parser(
        "demo", help="generate videos, extract, train and evaluate VTN against an order-blind baseline",
        description="Runs the whole pipeline on generated videos whose classes differ only in the temporal order "
        "of events: generate -> extract (random-init ViT-Tiny) -> train -> evaluate, then prints VTN's val top-1 "
        "next to a logistic regression on mean-pooled features. Takes a few minutes on a CPU.",
    )
    p.add_argument("--out", help="folder for the videos, the cache and the run (default: a new temporary folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--finetune", action="store_true",
                   help="then show end-to-end fine-tuning beating frozen features: on generated videos whose classes a "
                   "random-init backbone's pooled features cannot tell apart, stage two on the cache (frozen) against "
                   "`vtn finetune` from that run (a few more minutes)")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    demo(args.out, progress=not args.quiet)
    if args.finetune:
        finetune_stage(Path(args.out) / "finetune" if args.out else None, progress=not args.quiet)
    return 0


def baseline_top1(cache_url: str) -> float:
    """Val top-1 of `vtn probe`'s order-blind baseline: logistic regression on mean-pooled features."""
    from vtn.store import ClipDataset, open_cache
    from vtn.temporal.baselines import logistic, pooled

    cache = open_cache(cache_url)
    train, val = (pooled(ClipDataset(cache, split=s, train=False)) for s in ("train", "val"))
    return float(logistic().fit(train["mean"], train["labels"]).score(val["mean"], val["labels"]))


def extract(videos: Path, cache: str, backbone: dict, sampling: dict, progress: bool):
    """Step 2 of either demo: `backbone` (random init) over `videos` sampled as `sampling`, into `cache`.
    Decoding in the main process: these files decode in milliseconds, so worker processes would cost more to
    start than they save."""
    from vtn.config import merge
    from vtn.extract import job as extract_job
    from vtn.extract.config import ExtractConfig

    print(f"2/4 extracting features with a random-init {backbone['name']} at {backbone['image_size']} px, "
          f"{sampling['fps']:g} frames per second", flush=True)
    cfg = merge(ExtractConfig(), {"backbone": backbone, "sampling": sampling,
                                  "runtime": {"device": "cpu", "workers": 0, "progress": progress}})
    return extract_job.run(cfg, videos, cache, overwrite=True)


def demo(out: str | Path | None = None, progress: bool = True) -> dict:
    """Run the demo in `out` (a new temporary folder when None); prints the report and returns its figures."""
    import tempfile

    from vtn.config import resolve
    from vtn.evaluate.run import evaluate
    from vtn.synth import CLASSES, make_dataset
    from vtn.temporal.settings import TrainConfig
    from vtn.temporal.loop import fit

    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="vtn-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    videos, cache, run = out / "videos", str(out / "cache"), out / "run"
    times = {}

    start = time.perf_counter()
    print(f"vtn demo in {out}\n1/4 generating {sum(VIDEOS.values()) * len(CLASSES)} videos of {len(CLASSES)} classes "
          f"({', '.join(CLASSES)})", flush=True)
    make_dataset(videos, per_split=VIDEOS, seed=0)
    times["generate"] = time.perf_counter() - start

    start = time.perf_counter()
    summary = extract(videos, cache, BACKBONE, SAMPLING, progress)
    times["extract"] = time.perf_counter() - start

    start = time.perf_counter()
    print("3/4 training the temporal encoder", flush=True)
    fit(cache, run, resolve(TrainConfig, None, [*TRAIN_SETS, "run.device=cpu"]), resume=False, progress=progress)
    times["train"] = time.perf_counter() - start

    start = time.perf_counter()
    print("4/4 evaluating VTN on whole val videos, and the order-blind baseline", flush=True)
    metrics = evaluate(run, cache, split="val", device="cpu")
    baseline = baseline_top1(cache)
    times["evaluate"] = time.perf_counter() - start

    total = sum(times.values())
    print(f"\nvtn demo: {summary.videos} videos, {summary.frames} frames, {total:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})\n"
          f"  VTN (order-aware)                 val top-1 {metrics['top1']:6.1%}   "
          f"(mean class {metrics['mean_class_accuracy']:.1%})\n"
          f"  mean-pooled features + logistic   val top-1 {baseline:6.1%}   "
          f"(order-blind; chance is {1 / len(CLASSES):.0%})\n"
          f"  run: {run} (predictions.csv, confusion.csv); try `vtn evaluate {run} --cache {cache}`", flush=True)
    return {"out": str(out), "seconds": total, "times": times, "vtn_top1": metrics["top1"], "baseline_top1": baseline}


def finetune_stage(out: str | Path | None = None, progress: bool = True) -> dict:
    """Frozen features against fine-tuning, in `out` (a new temporary folder when None): generate layout videos,
    extract them with a random-init ResNet, train stage two on the cache, `vtn finetune` from that run, and print
    both val top-1 (whole val videos, each run's best checkpoint) with the seconds each stage took."""
    import tempfile

    from vtn.config import resolve
    from vtn.evaluate.run import evaluate
    from vtn.synth import LAYOUT_CLASSES, make_layout_dataset
    from vtn.temporal.finetune import FinetuneConfig, default_config, finetune
    from vtn.temporal.settings import TrainConfig
    from vtn.temporal.loop import fit

    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="vtn-demo-finetune-"))
    out.mkdir(parents=True, exist_ok=True)
    videos, cache, run, tuned = out / "videos", str(out / "cache"), out / "run", out / "finetuned"
    times = {}

    start = time.perf_counter()
    print(f"\nvtn demo --finetune in {out}\n1/4 generating {sum(FT_VIDEOS.values()) * len(LAYOUT_CLASSES)} videos "
          f"of {len(LAYOUT_CLASSES)} classes ({', '.join(LAYOUT_CLASSES)}): the same two striped squares, placed "
          "differently", flush=True)
    make_layout_dataset(videos, per_split=FT_VIDEOS, seed=0)
    times["generate"] = time.perf_counter() - start

    start = time.perf_counter()
    extract(videos, cache, FT_BACKBONE, FT_SAMPLING, progress)
    times["extract"] = time.perf_counter() - start

    start = time.perf_counter()
    print("3/4 stage two on the frozen features", flush=True)
    fit(cache, run, resolve(TrainConfig, None, [*FT_TRAIN_SETS, "run.device=cpu"]), resume=False, progress=progress)
    frozen = evaluate(run, cache, split="val", device="cpu")
    times["stage two"] = time.perf_counter() - start

    start = time.perf_counter()
    print(f"4/4 vtn finetune {run} --out {tuned}: backbone, encoder and head from raw video", flush=True)
    cfg = resolve(FinetuneConfig, None, [*FINETUNE_SETS, "run.device=cpu"], base=default_config(run))
    result = finetune(run, tuned, cfg=cfg, progress=progress)
    times["finetune"] = time.perf_counter() - start

    chance = 1 / len(LAYOUT_CLASSES)
    rows = [("stage two, frozen backbone", frozen["top1"], times["stage two"]),
            ("vtn finetune, end to end", result["best"]["val_top1"], times["finetune"])]
    print(f"\nvtn demo --finetune: {sum(times.values()):.0f} s (generate {times['generate']:.0f} s, extract "
          f"{times['extract']:.0f} s); val top-1 on {FT_VIDEOS['val'] * len(LAYOUT_CLASSES)} whole videos, chance "
          f"{chance:.0%}\n  {'':28} {'val top-1':>9} {'seconds':>8}", flush=True)
    for name, top1, seconds in rows:
        print(f"  {name:28} {top1:9.1%} {seconds:8.0f}", flush=True)
    print(f"  runs: {run} (stage two), {tuned} (fine-tuned)", flush=True)
    return {"out": str(out), "seconds": sum(times.values()), "times": times, "frozen_top1": frozen["top1"],
            "finetuned_top1": result["best"]["val_top1"], "run": str(run), "finetuned": str(tuned)}
