"""The settings of `vtn evaluate` and `vtn predict`: frozen dataclasses that defaults, `--config FILE.yaml`,
`--set KEY=VALUE` and the explicit flags (mapped by FLAGS) resolve, in that order; and the views they share.

Only vtn.config here (no torch), so the command line resolves them before the job's heavy imports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from vtn.config import ranged
from vtn.errors import UserError


@dataclass(frozen=True)
class InferenceConfig:
    """What evaluate and predict share: which checkpoint of a run, the views of each video, where the model runs,
    and how many videos get an attention figure."""

    checkpoint: Literal["best", "last"] = "best"
    views: str = "full"  # full, or TxS (see parse_views)
    device: str = "auto"  # auto (the GPU when there is one), cpu, cuda, cuda:N
    attention: int = ranged(0, ge=0, flag="--attention")


@dataclass(frozen=True)
class EvaluateConfig(InferenceConfig):
    split: str | None = None  # None: val, or the videos the run held out of its train split
    batch_size: int = ranged(16, ge=1, flag="--batch-size")  # videos per forward pass
    load: Literal["auto", "memory", "stream"] = "auto"  # the split in memory, or streamed from the cache


@dataclass(frozen=True)
class PredictConfig(InferenceConfig):
    batch_size: int = ranged(64, ge=1, flag="--batch-size")  # frames per backbone forward, across videos
    workers: int | None = ranged(None, ge=0, flag="--workers")  # decode processes (None: as vtn extract)
    amp: Literal["none", "bf16", "fp16"] = "none"
    top: int = ranged(5, ge=1, flag="--top")  # classes printed per video


# The command-line flags that set a setting (argparse dest -> key); given explicitly, they override --config and
# --set. Each command reads the ones its parser has.
FLAGS = {"checkpoint": "checkpoint", "views": "views", "device": "device", "attention": "attention",
         "split": "split", "batch_size": "batch_size", "workers": "workers", "amp": "amp", "top": "top"}


def parse_views(spec: str) -> tuple[int, int] | None:
    """"full" -> None; "TxS" (e.g. "10x3") -> (T clips, S crops)."""
    if spec == "full":
        return None
    m = re.fullmatch(r"(\d+)x(\d+)", spec)
    if not m or int(m[1]) < 1 or int(m[2]) not in (1, 3):
        raise UserError(f"--views {spec!r}: expected full, or TxS with T clips >= 1 and S = 1 (centre) or 3 crops, "
                        "e.g. 10x3")
    return int(m[1]), int(m[2])
