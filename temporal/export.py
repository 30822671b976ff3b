"""What leaves vtn: a trained run as a Hugging Face model folder, and its encoder as a deployable graph.

`export_folder` writes the files `huggingface_hub`'s ModelHubMixin writes (config.json, model.safetensors, a
README.md model card) plus inputs.json (the backbone's identity and the sampling the features came from), so
`vtn predict --model DIR` and `VTN.from_pretrained(DIR)` take the folder as they take a checkpoint; with the
backbone's weights file (backbone.safetensors) when they are not timm's. Pushing it is huggingface_hub's own
`upload_folder`: nothing here talks to the network.

`export_onnx` writes the temporal encoder + head (the feature normalisation inside) as ONNX with a dynamic batch
and length: inputs `features` [batch, frames, D] float32 and, unless the model has no position table
(model.positions="none"), `positions` [batch, frames] int64 (frame_positions' rule); output `logits` [batch,
classes]. The graph comes from the TorchScript tracer (torch.onnx's dynamo=False path) over the `fast` backend
with every layer's band attention run as one dense block (`one_block`): the same function at any length, with no
branch on the length for a trace to freeze. (torch.onnx's dynamo path exports the same module to the same logits,
but takes several times as long.) `export_torchscript` saves the same trace as a TorchScript file for
`torch.jit.load`, with the config in its extra file `vtn_config.json`.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from vtn.config import to_dict
from vtn.errors import UserError
from vtn.temporal.checkpoint import CONFIG_NAME, INPUTS_NAME, WEIGHTS_NAME, locate, read_inputs
from vtn.temporal.e2e import BACKBONE_FILE, load_temporal
from vtn.temporal.model import VTN

CARD_NAME = "README.md"
FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, INPUTS_NAME, CARD_NAME, BACKBONE_FILE)


def export_folder(run: str | Path, out: str | Path, checkpoint: str = "best", with_backbone: bool = False) -> dict:
    """Write RUN's `checkpoint` (a stage-two or fine-tuned run, or a checkpoint directory) into the folder `out`:
    the temporal model alone (config.json, model.safetensors), inputs.json and the model card; `with_backbone`
    adds the backbone's weights as backbone.safetensors when they are a file (a fine-tuned backbone, or --weights
    at extraction), recorded there by name. Returns what it wrote: {"files": [...], "backbone": note}."""
    ckpt = locate(run, checkpoint)
    inputs = read_inputs(ckpt)
    if not inputs or not inputs.get("backbone_config"):
        raise UserError(f"{ckpt}: the checkpoint does not record the backbone its features came from (trained on an "
                        "imported cache, or by an older vtn); `vtn predict` could not use the exported folder")
    if Path(out).resolve() == ckpt.resolve():
        raise UserError(f"{out}: the checkpoint being exported; choose another --out")
    out = _folder(Path(out))
    model = load_temporal(ckpt)
    model.save_pretrained(out)
    weights = inputs["backbone_config"].get("weights")
    source = ckpt / BACKBONE_FILE if weights == BACKBONE_FILE else Path(weights or "")
    if weights in ("pretrained", "random"):
        note = f"{weights} timm weights of {inputs['backbone_config']['name']}: rebuilt from the identity, not copied"
    elif with_backbone:
        if not source.is_file():
            raise UserError(f"{ckpt}: its backbone weights file {source} is not there to copy")
        shutil.copyfile(source, out / BACKBONE_FILE)
        inputs = {**inputs, "backbone_config": {**inputs["backbone_config"], "weights": BACKBONE_FILE}}
        note = f"weights copied from {source} into {BACKBONE_FILE}"
    else:
        note = f"weights file {source} not copied (add --with-backbone); `vtn predict` needs it, or --weights"
    (out / INPUTS_NAME).write_text(json.dumps(inputs, indent=2) + "\n")
    (out / CARD_NAME).write_text(model_card(model, inputs, _state(ckpt), _state(ckpt.parent / "last"), note))
    return {"files": sorted(p.name for p in out.iterdir()), "backbone": note, "checkpoint": str(ckpt)}


def _folder(out: Path) -> Path:
    """`out`, empty or a folder this export wrote before (its files are replaced); never anything else."""
    if out.exists() and (not out.is_dir() or any(p.name not in FOLDER_FILES for p in out.iterdir())):
        raise UserError(f"{out}: exists and holds other files than an exported model's; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / BACKBONE_FILE).unlink(missing_ok=True)
    return out


def _state(ckpt: Path) -> dict:
    path = ckpt / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def model_card(model: VTN, inputs: dict, best: dict, last: dict, backbone_note: str) -> str:
    """The README.md of an exported folder: front matter for the Hub, then what the model is, what it was trained
    on, how well it did, and how to run it."""
    cfg, bb = model.config, inputs.get("backbone") or {}
    pre = bb.get("preprocessing") or {}
    data = (last.get("data") or {})
    metrics = {k: v for k, v in best.items() if k.startswith("val_") and isinstance(v, (int, float))}
    names = ", ".join(cfg.class_names) or f"{cfg.num_classes} classes"
    lines = [
        "---", "library_name: vtn", "pipeline_tag: video-classification", "tags:", "- video-classification",
        "- vtn", "- longformer", "---", "",
        "# VTN temporal encoder", "",
        f"A Video Transformer Network (Neimark et al., 2021) encoder and head over per-frame features of "
        f"`{bb.get('name')}`: {cfg.num_layers} Longformer layers of width {cfg.hidden_size}, windows "
        f"{list(cfg.windows)}, up to {cfg.max_positions} frame positions ({cfg.positions}); "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters. Classes: {names}.", "",
        "## Inputs", "",
        f"- backbone: `{bb.get('name')}`, weights sha256 `{bb.get('weights_sha256')}` ({backbone_note})",
        f"- preprocessing: {json.dumps(pre)}",
        f"- sampling: {json.dumps(inputs.get('sampling'))}",
        f"- training clips: {inputs.get('clip_frames')} frames, stride {inputs.get('stride')}", "",
        "## Training", "",
        f"- cache: `{inputs.get('cache')}`; {data.get('train_videos', '?')} train videos",
        f"- best checkpoint: epoch {best.get('epoch')}, step {best.get('step')}", "",
        "## Metrics (validation, whole videos)", "", "| metric | value |", "| --- | --- |",
        *[f"| {k} | {v:.4f} |" for k, v in metrics.items()], "",
        "## Use", "", "```bash", "pip install vtn", "vtn predict VIDEO_OR_FOLDER --model THIS_FOLDER", "```", "",
        "```python", "from vtn.temporal.model import VTN", "model = VTN.from_pretrained('THIS_FOLDER')  # features -> logits",
        "```", "",
        "Upload: `huggingface_hub.upload_folder(repo_id=..., folder_path='THIS_FOLDER')`.", "",
        f"Model config: `{json.dumps(to_dict(cfg))}`", "",
    ]
    return "\n".join(lines)


# -- deployable graphs -------------------------------------------------------------------------------------------

class Encoder(torch.nn.Module):
    """VTN over a batch of views without padding, as exported: (features [B, T, D], positions [B, T]) -> logits;
    positions None for a model without a position table. A copy of the model in eval mode, every band attention one
    dense block (see the module docstring)."""

    def __init__(self, model: VTN):
        super().__init__()
        self.vtn = copy.deepcopy(model).float().eval()
        if self.vtn.config.backend != "fast":
            raise UserError(f"export takes the `fast` backend; this model runs `{self.vtn.config.backend}` "
                            "(load it with backend='fast': the weights are the same)")
        for module in self.vtn.modules():
            if hasattr(module, "one_block"):
                module.one_block = True

    def forward(self, features: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        # Positions are the caller's to keep in [0, max_positions): a check would read values, which a graph cannot.
        return self.vtn(features, None, positions, positions_checked=True)


def example_inputs(model: VTN, frames: int = 24, batch: int = 2) -> dict[str, torch.Tensor]:
    """The graph's inputs by name for a `frames`-frame view: random features, and the positions 0..frames-1 when the
    model reads positions (a traced graph drops an input it never reads)."""
    inputs = {"features": torch.randn(batch, frames, model.config.feature_dim)}
    if model.config.positions != "none":
        inputs["positions"] = torch.arange(frames).expand(batch, frames).contiguous()
    return inputs


def export_onnx(model: VTN, path: str | Path) -> Path:
    """The encoder + head as an ONNX file with dynamic batch and frames; the VTN config and class names are in its
    metadata (`vtn_config`)."""
    try:
        import onnx
    except ModuleNotFoundError:
        raise UserError("--onnx needs the onnx package: pip install 'vtn[onnx]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = Encoder(model)
    inputs = example_inputs(model)
    with torch.no_grad():
        torch.onnx.export(encoder, tuple(inputs.values()), str(path), dynamo=False, opset_version=18,
                          input_names=list(inputs), output_names=["logits"],
                          dynamic_axes={**{name: {0: "batch", 1: "frames"} for name in inputs},
                                        "logits": {0: "batch"}})
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {"vtn_config": json.dumps(to_dict(model.config))})
    onnx.save(graph, str(path))
    return path


def export_torchscript(model: VTN, path: str | Path) -> Path:
    """The encoder + head as a TorchScript file (the trace `export_onnx` converts): the same inputs and logits, any
    batch and length; the VTN config and class names in its extra file `vtn_config.json`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(Encoder(model), tuple(example_inputs(model).values()))
    torch.jit.save(traced, str(path), _extra_files={"vtn_config.json": json.dumps(to_dict(model.config))})
    return path
