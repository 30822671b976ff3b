"""`ExtractConfig`: every setting of `vtn extract`, as frozen dataclasses (see vtn/config.py for overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vtn.extract.sampling import SamplingConfig


@dataclass(frozen=True)
class BackboneConfig:
    """The spatial backbone: any timm model, built with num_classes=0."""

    name: str = "vit_base_patch16_224"  # the paper's ViT-B/16
    # "pretrained" (timm's weights; offline they must be in the local hub cache), "random" (seeded
    # random init: tests, benchmarks, demos), or the path of a safetensors / torch state-dict file.
    weights: str = "pretrained"
    image_size: int | None = None  # overrides the input size of timm's data config
    seed: int = 0  # random init seed, so every process builds the same weights


@dataclass(frozen=True)
class RuntimeConfig:
    """How the job runs; none of it changes the features beyond --amp's precision and --compile's float rounding."""

    device: str = "auto"  # "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N"
    batch_size: int = 64  # frames per forward, packed across videos; the last batch is padded to this size
    amp: Literal["none", "bf16", "fp16"] = "none"
    # Decode processes; 0 decodes in a thread of the main process (no timeout). Default: 2 beside a model on
    # the CPU (the model needs the cores); beside a GPU, this process's share of the cores (one process per
    # GPU, or torchrun's LOCAL_WORLD_SIZE) less one for the main process, as decoding then sets the pace.
    workers: int | None = None
    timeout: float = 120.0  # seconds a decode may go without producing a frame before it is killed
    chunk_mb: int = 32  # decoded frames travel in chunks of at most this many MiB
    decode_threads: int = 1  # decoder threads per worker
    # torch threads on the CPU; default: every core. Decode workers block once they are ahead, so they leave
    # the cores to the model (measured on 2 idle cores: 207 frames/s against 112 with one thread per leftover core).
    threads: int | None = None
    # Seconds a collective between torchrun ranks may wait before the job fails (torch's default). Ranks that
    # finished their share wait for the others without this limit.
    dist_timeout: float = 1800.0
    commit_every: float = 30.0  # seconds between commits: the most work a kill can lose
    feature_dtype: Literal["float16", "float32"] = "float16"
    channels_last: bool = True
    # torch.compile the backbone (frozen weights, one fixed batch shape): faster once compiled (resnet18 on
    # 2 CPU cores: about 1.2x), at a one-off compile cost; features equal eager mode up to float rounding.
    compile: bool = False
    progress: bool = True


@dataclass(frozen=True)
class ExtractConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
