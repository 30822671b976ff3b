"""Backbone + VTN as one model: raw frames -> per-frame features -> [CLS] + positions -> Longformer -> head.

`VideoVTN` is a `VTN` (the very module stage two trains on cached features, with its parameter names) that also
holds the timm backbone (`backbone.*` in its state dict) and the Preprocess module the cache was extracted
with. Given the same frames, its per-frame features are the cache's features and its logits are the stage-two
model's on them (a test checks both). `vtn finetune` trains it; its checkpoints hold both parts together with
the backbone's identity, preprocessing and sampling (`video.json`), so they predict on raw video.

Memory controls (all exact, see `set_memory` and `frame_features`): frames through the backbone in micro-batches,
activation checkpointing (timm's inside the backbone, per layer in the encoder), and exact chunked backprop (each
micro-batch's activations are dropped after its forward and recomputed, with the random state replayed, when its
features' gradient arrives: gradient caching, so peak memory holds one micro-batch's activations, not the clip's).
Exact means plain training's loss and gradients up to float summation order, for a backbone without train-mode
BatchNorm (finetune's freeze_bn, the default, keeps it in eval mode): BatchNorm in train mode normalises each
micro-batch by its own statistics, and a recomputed micro-batch updates its running statistics a second time; so
a micro-batch then takes frames in turn from every clip of the call, never one clip's near-identical frames.
The input normalisation may follow the features as the backbone learns (`track_features`).
And a feature memory bank (TALLFormer): only some frames of a clip go through the backbone, the others' features
are given.

`rebuild_backbone` rebuilds the backbone a checkpoint's features came from (shared with `vtn predict`).
A fine-tuned checkpoint also holds its backbone alone (`backbone.safetensors`, timm's own names) and records it
as the backbone of its features (`finetuned_inputs`): `vtn extract --weights CKPT/backbone.safetensors`
re-extracts a cache whose identity matches, `vtn evaluate` takes that cache and `vtn predict` builds that
backbone. `load_temporal` loads the encoder and head of either kind of checkpoint. No training or data code here.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from vtn.config import to_dict
from vtn.errors import UserError
from vtn.extract.backbone import Preprocess, create_backbone, file_sha256, pooled_dim, state_dict_sha256, timm_model
from vtn.extract.config import BackboneConfig, RuntimeConfig
from vtn.extract.sampling import MODES, SamplingConfig
from vtn.temporal.checkpoint import backbone_differences, load_model
from vtn.temporal.data import normalising_scale
from vtn.temporal.model import VTN, VTNConfig

VIDEO_NAME = "video.json"  # the backbone's identity and build settings, its preprocessing, the sampling
BACKBONE_PREFIX = "backbone."
BACKBONE_FILE = "backbone.safetensors"  # a fine-tuned checkpoint's backbone alone, for `vtn extract --weights`


def sampling_of(inputs: dict) -> SamplingConfig:
    """The SamplingConfig a cache recorded (its `effective` settings)."""
    s = dict(inputs["sampling"])
    mode = s.pop("mode")
    return SamplingConfig(mode=mode, max_seconds=s.pop("max_seconds", None), **s)


def rebuild_backbone(inputs: dict | None, where: Path, device: torch.device, weights: str | None = None,
                     runtime: RuntimeConfig | None = None, crops: int = 1):
    """The backbone a checkpoint's features came from (its recorded `inputs`): timm's weights, seeded random ones,
    or the recorded weights file (`weights` gives another path to the same file). Returns (backbone, preprocess,
    BackboneConfig, identity). Refused, naming what it looked for, when they cannot be found, and naming both
    hashes when the weights built are not the recorded ones."""
    from vtn.extract.pipeline import build_backbone

    if not inputs or not inputs.get("backbone") or not inputs.get("backbone_config"):
        raise UserError(f"{where}: the checkpoint does not record the backbone its features came from (trained on "
                        "a cache imported from other features, or by an older vtn); it needs a model trained "
                        "on a cache made by `vtn extract`")
    recorded, bc = inputs["backbone"], BackboneConfig(**inputs["backbone_config"])
    if weights is not None:
        bc = replace(bc, weights=weights)
    elif bc.weights == BACKBONE_FILE:  # a fine-tuned checkpoint's own backbone file, next to inputs.json
        bc = replace(bc, weights=str(Path(where) / BACKBONE_FILE))
    if bc.weights not in ("pretrained", "random") and not Path(bc.weights).is_file():
        raise UserError(f"{where}: its features came from {bc.name} with the weights file {bc.weights} (sha256 "
                        f"{recorded.get('weights_sha256')}), which is not there; give its path with --weights")
    backbone, preprocess, built = build_backbone(bc, runtime or RuntimeConfig(), device, crops=crops)
    differences = backbone_differences(recorded, built)
    if differences:
        key, then, now = differences[0]
        raise UserError(f"{where}: the backbone built from {bc.weights} is not the one its features came from: "
                        f"{key} {now!r} now, {then!r} recorded")
    return backbone, preprocess, bc, built


class VideoVTN(VTN):
    """VTN over raw frames: `backbone` (timm, num_classes=0) and `preprocess` (timm's eval transform) in front of
    the temporal encoder and head. `video` records what a predictor needs: {"backbone": identity,
    "backbone_config": BackboneConfig fields, "sampling": the cache's sampling}."""

    def __init__(self, config: VTNConfig, backbone: nn.Module, preprocess: Preprocess, video: dict):
        super().__init__(config)  # VTN's init touches only its own modules; the backbone keeps its weights
        dim = pooled_dim(backbone)
        if dim != config.feature_dim:
            raise UserError(f"the backbone gives {dim}-D features but the VTN takes {config.feature_dim}-D ones")
        self.backbone = backbone
        self.preprocess = preprocess  # buffers not persistent: nothing of it in the state dict
        self.video = video
        self.micro_batch: int | None = None  # frames per backbone call (None: all at once)
        # Exact chunked backprop; None: whenever a call has more frames than one micro-batch (with one micro-batch
        # there is nothing to save, only a forward to repeat).
        self.chunked: bool | None = False
        self.freeze_bn = False  # BatchNorm of the backbone stays in eval mode (running statistics) in train()
        self.backbone_frozen = False  # the backbone runs without gradients (a frozen warm-up)
        # Momentum of the running estimate of the features' normalisation in training (`track_features`); 0: fixed.
        self.feature_momentum = 0.0
        self.has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())

    @classmethod
    def compose(cls, vtn: VTN, backbone: nn.Module, preprocess: Preprocess, video: dict) -> "VideoVTN":
        """The composed model with `vtn`'s weights (and feature normalisation) and this backbone."""
        model = cls(vtn.config, backbone, preprocess, video)
        missing, unexpected = model.load_state_dict(vtn.state_dict(), strict=False)
        missing = [k for k in missing if not k.startswith(BACKBONE_PREFIX)]  # the backbone's come with it
        if unexpected or missing:
            raise UserError(f"the VTN's weights do not fit the composed model (a checkpoint of another vtn?): "
                            f"unexpected {sorted(unexpected)[:5]}, missing {sorted(missing)[:5]}")
        return model.to(next(backbone.parameters()).device)

    def set_memory(self, micro_batch: int | None = None, chunked: bool | None = False,
                   grad_checkpointing: bool = False) -> None:
        """The memory controls (module docstring). `chunked` None: on when a call has more frames than
        `micro_batch`. `grad_checkpointing`: timm's `set_grad_checkpointing` in the backbone and per-layer
        checkpointing in the encoder."""
        if micro_batch is not None and micro_batch < 1:
            raise UserError(f"micro_batch must be >= 1, got {micro_batch}")
        self.micro_batch, self.chunked = micro_batch, chunked
        if grad_checkpointing and not hasattr(self.backbone, "set_grad_checkpointing"):
            raise UserError(f"{type(self.backbone).__name__} has no set_grad_checkpointing (timm models do)")
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(grad_checkpointing)
        self.longformer.set_grad_checkpointing(grad_checkpointing)

    def train(self, mode: bool = True) -> "VideoVTN":
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def frame_features(self, x: torch.Tensor, clip_of: torch.Tensor | None = None) -> torch.Tensor:
        """Preprocessed frames [N, 3, h, w] -> features [N, D], `micro_batch` frames per backbone call, each
        recomputed in the backward pass when chunked (see `set_memory`). `clip_of` [N]: each frame's clip. With
        BatchNorm training, a micro-batch of one clip's near-identical frames would give statistics unlike any
        evaluation sees (train fits, val stays at chance), so the frames are taken in turn from every clip: each
        micro-batch holds frames of as many clips as it can."""
        step = self.micro_batch or max(1, len(x))
        bn_trains = self.training and self.has_bn and not self.freeze_bn
        if bn_trains and clip_of is not None and len(x) > step:
            rank = torch.arange(len(x), device=x.device) - torch.searchsorted(clip_of, clip_of)  # index in its clip
            order = torch.argsort(rank * len(x) + torch.arange(len(x), device=x.device))  # 1st of each clip, 2nd...
            return self.frame_features(x[order])[torch.argsort(order)]
        grad = torch.is_grad_enabled() and not self.backbone_frozen
        chunked = grad and (self.chunked or (self.chunked is None and len(x) > step))
        out = []
        with torch.set_grad_enabled(grad):
            for i in range(0, len(x), step):
                chunk = x[i:i + step]  # [n, 3, h, w]
                if chunked:
                    out.append(checkpoint(self.backbone, chunk, use_reentrant=False, preserve_rng_state=True))
                else:
                    out.append(self.backbone(chunk))  # [n, D]
        return torch.cat(out)  # [N, D]

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                return_attention: bool = False, bank: torch.Tensor | None = None, fresh: torch.Tensor | None = None):
        """frames [B, T, H, W, 3] uint8 (preprocessed here) or [B, T, 3, h, w] float (already preprocessed);
        mask [B, T] (True = a real frame; only real frames go through the backbone); positions as VTN.forward.
        Returns VTN.forward's logits [B, classes] (and attention).

        As a feature memory bank (TALLFormer): `bank` [B, T, D] holds stored features of every frame and `fresh`
        [B, T] marks the frames run through the backbone now; `frames` are then only those, [N, ...] in the
        order of fresh's True entries. Only they get gradients; their new features are left in `fresh_features`
        [N, D] (detached) for the caller to write back."""
        B, T = (frames if bank is None else bank).shape[:2]
        mask = torch.ones(B, T, dtype=torch.bool, device=frames.device) if mask is None else mask.bool()
        # [N, ...]: the real frames, clip by clip (with a bank: the fresh ones, as given)
        real, fresh = (frames[mask], mask) if bank is None else (frames, fresh.bool() & mask)
        if real.dtype == torch.uint8:
            with torch.no_grad():
                real = self.preprocess(real)  # [N, 3, h, w]
        clip_of = torch.arange(B, device=fresh.device)[:, None].expand(B, T)[fresh]  # [N]: clip by clip, ascending
        feats = self.frame_features(real, clip_of)  # [N, D]
        self.fresh_features = feats.detach()  # for a bank's write-back and `track_features`
        if bank is None:
            features = feats.new_zeros(B, T, feats.shape[-1])  # padding stays 0 and is never attended to
        else:
            features = bank.detach().to(feats.dtype, copy=True)  # a copy: the stored features, without gradients
        features[fresh] = feats  # [B, T, D]
        return VTN.forward(self, features, mask, positions, return_attention)

    @torch.no_grad()
    def track_features(self, total: torch.Tensor, squares: torch.Tensor, count: int) -> None:
        """Move the input normalisation (VTN's feature_mean and feature_scale, set by stage two from the cache)
        towards the statistics of `count` fresh features, given as their sum and sum of squares [D] (summed over
        processes by the caller), by `feature_momentum`, as BatchNorm's running statistics: the backbone changes its
        features as it learns (a random-init one by orders of magnitude), and normalisation fixed at the cache's
        would let them drift away from the scale the encoder learned."""
        if self.feature_momentum <= 0 or count < 2:
            return
        mean = total / count
        std = ((squares / count - mean * mean).clamp(min=0) * count / (count - 1)).sqrt()
        # New tensors, not in place: this step's forward saved the old ones for its backward pass.
        self.feature_mean = torch.lerp(self.feature_mean, mean, self.feature_momentum)
        self.feature_scale = torch.lerp(self.feature_scale, normalising_scale(std), self.feature_momentum)

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json (the VTNConfig) and model.safetensors (VTN's names, the backbone under `backbone.`), as
        VTN writes them; backbone.safetensors (the backbone alone under timm's names, which `vtn extract
        --weights` loads); and video.json (the backbone's identity, build settings and preprocessing, the
        sampling)."""
        super().save_pretrained(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in timm_model(self.backbone).state_dict().items()}
        save_file(state, str(Path(directory) / BACKBONE_FILE), metadata={"format": "pt"})
        (Path(directory) / VIDEO_NAME).write_text(json.dumps(self.video, indent=2) + "\n")

    def finetuned_inputs(self, inputs: dict, directory: str | Path) -> dict:
        """The inputs.json of a checkpoint saved in `directory`: the features this model's encoder now fits are
        its fine-tuned backbone's, so the backbone identity is the one `vtn extract --weights
        directory/backbone.safetensors` records in a cache (the file's and the weights' sha256) and the build
        settings name that file; the stage-two backbone stays as `stage_two_backbone`. A cache of the old
        backbone is then refused by `vtn evaluate`, one re-extracted with this one is taken."""
        path = Path(directory) / BACKBONE_FILE
        stage_two = self.video["backbone"]
        identity = {"name": stage_two["name"], "weights": "file", "weights_file_sha256": file_sha256(path),
                    "weights_sha256": state_dict_sha256(timm_model(self.backbone)),
                    "feature_dim": pooled_dim(self.backbone), "preprocessing": stage_two["preprocessing"],
                    **({"layers": stage_two["layers"]} if "layers" in stage_two else {})}
        return {**inputs, "backbone": identity,
                "backbone_config": {**self.video["backbone_config"], "weights": BACKBONE_FILE},
                "stage_two_backbone": inputs.get("stage_two_backbone", inputs.get("backbone"))}

    @classmethod
    def from_pretrained(cls, directory: str | Path, backend: str | None = None) -> "VideoVTN":
        """Load a `save_pretrained` directory on the CPU: the backbone is built by timm (seeded random init, no
        download) and gets the saved weights; its preprocessing must be the recorded one."""
        path = Path(directory)

        def build(config: VTNConfig) -> VideoVTN:
            video = json.loads((path / VIDEO_NAME).read_text())
            bc = BackboneConfig(**video["backbone_config"])
            backbone, data_config, _ = create_backbone(bc.name, image_size=bc.image_size, seed=bc.seed)
            preprocess = Preprocess(data_config)
            if to_dict(preprocess.attrs) != video["backbone"].get("preprocessing"):
                raise UserError(f"{path}: timm's preprocessing for {bc.name} is now {preprocess.attrs}, the checkpoint "
                                f"recorded {video['backbone'].get('preprocessing')}")
            return cls(config, backbone, preprocess, video)

        return load_model(path, VTNConfig, build, backend, needs=(VIDEO_NAME,), what="fine-tuned VTN")


def load_temporal(directory: str | Path) -> VTN:
    """The VTN (encoder, head, feature normalisation) of a checkpoint directory, stage-two or fine-tuned; a
    fine-tuned one's backbone weights are left out (consumers build that backbone from backbone.safetensors, as
    its inputs.json says). A fine-tuned checkpoint without that file (written by an older vtn) is refused: its
    inputs.json names the stage-two backbone, not its own."""
    path = Path(directory)
    if not (path / VIDEO_NAME).is_file():
        return VTN.from_pretrained(path)
    if not (path / BACKBONE_FILE).is_file():
        raise UserError(f"{path}: a fine-tuned checkpoint without {BACKBONE_FILE}, written by an older vtn: its "
                        "inputs.json names the stage-two backbone, not its own; fine-tune again with this vtn")
    return load_model(path, VTNConfig, VTN, skip=BACKBONE_PREFIX)


def reextract_command(ckpt: str | Path, inputs: dict, videos: str | None = None) -> str:
    """The `vtn extract` command that makes a cache of a fine-tuned checkpoint's features: its backbone file,
    the backbone's name and image size, the sampling its features were trained with."""
    bc, s = inputs["backbone_config"], inputs["sampling"]
    flag = "--" + s["mode"].replace("_", "-")  # each sampling mode's flag is its name (vtn/extract/cli.py)
    words = ["vtn extract", videos or "VIDEOS", "--out NEW_CACHE", f"--backbone {bc['name']}"]
    words += [f"--image-size {bc['image_size']}"] if bc.get("image_size") else []
    words += [f"{flag} {s[MODES[s['mode']].field]}"] + ([f"--max-seconds {s['max_seconds']}"] if s.get("max_seconds") else [])
    return " ".join([*words, f"--weights {Path(ckpt) / BACKBONE_FILE}"])
