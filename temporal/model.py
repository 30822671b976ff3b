"""VTN's temporal part: frame features -> [CLS] + positions -> Longformer -> MLP head -> class logits.

The spatial backbone is not here: stage two feeds cached per-frame features, end-to-end fine-tuning feeds
the backbone's output, and both call the same `VTN.forward`.

Positions are the frames' places in the video, as the reference code passes them (`frame_positions`). A position
outside [0, max_positions) is refused with an error rather than clamped or wrapped, because two frames silently
sharing a position is a wrong model that still trains (one small host sync in eager mode; compiled graphs skip it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vtn.config import ConfigError, check_ranges, ranged, to_dict
from vtn.errors import UserError
from vtn.temporal.attention import backend_class, check_backend
from vtn.temporal.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_model
from vtn.temporal.longformer import LAYER_NORM_EPS


@dataclass(frozen=True)
class VTNConfig:
    """The temporal encoder and head. Defaults are the paper's encoder (`base`) with four changes that let it
    read long videos (`temporal_conv`, `positions`, `view_stride`, `head_dropout`; `preset("vit_b_vtn")` is the
    paper's model exactly, on Kinetics-400); feature_dim and num_classes are None until a cache decides them
    (stage two's `model_config`), or set to pin a config to a kind of cache (a 768-D model refuses a 512-D
    cache)."""

    feature_dim: int | None = ranged(None, ge=1)  # D of the cached features (the backbone's output)
    hidden_size: int = ranged(768, ge=1)  # d of the encoder; a linear projection maps D -> d when they differ
    num_layers: int = ranged(3, ge=1)
    num_heads: int = ranged(12, ge=1)
    intermediate_size: int = ranged(3072, ge=1)
    # Window per layer, Hugging Face meaning: a frame sees w/2 frames on each side. One int for all layers.
    attention_window: int | tuple[int, ...] = ranged(18, ge=1)
    # A depthwise convolution over neighbouring frames (this kernel, odd; 0: none, the paper's model) before the
    # positions are added: each frame's token sees what comes just before and after it wherever it lies, as
    # wav2vec2's and CPVT's convolutional positions do. Learned absolute positions alone must learn from data how
    # every position relates to every other (see the README's long-video figures for where that fails).
    temporal_conv: int = ranged(3, ge=0)
    max_positions: int = ranged(288, ge=1)  # positions 0..max_positions-1; the most frames a whole-video view reads
    # "index": source frame index (the paper's); "time": seconds x position_rate; "fraction": the frame's place as a
    # share of its video, every video spread over the whole table, so a model trained on short videos reads a long
    # one at positions it has trained; "none": no position embeddings (order only from the temporal convolution).
    # See `frame_positions`.
    positions: Literal["index", "time", "fraction", "none"] = "fraction"
    position_rate: float = ranged(25.0, gt=0)  # positions per second, for positions="time"
    # Whole videos (validation, evaluation, prediction) are read one cached frame in this many: as far apart as
    # the frames of the views the model trained on, so it reads them at the density it learnt. None: stage two
    # sets it from its training views (temporal/splits.py `view_stride`); 1 (the paper's): every frame.
    view_stride: int | None = ranged(None, ge=1)
    dropout: float = ranged(0.1, ge=0, lt=1)
    attention_dropout: float = ranged(0.1, ge=0, lt=1)
    # Before the head's last layer. The paper's 0.5 held the base encoder at chance on a small cache of order videos
    # (README, "Long videos read whole"); the tiny encoder reads them with it, so `tiny` keeps it.
    head_dropout: float = ranged(0.0, ge=0, lt=1)
    num_classes: int | None = ranged(None, ge=1)
    class_names: tuple[str, ...] = ()  # empty, or one name per class
    backend: str = "fast"  # a name in temporal/attention.py's BACKENDS
    # A config.json saved before a field existed describes the model of then: fields it lacks take these values,
    # not today's defaults (checkpoint.load_model; a view_stride of None reads every frame).
    SAVED_BEFORE: ClassVar[dict] = {"temporal_conv": 0, "positions": "index"}

    def __post_init__(self):
        if isinstance(self.attention_window, list):  # a list given in code; configs from files arrive as tuples
            object.__setattr__(self, "attention_window", tuple(self.attention_window))
        check_ranges(self, "model")
        check_backend(self.backend)

    @property
    def windows(self) -> tuple[int, ...]:
        """The attention window of each layer."""
        w = self.attention_window
        return (w,) * self.num_layers if isinstance(w, int) else tuple(w)

    def check(self) -> None:
        """Refuse a config no model can be built from. Not at construction: as a config section its fields are set
        one at a time (`--set model.hidden_size=64 --set model.num_heads=4`, a sweep's grid), and feature_dim and
        num_classes may still be "from the cache" (None)."""
        unset = [name for name in ("feature_dim", "num_classes") if getattr(self, name) is None]
        if unset:
            raise ConfigError(f"the VTN config leaves {' and '.join(unset)} unset (None: taken from the cache); "
                              "set them to build a model outside a training run")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if len(self.windows) != self.num_layers:
            raise ConfigError(f"attention_window has {len(self.windows)} values for {self.num_layers} layers")
        if any(w < 2 or w % 2 for w in self.windows):
            raise ConfigError(f"attention_window values must be even and >= 2, got {self.attention_window}")
        if self.temporal_conv % 2 == 0 and self.temporal_conv:
            raise ConfigError(f"temporal_conv must be odd (a kernel centred on its frame) or 0, "
                              f"got {self.temporal_conv}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError(f"{len(self.class_names)} class_names for num_classes={self.num_classes}")


# `--model SIZE`: named encoder sizes, registered once (as timm registers its variants). base is the paper's
# encoder (27.7 M parameters with its head on 768-D features, 400 classes); tiny trains in seconds on a CPU.
SIZES: dict[str, VTNConfig] = {}


def register_size(name: str, **fields) -> None:
    SIZES[name] = VTNConfig(**fields)


register_size("tiny", hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, attention_window=16,
              head_dropout=0.5)
register_size("small", hidden_size=384, num_layers=3, num_heads=6, intermediate_size=1536)
register_size("base")

# The paper's model: base on ViT-B/16 features and Kinetics-400. base keeps the reference code's window 18 (its
# "32" is another library's meaning), 288 positions and dropout 0.1; the paper's has no temporal convolution,
# source-frame positions, every frame of a whole video read and dropout 0.5 before the last head layer.
PRESETS = {"vit_b_vtn": dataclasses.replace(SIZES["base"], feature_dim=768, num_classes=400, temporal_conv=0,
                                           positions="index", view_stride=1, head_dropout=0.5)}


def preset(name: str, **overrides) -> VTNConfig:
    """A named configuration with some fields replaced, e.g. preset("vit_b_vtn", num_classes=10)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown VTN preset '{name}' (known: {', '.join(sorted(PRESETS))})")
    return dataclasses.replace(PRESETS[name], **overrides)


def frame_positions(
    config: VTNConfig,
    frame_index: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    video_span: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The `positions` argument of VTN.forward for views [B, T] of frames with these source indices / timestamps
    (seconds); `mask` [B, T] marks the real frames (None: all), which come first and in order; `video_span`
    [B, 2] the extent of each view's whole video in source frames and seconds (None: the view's own).

    The one rule used by training, evaluation, prediction and fine-tuning, so a position means the same in all:
    a frame's position is its place in the video counted from the view's first frame, in source frames
    ("index") or seconds x position_rate ("time"); so a clip from minute 10 uses the same rows of the table as
    one from the start. A video whose span does not fit the table (seen whole, as the paper's evaluation does)
    is spread over it: the positions of every view of it, a short training clip as much as the whole video,
    are scaled by (max_positions - 1) / the video's span, so two frames are as many positions apart in
    training as in evaluation. "fraction" spreads every video so, whatever its length. Positions are
    then made distinct, each at least one after the previous (a view never has more real frames than
    positions: whole-video views are thinned to max_positions frames). Padding gets 0.
    """
    if config.positions == "none":
        return None
    if config.positions in ("index", "fraction"):
        raw = frame_index.long()
    else:
        raw = torch.round(timestamps.double() * config.position_rate).long()
    mask = torch.ones_like(raw, dtype=torch.bool) if mask is None else mask.bool()
    rel = torch.where(mask, raw - raw[:, :1], 0)  # [B, T]; the first frame of every view is real
    limit = config.max_positions - 1
    span = rel.amax(dim=1, keepdim=True)  # [B, 1]
    if video_span is not None:
        whole = video_span[:, 1] * config.position_rate if config.positions == "time" else video_span[:, 0]
        span = torch.maximum(span, torch.round(whole.double()).long().to(span.device)[:, None])
    spread = (span > limit) | (config.positions == "fraction")
    fit = torch.where(spread, torch.round(rel.double() * limit / span.clamp(min=1)).long(), rel)
    # Distinct and inside the table: p_i >= p_(i-1) + 1, and room left for the frames after it.
    i = torch.arange(raw.shape[1], device=raw.device).expand_as(raw)  # [B, T]
    n = mask.sum(dim=1, keepdim=True)  # [B, 1]
    if bool((n <= config.max_positions).all()):
        fit = torch.minimum(i + torch.cummax(fit - i, dim=1).values, limit - (n - 1 - i))
    return torch.where(mask, fit, 0)


class VTN(nn.Module):
    """Temporal encoder + head over per-frame features. `config.backend` picks the attention implementation
    (temporal/attention.py); all have the same parameters, so a state dict of one loads into another."""

    def __init__(self, config: VTNConfig):
        super().__init__()
        config.check()
        self.config = config
        d = config.hidden_size
        # Input normalisation x -> (x - feature_mean) / feature_scale: `vtn train` sets it from the train split and
        # it is saved with the weights, so a loaded model takes raw cached features (identity until set).
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_scale", torch.ones(config.feature_dim))
        self.input_proj = nn.Linear(config.feature_dim, d) if config.feature_dim != d else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(d))
        k = config.temporal_conv
        # PyTorch's own initialisation, not BERT's std 0.02 (_init_weights leaves convolutions alone): a kernel
        # starting at or near zero adds nearly nothing to the projected features at first, and learnt far slower.
        self.temporal_conv = nn.Conv1d(d, d, k, padding=k // 2, groups=d) if k else None
        # Rows 0..max_positions-1 for frames, the last row for [CLS].
        self.position_embeddings = (
            nn.Embedding(config.max_positions + 1, d) if config.positions != "none" else None
        )
        self.embed_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)  # as LongformerEmbeddings, which we bypass
        self.embed_dropout = nn.Dropout(config.dropout)
        self.longformer = backend_class(config.backend)(
            d, config.num_heads, config.intermediate_size, config.windows, config.dropout, config.attention_dropout
        )
        self.head = nn.Sequential(
            nn.LayerNorm(d),
            nn.Linear(d, d),
            nn.GELU(),
            nn.Dropout(config.head_dropout),
            nn.Linear(d, config.num_classes),
        )
        self.apply(self._init_weights)
        nn.init.normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """BERT/Longformer's initialisation, the same for every backend."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        features: torch.Tensor,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        return_attention: bool = False,
        positions_checked: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """features [B, T, D]; mask [B, T] bool (True = a real frame; None = all real); positions [B, T] long
        (ignored where mask is False; None only with positions="none"). `positions_checked`: the caller has
        checked that they lie in the table (temporal/batched.py, whose vmap cannot run a check that reads values).

        Returns logits [B, num_classes], and with return_attention also [CLS]'s global attention of each layer,
        one [B, heads, 1 + T] tensor per layer (index 0 is [CLS] itself, then the frames; padding gets 0).
        """
        cfg = self.config
        if features.dim() != 3 or features.shape[-1] != cfg.feature_dim or features.shape[1] < 1:
            raise UserError(
                f"VTN expects features [batch, frames >= 1, {cfg.feature_dim}] (config.feature_dim), got "
                f"{list(features.shape)}; were they extracted with a different backbone?"
            )
        B, T, _ = features.shape
        mask = torch.ones(B, T, dtype=torch.bool, device=features.device) if mask is None else mask.bool()
        if mask.shape != (B, T):
            raise UserError(f"mask must be [batch, frames] = {[B, T]}, got {list(mask.shape)}")

        x = self.input_proj((features - self.feature_mean) / self.feature_scale)  # [B, T, d]
        if self.temporal_conv is not None:
            x = x * mask[..., None]  # padding (after the real frames) reads as zeros, as beyond a video's end
            x = x + self.temporal_conv(x.transpose(1, 2)).transpose(1, 2)
        cls = self.cls_token.expand(B, 1, -1)  # [B, 1, d]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(self._frame_positions(positions, mask, positions_checked))
            cls = cls + self.position_embeddings.weight[-1]
        h = self.embed_dropout(self.embed_norm(torch.cat([cls, x], dim=1)))  # [B, 1 + T, d]
        valid = F.pad(mask, (1, 0), value=True)  # [B, 1 + T]; [CLS] is always valid

        h, attentions = self.longformer(h, valid, return_attention)
        logits = self.head(h[:, 0])  # [B, num_classes]
        return (logits, tuple(attentions)) if return_attention else logits

    def _frame_positions(self, positions: torch.Tensor | None, mask: torch.Tensor, checked: bool = False
                         ) -> torch.Tensor:
        """Checked position indices [B, T] (`checked`: their range already); padding frames get position 0 (they
        are never attended to)."""
        limit = self.config.max_positions
        if positions is None or positions.shape != mask.shape or positions.is_floating_point():
            got = None if positions is None else f"{positions.dtype} {list(positions.shape)}"
            raise UserError(
                f"VTN with positions='{self.config.positions}' needs integer positions {list(mask.shape)} "
                f"(see frame_positions), got {got}"
            )
        positions = torch.where(mask, positions, 0)
        if not (checked or torch.compiler.is_compiling()) and ((positions < 0) | (positions >= limit)).any():
            raise UserError(
                f"frame positions must lie in [0, {limit}) (config.max_positions), got "
                f"{int(positions.min())}..{int(positions.max())}; shorten or subsample the clip, or raise "
                "max_positions"
            )
        return positions

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        """Normalise inputs as (x - mean) / scale from now on (both [feature_dim]); saved with the weights."""
        self.feature_mean.copy_(mean)
        self.feature_scale.copy_(scale)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json (the resolved VTNConfig) and model.safetensors to `directory`."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(to_dict(self.config), indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, backend: str | None = None) -> VTN:
        """Load a `save_pretrained` directory (on the CPU), optionally into the other backend (checkpoint.load_model)."""
        return load_model(directory, VTNConfig, cls, backend)
