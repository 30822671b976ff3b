"""Where a job runs: the one "auto" device rule, autocast, and the torchrun environment.

Read once at the top of a job and passed down; library code never reads RANK or picks a device itself.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from vtn.errors import UserError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Processes:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1


def processes() -> Processes:
    env = os.environ
    return Processes(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                     int(env.get("LOCAL_WORLD_SIZE", 1)))


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """"auto" is this process's GPU (cuda:LOCAL_RANK) when there is one, else the CPU; anything else must be a
    usable torch device."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec!r}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available on this machine")
    return device


def autocast(device: torch.device, amp: str):
    """The autocast context for an amp setting ("none", "bf16", "fp16") on `device`."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
