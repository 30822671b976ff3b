"""Checkpoints of a training run: directories of safetensors + JSON, swapped in whole, never pickle.

A checkpoint directory holds the model (`config.json` + `model.safetensors`, see VTN.save_pretrained),
`inputs.json` (what the features it was trained on were: the cache's backbone identity and sampling, which
every consumer checks), `state.json` (the run's counters and metrics); `last/` adds the optimiser state and
every process's RNG state, so a run resumes exactly. Written by `vtn train` and `vtn finetune`.

Each rule about checkpoints is here once: which checkpoint of a run a consumer takes (`locate`), how a model is
loaded from one (`load_model`), what "the same backbone" means (`backbone_differences`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vtn.config import merge
from vtn.errors import UserError

CONFIG_NAME = "config.json"  # a saved VTN: its VTNConfig as JSON, beside
WEIGHTS_NAME = "model.safetensors"  # its weights

INPUTS_NAME = "inputs.json"


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file (on the CPU). Every loader of a checkpoint reads through
    here, so a damaged file (truncated by a full disk or a cut copy) is refused by name, not a SafetensorError."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise UserError(f"{path}: cannot read this checkpoint file, it is damaged or incomplete ({e}); copy it again, "
                        "or use the run's other checkpoint (best/ or last/)") from None


def replace_dir(tmp: Path, final: Path) -> None:
    """Put `tmp` in the place of `final`; a crash at any point leaves `final` or `final`.old complete."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find(run: Path, name: str) -> Path | None:
    """The complete checkpoint `name` (best, last) of a run, or its previous copy if a swap was cut short."""
    for d in (run / name, run / (name + ".old")):
        if (d / "state.json").is_file():
            return d
    return None


def locate(run: str | Path, name: str = "best") -> Path:
    """The checkpoint every consumer (evaluate, predict, finetune) takes from RUN: RUN itself when it is a checkpoint
    directory (it holds a model), else its checkpoint `name` as `find` gives it; refused when neither."""
    run = Path(run)
    if (run / CONFIG_NAME).is_file():
        return run
    found = find(run, name)
    if found is None and (run / "zarr.json").is_file():  # a feature cache given where a run is expected
        model = run.with_name(f"{run.stem}-run")
        raise UserError(f"{run}: a feature cache, not a training run; train one on it first (vtn train {run} --out "
                        f"{model}) and give that run ({model}) here")
    if found is None:
        raise UserError(f"{run}: neither a training run with a {name}/ checkpoint nor a checkpoint directory")
    return found


def load_model(directory: str | Path, config_cls: type, build: Callable[[Any], torch.nn.Module],
               backend: str | None = None, needs: tuple[str, ...] = (), what: str = "VTN",
               skip: str | None = None) -> torch.nn.Module:
    """A model from a checkpoint directory, on the CPU: config.json over `config_cls`'s defaults (type-checked,
    optionally into another attention `backend`; a field it lacks takes `config_cls.SAVED_BEFORE`'s value where
    that has one), `build(config)` makes the module, and model.safetensors fills it,
    every weight checked to fit (those whose names start with `skip` are left out). Refused, naming the files,
    when `directory` lacks config.json, model.safetensors or one of `needs`. Safe to load untrusted files: JSON
    and safetensors, no pickle."""
    path = Path(directory)
    files = [path / n for n in (CONFIG_NAME, WEIGHTS_NAME, *needs)]
    if not all(f.is_file() for f in files):
        raise UserError(f"{path}: not a {what} checkpoint (needs {', '.join(f.name for f in files)})")
    saved = json.loads((path / CONFIG_NAME).read_text())
    config = merge(config_cls(), {**getattr(config_cls, "SAVED_BEFORE", {}), **saved})
    if backend is not None:
        config = merge(config, {"backend": backend})
    model = build(config)
    state = load_tensors(path / WEIGHTS_NAME)
    if skip is not None:
        state = {k: v for k, v in state.items() if not k.startswith(skip)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model


def write_model(path: Path, model, info: dict, inputs: dict) -> None:
    """`model` is anything with VTN's save_pretrained (a VTN, or backbone + VTN when fine-tuning). A fine-tuned
    backbone records itself as the backbone of the features (VideoVTN.finetuned_inputs)."""
    model.save_pretrained(path)
    if hasattr(model, "finetuned_inputs"):
        inputs = model.finetuned_inputs(inputs, path)
    (path / INPUTS_NAME).write_text(json.dumps(inputs, indent=2) + "\n")
    (path / "state.json").write_text(json.dumps(info, indent=2) + "\n")


def save_best(run: Path, model, record: dict, inputs: dict) -> None:
    tmp = run / "best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model(tmp, model, record, inputs)
    replace_dir(tmp, run / "best")


def save_last(run: Path, model, opt, scaler, rng_states: list[dict], state: dict, inputs: dict) -> None:
    """`last/`: the model, the optimiser (tensors in safetensors, the rest in state.json) and the RNG states."""
    tmp = run / "last.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain.setdefault(str(i), {})[k] = v
    write_model(tmp, model, {**state, "optimizer": {"param_groups": sd["param_groups"], "state": plain},
                             "scaler": scaler.state_dict()}, inputs)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {f"{kind}.{r}": torch.frombuffer(bytearray(b), dtype=torch.uint8)
           for r, states in enumerate(rng_states) for kind, b in states.items()}
    save_file(rng, str(tmp / "rng.safetensors"))
    replace_dir(tmp, run / "last")


def load_last(ckpt: Path, model, opt, scaler, rank: int, device: torch.device) -> dict:
    """Restore weights, optimiser, scaler and this rank's RNG from `last/`; returns its saved state."""
    state = json.loads((ckpt / "state.json").read_text())
    model.load_state_dict(load_tensors(ckpt / WEIGHTS_NAME))  # weights and the feature normalisation
    meta = state.pop("optimizer")
    tensors: dict[int, dict] = {}
    for key, v in load_tensors(ckpt / "optimizer.safetensors").items():
        i, k = key.split(".", 1)
        tensors.setdefault(int(i), {})[k] = v
    for i, d in meta["state"].items():
        tensors.setdefault(int(i), {}).update(d)
    opt.load_state_dict({"state": tensors, "param_groups": meta["param_groups"]})
    scaler.load_state_dict(state.pop("scaler"))
    rng = load_tensors(ckpt / "rng.safetensors")
    torch.set_rng_state(rng[f"cpu.{rank}"])
    if device.type == "cuda" and f"cuda.{rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{rank}"], device)
    return state


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state().numpy().tobytes()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).numpy().tobytes()
    return state


def read_inputs(ckpt: Path) -> dict | None:
    """The recorded inputs of a checkpoint (None for checkpoints written before they were recorded)."""
    path = ckpt / INPUTS_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def clip_settings(inputs: dict | None) -> tuple[int, int]:
    """The training clip (frames, stride in cached frames) recorded with a checkpoint; stage two's defaults
    for checkpoints written before it was recorded."""
    inputs = inputs or {}
    return int(inputs.get("clip_frames", 16)), int(inputs.get("stride", 8))


# "The same backbone" for every consumer of recorded features (a cache against a checkpoint, a rebuilt backbone
# against its record): its timm name, its weights and its preprocessing.
BACKBONE_IDENTITY = ("name", "weights_sha256", "preprocessing")


def backbone_differences(recorded: dict | None, actual: dict | None) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, actual value) for each key of BACKBONE_IDENTITY on which two identities differ."""
    recorded, actual = recorded or {}, actual or {}
    return [(k, recorded.get(k), actual.get(k)) for k in BACKBONE_IDENTITY if recorded.get(k) != actual.get(k)]
