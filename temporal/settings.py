"""Stage two's settings: the sections of a `vtn train` config (the model section is temporal/model.py's
`VTNConfig`), its recipes, the flags that set them, and the model a config trains on a given cache."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from vtn.config import job_config, ranged
from vtn.errors import UserError
from vtn.temporal.model import SIZES, VTNConfig


@dataclass(frozen=True)
class DataSection:
    train_split: str = "train"
    val_split: str = "val"
    # When the cache has no videos in the split "val" (a folder of class/ sub-folders puts all in "train"), this
    # share of each class's train videos is held out for validation, chosen by a hash of the video id (so the
    # choice never depends on the order or number of other videos). 0: refuse instead.
    holdout: float = ranged(0.1, ge=0, lt=1)
    # Training views. "dense": clip_frames frames, stride cached frames apart, from a random start (the paper's
    # clips; a video too short for the span keeps the clip length with a smaller stride, or all its frames).
    # "uniform": the whole video cut into `segments` equal segments, one frame drawn from each (TSN, MMAction2's
    # UniformSampleFrames): the view spreads over the video as whole-video evaluation does. "mixed": each clip is
    # uniform with probability `uniform_share`, else dense. "auto": chosen from the train videos' lengths
    # (temporal/splits.py `choose_sampling`; the first log line says which and why).
    sampling: Literal["auto", "dense", "uniform", "mixed"] = "auto"
    clip_frames: int = ranged(16, ge=1, flag="--frames")
    stride: int = ranged(8, ge=1, flag="--stride")
    # 64 segments put a frame at least every 1/32 of a video: a 2-s event of a 60-s video always holds one
    segments: int = ranged(64, ge=1)
    uniform_share: float = ranged(0.5, ge=0, le=1)
    # Temporal-scale augmentation: each training view's speed is drawn log-uniformly from this range: a dense clip's
    # stride is multiplied by it, a uniform view's segments divided by it, so spans and densities vary as the
    # events of real videos do. (1, 1): off.
    speed: tuple[float, float] = ranged((0.5, 2.0), gt=0)
    load: Literal["auto", "memory", "stream"] = "auto"  # auto: into memory when the split fits
    workers: int | None = ranged(None, ge=0)  # loader processes; None: 0 in memory, up to 8 when streaming
    normalize: bool = True  # features to zero mean, unit std per dimension (train split statistics)
    eval_batch_size: int = ranged(16, ge=1)


DEFAULT_EPOCHS = 25


@dataclass(frozen=True)
class OptimSection:
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = ranged(3e-4, gt=0, flag="--lr")
    weight_decay: float = ranged(0.05, ge=0)  # not applied to biases, norms and the [CLS] vector
    betas: tuple[float, float] = ranged((0.9, 0.999), ge=0, lt=1)  # adamw
    momentum: float = ranged(0.9, ge=0, lt=1)  # sgd
    batch_size: int = ranged(32, ge=1, flag="--batch-size")  # clips per optimiser step over all processes
    # Length of the run: `steps` if set, else `epochs` if set (both obeyed exactly); else at most 25 epochs, raised
    # so the run makes at least `min_steps` steps (a small cache has few steps per epoch), and stopped early once
    # val top-1 has not improved for `patience` epochs (None: a fifth of that length; 0: never), so a few dozen
    # videos that are learnt in 40 steps do not take 1000.
    epochs: int | None = ranged(None, ge=1, flag="--epochs")
    steps: int | None = ranged(None, ge=1, flag="--steps")
    min_steps: int = ranged(1000, ge=1)
    patience: int | None = ranged(None, ge=0)
    schedule: Literal["cosine", "step"] = "cosine"
    warmup: float = ranged(0.05, ge=0, lt=1)  # share of the steps with a linear warm-up from 0
    # step schedule: lr *= gamma at these shares of the steps
    milestones: tuple[float, ...] = ranged((0.52, 0.96), ge=0, le=1)
    gamma: float = ranged(0.1, gt=0)
    clip_grad: float = ranged(1.0, ge=0)  # max gradient norm; 0 = off
    label_smoothing: float = ranged(0.0, ge=0, lt=1)


@dataclass(frozen=True)
class RunSection:
    seed: int = 0
    device: str = "auto"  # auto: this process's GPU when there is one, else the CPU
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast dtype for the forward pass
    # Epochs between whole-video evaluations (each logs metrics.jsonl, keeps best/ and saves last/). None: about
    # 25 evaluations per run, so a small cache's many short epochs are not evaluated one by one. The last epoch
    # is always evaluated.
    eval_every: int | None = ranged(None, ge=1)
    checkpoint_every: int = ranged(1000, ge=0)  # steps between checkpoints of last/ besides those at evaluations
    # torch threads (vtn.runtime.size_threads). None: every core the process may use beside its loader workers;
    # a fixed count makes a CPU run's result the same on any number of cores (sums split another way round off
    # differently)
    threads: int | None = ranged(None, ge=1)
    # TensorBoard event files in RUN/tb/ beside metrics.jsonl (temporal/tensorboard.py), when the tensorboard package
    # is installed
    tensorboard: bool = True


@dataclass(frozen=True)
class TrainConfig:
    model: VTNConfig = field(default_factory=VTNConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)


RECIPES = {
    "default": TrainConfig(),
    # The reference code's Kinetics recipe (SlowFast configs/Kinetics/VIT_B_VTN.yaml): SGD lr 1e-3, momentum
    # 0.9, weight decay 1e-4, 16 clips per step, lr x0.1 at epochs 13 and 24 of 25 (as shares of the run),
    # no clipping. Its length is the default's (at most 25 epochs, at least min_steps, stopped on val), so a small
    # cache gets a usable run.
    "reference": TrainConfig(optim=OptimSection(
        optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4, batch_size=16, schedule="step",
        warmup=0.0, milestones=(13 / 25, 24 / 25), gamma=0.1, clip_grad=0.0,
    )),
}

# What goes with a `--model` size besides the encoder (vtn.config.job_config), before --config, --set and --lr: the
# narrow tiny encoder learns faster at 1e-3 than at the default 3e-4, and at that rate it memorises a small cache
# unless its weights decay ten times faster than the default's (the README's long-video figures). Per recipe: they
# were measured with the default's AdamW, and SGD's coupled decay at 0.5 would shrink the weights, not regularise them.
SIZE_SETS = {"default": {"tiny": {"optim": {"lr": 1e-3, "weight_decay": 0.5}}}}
# What --recipe and --model choose from, for vtn train, sweep and ablate (vtn.config.job_config)
CHOICES = {"recipes": RECIPES, "sizes": SIZES, "size_sets": SIZE_SETS}

FLAGS = {  # `vtn train`'s flags (argparse dest) -> config key; see vtn.config.flag_updates
    "frames": "data.clip_frames", "stride": "data.stride", "epochs": "optim.epochs", "steps": "optim.steps",
    "batch_size": "optim.batch_size", "lr": "optim.lr", "amp": "run.amp", "seed": "run.seed", "device": "run.device",
    "no_tb": {"run.tensorboard": False},
}


# -- configuration against the cache ----------------------------------------------------------------------------

def model_config(cfg: TrainConfig, cache) -> VTNConfig:
    """The VTN to train on this cache: feature_dim, num_classes and class_names from the cache (a pinned value
    must match)."""
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
    if cfg.data.clip_frames > m.max_positions:
        raise UserError(f"data.clip_frames={cfg.data.clip_frames} is more than model.max_positions={m.max_positions}")
    if m.class_names and list(m.class_names) != list(cache.class_names):
        raise UserError(f"{cache.url}: the cache's classes {list(cache.class_names)} are not the model config's "
                        f"class_names {list(m.class_names)}")
    model = dataclasses.replace(m, feature_dim=cache.feature_dim, num_classes=len(cache.class_names),
                                class_names=tuple(cache.class_names))
    model.check()
    return model


# `--model auto`, vtn train's and sweep's default: base below this many train videos stalled for hundreds of steps on
# the order of a video's events, or memorised them, on some seeds, where tiny read every long-video set (README, "Long
# videos read whole", 72 train videos); base is the paper's encoder for Kinetics' 240,000. Between, not measured.
SMALL_CACHE = 1000


def train_config(args, flags: dict, caches: list) -> tuple[TrainConfig | None, str]:
    """vtn train's and sweep's settings (vtn.config.job_config), `--model auto` (or none) decided by the train
    split of `caches` (open): tiny, with its size settings, when the smallest holds fewer than SMALL_CACHE videos,
    else base; and a sentence saying which and why ("" when --model names a size, or when the run's saved config
    is used)."""
    named = getattr(args, "model", None) not in (None, "auto")
    cfg = job_config(TrainConfig, argparse.Namespace(**{**vars(args), "model": args.model if named else None}),
                     flags, **CHOICES)
    if cfg is None or named:
        return cfg, ""
    videos = min(len(cache.split_ids(cfg.data.train_split)) for cache in caches)
    if videos >= SMALL_CACHE:
        return cfg, f"base (--model auto: {videos} train videos, at least {SMALL_CACHE})"
    return (job_config(TrainConfig, argparse.Namespace(**{**vars(args), "model": "tiny"}), flags, **CHOICES),
            f"tiny (--model auto: {videos} train videos, fewer than {SMALL_CACHE}, on which the paper's base encoder "
            "can stall or memorise; --model base trains it)")
