"""The one rule for writing over an output path: replace only what vtn itself wrote, never the input.

A new user's `vtn extract data/videos --out data/videos --overwrite` once deleted the videos, and
`--out some_folder --overwrite` deleted an unrelated file. So every command that writes over something asks
here first, and anything that is not vtn's own output is refused with a `UserError` naming the path and the
reason, before anything is touched:

- a feature cache (`vtn extract`, `vtn store import`): a new path, an empty folder, or a vtn cache (a Zarr
  group whose root attributes hold `vtn_schema`); `--overwrite` replaces only a vtn cache, never a folder
  that contains the input or lies inside an input folder; a file is never a cache;
- an HDF5 export (`vtn store export`): a new file, or with `--overwrite` an HDF5 file written by vtn export
  (root attribute `vtn_cache_attrs`);
- an output folder (`check_run_dir`): a run directory (`vtn train`, `vtn finetune`, and `vtn report`, which draws
  into one), a sweep directory (`vtn sweep`), an evaluation (`vtn evaluate --out`), probes (`vtn probe --out`): a
  new path, an empty folder, or what that command itself wrote there, recognised by its files (OUTPUT_KINDS). A
  folder of the user's (notes, a thesis, an unrelated metrics.jsonl) is never written into.

Only the standard library and vtn.errors at module level: every command imports this before its heavy work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from vtn.errors import UserError

SCHEMA_KEY = "vtn_schema"  # the root attribute that marks a vtn cache (vtn.store.layout.SCHEMA_KEY)
# What a vtn cache folder holds (store/layout.py, store/lease.py); `--overwrite` removes nothing else.
CACHE_ENTRIES = ("zarr.json", "parts", "index", "writers")
EXPORT_KEY = "vtn_cache_attrs"  # the root attribute `vtn store export` writes into its HDF5 files


def is_remote(url: str) -> bool:
    """An fsspec URL (`s3://…`, `memory://…`) rather than a local path."""
    return "://" in str(url)


def canonical_cache(url: str | os.PathLike) -> str:
    """A cache's place as recorded with a run and compared on resume: a local path absolute and resolved (so
    `./c.zarr`, `c.zarr` and a link to it are one cache, and a run started in another folder finds it); a remote
    URL as given."""
    return str(url) if is_remote(str(url)) else os.path.realpath(os.path.expanduser(os.fspath(url)))


def is_vtn_cache(url: str, storage_options: dict | None = None) -> bool:
    """True when `url` holds a Zarr group with the `vtn_schema` root attribute (any schema version)."""
    if not is_remote(url):
        meta = Path(url) / "zarr.json"
        try:
            doc = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and doc.get("node_type") == "group" and SCHEMA_KEY in (doc.get("attributes") or {})
    import zarr  # remote: let zarr open it (whatever fsspec store it maps to) and read the attribute
    from zarr.errors import BaseZarrError

    try:
        return SCHEMA_KEY in zarr.open_group(str(url), mode="r", storage_options=storage_options).attrs
    except (FileNotFoundError, BaseZarrError, json.JSONDecodeError):
        # Nothing there (zarr's GroupNotFoundError is a FileNotFoundError), an array, or metadata that is not a
        # group's. A refused login or a network error says nothing about what is there: it propagates.
        return False


def _remote_has_content(url: str, storage_options: dict | None) -> bool:
    """Whether anything at all is stored at or under the remote `url`."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    try:
        return bool(fs.exists(path) and (fs.isfile(path) or fs.ls(path, detail=False)))
    except FileNotFoundError:
        return False


def _check_inputs(out: Path, inputs: Iterable[str | os.PathLike], overwrite: bool, label: str) -> None:
    """Refuse an existing `out` that is or contains an input, or (to be replaced) lies inside an input folder.

    Paths are compared resolved (links followed). A manifest may list hundreds of thousands of videos, so each
    folder is resolved once and a file only when it is itself a link: plain string prefixes after that.
    """
    real_out = os.path.realpath(out)
    folders: dict[str, str] = {}
    for item in inputs:
        text = os.fspath(item)
        if is_remote(text):
            continue  # a remote input cannot be inside a local folder
        head, name = os.path.split(os.path.abspath(text))
        if head not in folders:
            folders[head] = os.path.realpath(head)
        real_in = os.path.realpath(text) if os.path.islink(text) else os.path.join(folders[head], name)
        if real_in == real_out or real_in.startswith(real_out.rstrip(os.sep) + os.sep):
            what = "is the input" if real_in == real_out else f"contains the input {item}"
            raise UserError(f"{out}: {what}; write the {label} somewhere else (nothing was changed)")
        # Only a folder can have `out` inside it, so no need to ask whether the input is one.
        if overwrite and real_out.startswith(real_in.rstrip(os.sep) + os.sep):
            raise UserError(f"{out}: lies inside the input folder {item}; --overwrite never replaces anything "
                            f"there, write the {label} somewhere else (nothing was changed)")


def _zarr_temporary(name: str) -> bool:
    """zarr.json's temporary while it is written (zarr.<hex>.partial): the cache's own, or a cache being created."""
    return name.startswith("zarr.") and name.endswith(".partial")


def check_cache_out(out: str, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                    storage_options: dict | None = None) -> None:
    """Refuse to write (or with `overwrite`, replace) a cache at `out` unless that can only touch a vtn cache.

    `inputs` are the command's input paths (a folder, a CSV manifest and every video it lists, an HDF5 file):
    a cache may never be or contain one of them, nor be replaced inside an input folder.
    Raises UserError naming `out` and why; returns None when writing is safe.
    """
    out = str(out)
    if is_remote(out):
        # Remote inputs are not supported, so only the target itself matters: replace only a vtn cache.
        if overwrite and not is_vtn_cache(out, storage_options) and _remote_has_content(out, storage_options):
            raise UserError(f"{out}: not a vtn cache (it holds data, but no Zarr group with a '{SCHEMA_KEY}' "
                            "attribute); --overwrite replaces only a vtn cache, so nothing was changed")
        return
    path = Path(out).expanduser()
    if not path.exists():
        if path.is_symlink():  # a dangling link: writing would follow it somewhere unexpected
            raise UserError(f"{out}: is a broken symbolic link; choose another --out (nothing was changed)")
        return
    if not path.is_dir():
        raise UserError(f"{out}: is a file, not a cache folder; choose another --out (nothing was changed)")
    cache = is_vtn_cache(out)
    if cache and not overwrite:
        return  # adding parts to an existing cache deletes nothing
    _check_inputs(path, inputs, overwrite, "cache")
    if cache:
        foreign = sorted(p.name for p in path.iterdir() if p.name not in CACHE_ENTRIES and not _zarr_temporary(p.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UserError(f"{out}: holds things that are not part of the cache ({shown}); --overwrite would "
                            "delete them with it, so nothing was changed: move them out first")
        return
    if all(_zarr_temporary(p.name) for p in path.iterdir()):  # empty, or another writer is creating it now
        return
    if overwrite:
        raise UserError(f"{out}: not a vtn cache (a folder with other content, no zarr.json with a '{SCHEMA_KEY}' "
                        "attribute); --overwrite replaces only a vtn cache, so nothing was changed: choose another --out")
    raise UserError(f"{out}: not a vtn cache (a folder with other content, no zarr.json with a '{SCHEMA_KEY}' "
                    "attribute); a cache is written only into a new or empty folder or an existing cache: "
                    "choose another --out")


def is_vtn_export(path: str | os.PathLike) -> bool:
    """True when `path` is an HDF5 file written by `vtn store export` (root attribute `vtn_cache_attrs`)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return EXPORT_KEY in f.attrs
    except (OSError, ValueError):
        return False


def check_export_out(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> None:
    """Refuse an HDF5 export target that exists, unless `overwrite` and it is a file vtn export wrote."""
    path = Path(out).expanduser()
    if not path.exists() and not path.is_symlink():
        return  # a new file: nothing to lose
    if path.is_dir():
        raise UserError(f"{out}: is a folder; --out names the .h5 file to write (nothing was changed)")
    _check_inputs(path, inputs, overwrite, "export")
    if not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace a file that vtn store export wrote, "
                        "or choose another --out (nothing was changed)")
    if not is_vtn_export(path):
        raise UserError(f"{out}: is not an HDF5 file written by vtn store export (no '{EXPORT_KEY}' root "
                        "attribute); --overwrite replaces only such a file, so nothing was changed")


def is_vtn_run(path: str | os.PathLike) -> bool:
    """A folder `vtn train`/`vtn finetune` wrote: a config.yaml of theirs (a YAML mapping with their `optim` and
    `run` sections) plus a checkpoint (last/, best/) or metrics.jsonl.

    metrics.jsonl counts too: a run killed before its first checkpoint has it, and resuming it must work.
    """
    path = Path(path)
    if not ((path / "last").is_dir() or (path / "best").is_dir() or (path / "metrics.jsonl").is_file()):
        return False
    import yaml  # light, and only here: most commands never ask

    try:
        doc = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("optim"), dict) and isinstance(doc.get("run"), dict)


SWEEP_FILES = {"results.csv", "results.md", "results.png", "failures.log"}  # what `vtn sweep` writes besides runs


def is_vtn_sweep(path: Path) -> bool:
    """A folder `vtn sweep` wrote: run directories (some may be empty: killed before their config) and its
    result files, at least one run among them, nothing else."""
    entries = list(path.iterdir())
    runs = [e for e in entries if e.is_dir() and is_vtn_run(e)]
    return bool(runs) and all(e in runs or e.name in SWEEP_FILES or (e.is_dir() and not any(e.iterdir()))
                              for e in entries)


def is_vtn_evaluation(path: Path) -> bool:
    """A run directory (where `vtn evaluate` writes by default) or a folder it wrote: predictions.csv and a
    metrics.json of its own (naming the checkpoint and split)."""
    if is_vtn_run(path):
        return True
    try:
        doc = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (path / "predictions.csv").is_file() and isinstance(doc, dict) and {"checkpoint", "split"} <= doc.keys()


def is_vtn_probes(path: Path) -> bool:
    """A folder `vtn probe --out` wrote: probes.csv and probes.md."""
    return (path / "probes.csv").is_file() and (path / "probes.md").is_file()


ABLATION_FILES = {"caches", "sweep", "finetune", "report.md"}  # what `vtn ablate` writes, with its report-*.png


def is_vtn_ablation(path: Path) -> bool:
    """A folder `vtn ablate` wrote: its stages' folders, report.md and report-*.png, nothing else."""
    entries = list(path.iterdir())
    return any(e.name in ABLATION_FILES for e in entries) and all(
        e.name in ABLATION_FILES or (e.name.startswith("report-") and e.suffix == ".png") for e in entries)


# The folders a command writes into, each with what recognises that command's own output and how to say it.
OUTPUT_KINDS = {
    "run": (is_vtn_run, "a vtn run directory (no config.yaml of vtn with last/, best/ or metrics.jsonl)"),
    "sweep": (is_vtn_sweep, "a vtn sweep directory (vtn run directories and results.csv, results.md, results.png, "
              "failures.log, nothing else)"),
    "evaluation": (is_vtn_evaluation, "a vtn run directory or a folder vtn evaluate wrote (predictions.csv and its "
                   "metrics.json)"),
    "probes": (is_vtn_probes, "a folder vtn probe wrote (probes.csv and probes.md)"),
    "ablation": (is_vtn_ablation, "a folder vtn ablate wrote (caches/, sweep/, finetune/, report.md, report-*.png)"),
}


def check_run_dir(out: str | os.PathLike, kind: str = "run", existing: bool = False) -> Path:
    """Return `out` as a Path if a command writing output of `kind` (see OUTPUT_KINDS: a training run, a sweep,
    an evaluation, probes) may write there: new, an empty folder, or that command's own output. With `existing`
    it must already be that output (`vtn report` draws into a run).

    Anything else (a file, a folder holding other things) raises UserError naming it, before anything is written.
    """
    own, what = OUTPUT_KINDS[kind]
    path = Path(out).expanduser()
    if not path.exists():
        if path.is_symlink():
            raise UserError(f"{out}: is a broken symbolic link; choose another --out (nothing was changed)")
        if existing:
            raise UserError(f"{out}: does not exist; expected {what.split(' (')[0]}")
        return path
    if not path.is_dir():
        raise UserError(f"{out}: is a file, not a folder to write into; choose another --out (nothing was changed)")
    if existing and not own(path):
        raise UserError(f"{out}: is not {what} (nothing was changed)")
    if any(path.iterdir()) and not own(path):
        raise UserError(f"{out}: exists and is not {what}; vtn writes only into a new or empty folder or its own "
                        "output of this kind: choose another --out (nothing was changed)")
    return path
