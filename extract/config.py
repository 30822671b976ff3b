"""`ExtractConfig`: every setting of `vtn extract`, as frozen dataclasses (see vtn/config.py for overrides).

A numeric setting with a valid range declares it beside its default (`vtn.config.ranged`); every section checks
its ranges when it is built, so a value out of range is refused with the key, its flag and the range, whether it
came from a flag, `--set`, a YAML file or code, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vtn.config import check_ranges, ranged
from vtn.extract.sampling import SamplingConfig


@dataclass(frozen=True)
class BackboneConfig:
    """The spatial backbone: any timm model, built with num_classes=0."""

    name: str = "vit_base_patch16_224"  # the paper's ViT-B/16
    # "pretrained" (timm's weights; offline they must be in the local hub cache), "random" (seeded
    # random init: tests, benchmarks, demos), or the path of a safetensors / torch state-dict file.
    weights: str = "pretrained"
    image_size: int | None = ranged(None, ge=1, flag="--image-size")  # overrides the input size of timm's data config
    seed: int = 0  # random init seed, so every process builds the same weights
    # Blocks whose pooled output is cached instead of the model's (`--layers -1,-2`, Python indices over timm's
    # forward_intermediates: ViT blocks, CNN stages), concatenated in this order into one feature vector per frame
    # (extract/backbone.py's Intermediates). None: the model's own pooled output.
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        check_ranges(self, "backbone")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the job runs; none of it changes the features beyond --amp's precision and --compile's float rounding."""

    device: str = "auto"  # "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N"
    # Frames per forward, packed across videos; the last batch is padded to this size.
    batch_size: int = ranged(64, ge=1, flag="--batch-size")
    amp: Literal["none", "bf16", "fp16"] = "none"
    # Decode processes; 0 decodes in threads of the main process (the timeout holds there too). Default: 2
    # beside a model on the CPU (the model needs the cores); beside a GPU, this process's share of the cores
    # (one process per GPU, or torchrun's LOCAL_WORLD_SIZE) less one for the main process, as decoding then
    # sets the pace.
    workers: int | None = ranged(None, ge=0, flag="--workers")
    # Seconds a decode may go without producing a frame before it is killed.
    timeout: float = ranged(120.0, gt=0, flag="--timeout")
    chunk_mb: int = ranged(32, ge=1)  # decoded frames travel in chunks of at most this many MiB
    decode_threads: int = ranged(1, ge=1)  # decoder threads per worker
    # torch threads of the process (vtn.runtime.size_threads); default: every core it may use beside a CPU model
    # (its decode workers block once they are ahead of the model), the cores its decode workers leave beside a GPU.
    threads: int | None = ranged(None, ge=1)
    # Seconds a collective between torchrun ranks may wait before the job fails (torch's default). Ranks that
    # finished their share wait for the others without this limit.
    dist_timeout: float = ranged(1800.0, gt=0)
    commit_every: float = ranged(30.0, ge=0)  # seconds between commits: the most work a kill can lose
    feature_dtype: Literal["float16", "float32"] = "float16"
    channels_last: bool = True
    # torch.compile the backbone (frozen weights, one fixed batch shape): faster once compiled, at a one-off
    # compile cost; features equal eager mode up to float rounding.
    compile: bool = False
    progress: bool = True

    def __post_init__(self):
        check_ranges(self, "runtime")


@dataclass(frozen=True)
class ExtractConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def cache_paths(out: str, names: list[str]) -> list[str]:
    """Where `vtn extract --backbone A --backbone B ...` writes: one cache per backbone in the folder `out`,
    `out/<name>.zarr` (the timm name; a character other than a letter, digit, `.`, `_` or `-` becomes `_`).
    Refuses a name given twice and an `out` that is itself a cache."""
    import re

    from vtn.errors import UserError
    from vtn.paths import is_vtn_cache

    files = [re.sub(r"[^A-Za-z0-9._-]", "_", n) + ".zarr" for n in names]
    twice = sorted({n for n, f in zip(names, files) if files.count(f) > 1})
    if twice:
        raise UserError(f"--backbone {', '.join(twice)}: given twice (one cache per backbone)")
    if is_vtn_cache(str(out)):
        raise UserError(f"{out}: is a feature cache; with several --backbone, --out is the folder that holds one "
                        "cache per backbone (OUT/NAME.zarr): choose another --out")
    return [f"{str(out).rstrip('/')}/{f}" for f in files]
