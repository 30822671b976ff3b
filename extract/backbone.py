"""The spatial backbone f(x) and its preprocessing.

One small factory over `timm.create_model(name, num_classes=0)`, which returns one pooled vector per
image (the CLS token for ViTs, global average pooling for CNNs). Weights come from timm (`pretrained`),
from a file (safetensors, or a torch state dict loaded with `weights_only=True`, so a file cannot run
code), or from a seeded random init (tests, benchmarks). Offline, timm's weights come from the local hub cache at
once: the hub is probed with one ~2 s TCP connect, and when it does not answer the download runs in Hugging Face's
offline mode instead of retrying for about a minute. The preprocessing is timm's resolved data config
for the model, applied on the device to uint8 frames: resize the short side to size / crop_pct, centre
crop, scale to 0..1, normalise. On the CPU it resamples uint8 in fixed point as PIL does and reproduces
timm's own eval transform (which works on PIL images) up to rare one-level roundings; on a GPU it resamples
in float, within a grey level of that. It is saved with the cache so every later stage preprocesses the same way.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import inspect
import math
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import torch
import torch.nn.functional as F

from vtn.errors import UserError


class BackboneError(UserError):
    """An unknown model name, unreadable weights, or weights that do not fit the model."""


def create_backbone(
    name: str,
    weights: str | Path | None = None,
    pretrained: bool = False,
    image_size: int | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, dict, dict]:
    """Build the backbone in eval mode on the CPU; returns (model, data_config, identity).

    `data_config` is timm's resolved preprocessing (input_size, interpolation, mean, std, crop_pct,
    crop_mode), with `image_size` overriding the input size. `identity` describes the weights exactly
    (source and the sha256 of the state dict) for the cache's attributes. Random init is seeded with
    `seed`, so every process (each torchrun rank, a resumed run) builds the same weights.
    """
    import timm

    if weights is not None and pretrained:
        raise BackboneError("give either --weights or --pretrained, not both")
    kwargs = {}
    if image_size is not None:
        # ViT-style models fix their position embedding to the input size at construction; CNNs take any size.
        kwargs["img_size"] = image_size
    check_model_name(name)
    offline = pretrained and _hub_offline()
    torch.manual_seed(seed)
    bug = None
    try:
        with _hub_offline_mode() if offline else contextlib.nullcontext():
            try:
                model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
            except TypeError as e:
                if not kwargs:
                    raise
                # A CNN's class has no img_size (it takes any size); only then is the model built without it.
                # A model that takes img_size and still raises TypeError has a bug, which must not be hidden.
                model = timm.create_model(name, pretrained=pretrained, num_classes=0)
                if _takes(type(model), "img_size"):
                    bug = e
    except RuntimeError as e:
        raise BackboneError(f"backbone '{name}': {e}") from None
    except Exception as e:
        if not pretrained:
            raise
        raise BackboneError(_missing_weights_message(name, offline, e)) from None
    if bug is not None:
        raise bug
    identity = {"name": name, "weights": "random-init", "seed": seed}
    if pretrained:
        identity = {"name": name, "weights": "timm-pretrained", "pretrained_tag": model.pretrained_cfg.get("tag")}
    if weights is not None:
        identity = {"name": name, "weights": "file", "weights_file_sha256": load_weights(model, weights)}
    model.eval()
    identity["weights_sha256"] = state_dict_sha256(model)
    identity["feature_dim"] = pooled_dim(model)
    overrides = {"input_size": (3, image_size, image_size)} if image_size is not None else {}
    data_config = timm.data.resolve_data_config(overrides, model=model)
    return model, data_config, identity


def pooled_dim(model: torch.nn.Module) -> int:
    """The size of a timm backbone's pooled vector (num_classes=0): timm's head_hidden_size where a head
    convolution follows the pooling (MobileNetV3 gives 1024 features, not its num_features of 288), else
    num_features."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


class Intermediates(torch.nn.Module):
    """A timm backbone whose per-frame vector is the pooled output of chosen blocks (`layers`, indices into
    forward_intermediates' blocks, negative from the last), concatenated in that order: dinov2's linear evaluation
    reads the last blocks' [CLS] this way. A token model's block is taken after the final norm and pooled by its
    own head ([CLS], or the mean of the patch tokens), so layer -1 is the model's ordinary output; a CNN's stage is
    average-pooled over its map (the ordinary output of models that pool the last stage that way, ResNets; not of
    those with a head convolution after the pooling, MobileNetV3)."""

    def __init__(self, model: torch.nn.Module, layers: tuple[int, ...], size: tuple[int, int]):
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise BackboneError(f"--layers: timm's {type(model).__name__} has no forward_intermediates")
        self.model, self.layers = model, tuple(layers)
        self.tokens = "return_prefix_tokens" in inspect.signature(model.forward_intermediates).parameters
        example = torch.zeros(1, 3, *size)  # one frame of the preprocessed size
        with torch.no_grad():
            blocks = len(model.blocks) if self.tokens else len(
                model.forward_intermediates(example, indices=None, intermediates_only=True))
        if any(not -blocks <= i < blocks for i in layers) or len({i % blocks for i in layers}) != len(layers):
            raise BackboneError(f"--layers {','.join(map(str, layers))}: {type(model).__name__} has {blocks} blocks; "
                                f"give distinct indices in {-blocks}..{blocks - 1}")
        self.order = sorted(range(len(layers)), key=lambda k: layers[k] % blocks)  # forward_intermediates' order
        with torch.no_grad():
            self.num_features = int(self(example).shape[1])  # timm's name, so pooled_dim reads it as for any backbone

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)  # timm's forward_intermediates recomputes its blocks as forward does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"norm": True, "output_fmt": "NLC", "return_prefix_tokens": True} if self.tokens else {}
        taken = self.model.forward_intermediates(x, indices=list(self.layers), intermediates_only=True, **kwargs)
        if self.tokens:  # (patch tokens [B, L, C], prefix tokens [B, P, C]) -> the whole sequence, pooled as the model does
            pooled = [self.model.forward_head(torch.cat([prefix, y], dim=1), pre_logits=True) for y, prefix in taken]
        else:  # [B, C, H, W] -> [B, C]
            pooled = [y.mean(dim=(2, 3)) for y in taken]
        by_layer = [None] * len(pooled)
        for k, p in zip(self.order, pooled):
            by_layer[k] = p
        return torch.cat(by_layer, dim=1)  # [B, sum of the blocks' C], in the order of `layers`


def timm_model(backbone: torch.nn.Module) -> torch.nn.Module:
    """The timm model of a backbone (an Intermediates wraps one): its weights, under timm's names, are what a
    weights file holds and what `state_dict_sha256` identifies."""
    return backbone.model if isinstance(backbone, Intermediates) else backbone


def _takes(cls: type, arg: str) -> bool:
    """Whether constructing `cls` accepts the keyword `arg` (a parameter of that name, or **kwargs)."""
    params = inspect.signature(cls).parameters.values()
    return any(p.name == arg or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def check_model_name(name: str) -> None:
    """Refuse a name timm does not know, suggesting the closest of its models (timm's own error lists none).

    Names with a source prefix (`hf-hub:...`, `local-dir:...`) are left to timm. A pretrained tag
    (`resnet50.a1_in1k`) is stripped for the lookup; timm checks the tag itself.
    """
    import timm
    from timm.models import get_arch_name

    if ":" in name or "/" in name or timm.is_model(name):
        return
    arch = get_arch_name(name)
    # Names that extend what was typed first (`vit_base_patch16` -> `vit_base_patch16_224`), then by similarity.
    scored = ((m, difflib.SequenceMatcher(None, arch, m).ratio()) for m in timm.list_models())
    close = sorted(((m, r) for m, r in scored if r >= 0.6), key=lambda mr: (not mr[0].startswith(arch), -mr[1], mr[0]))
    hint = f"closest: {', '.join(m for m, _ in close[:5])}" if close else "no close name"
    raise BackboneError(f"unknown timm model '{name}'; {hint} (timm.list_models() lists them all)")


def _hub_offline(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub is out of reach: HF_HUB_OFFLINE is set, or a TCP connection to the hub
    (HF_ENDPOINT, or the HTTPS proxy that leads to it) does not open within `timeout` seconds.

    Only a connection is opened and closed; nothing is sent. The probe runs in a thread so that a slow DNS
    lookup, which a socket timeout does not bound, cannot hold the job either.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = getproxies().get(url.scheme)
    if proxy and not proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname, proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
    done, reached = threading.Event(), []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass
        done.set()

    threading.Thread(target=probe, name="vtn-hub-probe", daemon=True).start()
    done.wait(timeout)  # returns at once when the lookup or the connection fails
    return not reached


@contextlib.contextmanager
def _hub_offline_mode():
    """Hugging Face's offline mode for the calls inside: downloads are looked up in the local hub cache only.

    huggingface_hub reads HF_HUB_OFFLINE once, at import, into `constants.HF_HUB_OFFLINE`, and checks that
    value on every request; setting it is how the environment variable takes effect in a running process.
    """
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _missing_weights_message(name: str, offline: bool, error: Exception) -> str:
    """Why timm's pretrained weights could not be loaded, and the three ways forward."""
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    try:
        repo = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
    except RuntimeError:
        repo = None
    where = f"the hub repo '{repo}'" if repo else "its files"
    why = ("the Hugging Face hub is not reachable (offline) and they are not in the local hub cache"
           if offline else f"{type(error).__name__}: {error}")
    return (
        f"backbone '{name}': cannot load timm's pretrained weights ({why}). Either give the weights file with "
        f"--weights FILE; or put {where} into the local Hugging Face hub cache ({constants.HF_HUB_CACHE}; set "
        f"HF_HOME or HF_HUB_CACHE to use another), e.g. copied from a machine where timm downloaded it; "
        f"or use --random-init"
    )


def load_weights(model: torch.nn.Module, path: str | Path) -> str:
    """Load a safetensors file or a torch state dict into `model`; returns the file's sha256.

    Accepts a bare state dict or one under "state_dict"/"model", with or without DDP's "module." prefix.
    A classifier head in the file (the model was built without one) is ignored; any other missing or
    unexpected key is refused, naming the file and the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path}: not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    head = model.pretrained_cfg.get("classifier")
    heads = (head,) if isinstance(head, str) else tuple(head or ())
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not any(k.startswith(h + ".") for h in heads)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise BackboneError(
            f"{path}: weights do not fit {type(model).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BackboneError(f"{path}: weights do not fit the model: {e}") from None
    return file_sha256(path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes, in name order).

    It identifies the weights whatever file or hub they came from, so a cache can be matched to the exact
    backbone that made it.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def preprocessing_attrs(data_config: dict) -> dict:
    """The resolved preprocessing as plain values, for the cache's attributes."""
    _, h, w = data_config["input_size"]
    return {
        "input_size": [int(h), int(w)],
        "crop_pct": float(data_config["crop_pct"]),
        "crop_mode": data_config.get("crop_mode", "center"),
        "interpolation": data_config["interpolation"],
        "mean": [float(x) for x in data_config["mean"]],
        "std": [float(x) for x in data_config["std"]],
        "scale_size": list(_scale_size(int(h), int(w), float(data_config["crop_pct"]))),
        "value_range": "uint8 RGB / 255, then (x - mean) / std",
    }


def _scale_size(h: int, w: int, crop_pct: float) -> tuple[int, int]:
    # timm's eval transform: the resize target before the crop is size / crop_pct, floored.
    return math.floor(h / crop_pct), math.floor(w / crop_pct)


class Preprocess(torch.nn.Module):
    """uint8 RGB frames [N, H, W, 3] (any size) -> normalised float [N * crops, 3, h, w], channels_last, on their device.

    Mirrors timm's eval transform: for a square input size the short side is resized to
    floor(size / crop_pct) (the long side scaled in proportion, truncated as torchvision does), otherwise
    (or with crop_mode "squash") both sides are resized to floor(size / crop_pct); then a centre crop to the
    input size. Resampling is antialiased and rounded back to 0..255 like the uint8 image timm resizes.
    """

    def __init__(self, data_config: dict, crops: int = 1):
        super().__init__()
        if crops not in (1, 3):
            raise BackboneError(f"crops must be 1 (centre) or 3 (left/top, centre, right/bottom), got {crops}")
        self.crops = crops
        self.attrs = preprocessing_attrs(data_config)
        mode = self.attrs["crop_mode"]
        if mode not in ("center", "squash"):
            raise BackboneError(f"preprocessing crop_mode '{mode}' is not supported (center, squash)")
        interpolation = self.attrs["interpolation"]
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            # timm's "random"/"lanczos" have no torch equivalent; another one would be used while the cache
            # records this one.
            raise BackboneError(f"preprocessing interpolation '{interpolation}' is not supported (bilinear, bicubic, "
                                "nearest)")
        self.interpolation = interpolation
        self.size = tuple(self.attrs["input_size"])
        self.squash = mode == "squash" or self.size[0] != self.size[1]
        self.register_buffer("mean", torch.tensor(self.attrs["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(self.attrs["std"]).view(1, 3, 1, 1) * 255, persistent=False)

    def resize_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) a frame of this size is resized to before the centre crop."""
        sh, sw = _scale_size(*self.size, self.attrs["crop_pct"])
        if self.squash:
            return sh, sw
        if height <= width:
            return sh, int(sh * width / height)
        return int(sh * height / width), sh

    # Frames are converted to float in slices of about this many pixels, so a chunk of 4K frames
    # never becomes one multi-GiB float tensor.
    slice_pixels = 4 << 20

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        n, height, width = frames.shape[:3]
        step = max(1, self.slice_pixels // (height * width))
        if n > step:
            return torch.cat([self._forward(frames[i: i + step]) for i in range(0, n, step)])
        return self._forward(frames)

    def _forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2)  # [N, 3, H, W] uint8, a channels_last view
        rh, rw = self.resize_shape(x.shape[2], x.shape[3])
        if (rh, rw) != tuple(x.shape[2:]):
            antialias = self.interpolation != "nearest"
            align = None if self.interpolation == "nearest" else False
            if x.device.type == "cpu":
                # The CPU resamples uint8 directly, in fixed point as PIL does: several times faster than in float.
                x = F.interpolate(x, size=(rh, rw), mode=self.interpolation, antialias=antialias, align_corners=align)
            else:
                x = F.interpolate(x.float(), size=(rh, rw), mode=self.interpolation, antialias=antialias,
                                  align_corners=align).round_().clamp_(0, 255)
        h, w = self.size
        top, left = int(round((rh - h) / 2.0)), int(round((rw - w) / 2.0))  # torchvision's centre crop
        if self.crops == 1:
            x = x[:, :, top: top + h, left: left + w]  # [N, 3, h, w]
        else:  # PySlowFast's 3-crop test: both ends and the centre of the long side, frame by frame
            spots = [(top, 0), (top, left), (top, rw - w)] if rw >= rh else [(0, left), (top, left), (rh - h, left)]
            x = torch.stack([x[:, :, t: t + h, l: l + w] for t, l in spots], dim=1)  # [N, 3 crops, 3, h, w]
            x = x.flatten(0, 1)  # [N * 3, 3, h, w]: frame 0's crops, then frame 1's, ...
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)  # [N * crops, 3, h, w]


def compile_backbone(model: torch.nn.Module, example: torch.Tensor, autocast) -> torch.nn.Module:
    """`torch.compile` the backbone for inference, with frozen weights (inductor folds batch norm into the
    convolutions and prepacks their weights), and compile it now on `example`, a batch of the job's fixed
    shape, so that a failure is reported before any video is read and the compile time stays out of the
    progress figures. Features equal eager mode up to float rounding, not bitwise.
    """
    compiled = torch.compile(model, options={"freezing": True})
    try:
        with torch.inference_mode(), autocast:
            compiled(example)
    except Exception as e:  # inductor's errors are many and deep; what the user needs is the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BackboneError(f"--compile failed for this backbone ({type(e).__name__}: {first}); "
                            "run without --compile (on the CPU inductor needs a C++ compiler)") from None
    return compiled
