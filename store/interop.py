"""Import from HDF5 (one dataset per video) or a folder of per-video `.npy` files; export to HDF5."""

from __future__ import annotations

import csv
import itertools
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vtn.paths import check_cache_out, check_export_out
from vtn.progress import progress_bar
from vtn.store.layout import StoreError
from vtn.store.reader import open_cache
from vtn.store.writer import CacheWriter

META_KEYS = ("timestamps", "frame_indices", "label", "split", "fps", "duration", "num_frames")


def read_labels(path: str | Path) -> dict[str, tuple[str, str | None]]:
    """`id,label[,split]` rows (a header row starting with `id` is skipped) -> {id: (label, split)}."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: labels CSV not found")
    out: dict[str, tuple[str, str | None]] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise StoreError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the labels CSV as UTF-8") from None
    for n, row in enumerate(rows, 1):
        if not row or (n == 1 and row[0].strip().lower() == "id"):
            continue
        if len(row) not in (2, 3) or not row[0].strip() or not row[1].strip():
            raise StoreError(f"{path}:{n}: expected id,label[,split], got {row!r}")
        vid = row[0].strip()
        if vid in out:
            raise StoreError(f"{path}:{n}: duplicate id {vid!r}")
        out[vid] = (row[1].strip(), row[2].strip() if len(row) == 3 and row[2].strip() else None)
    return out


def _h5_items(src: Path) -> tuple[Iterator[tuple[str, np.ndarray, dict]], dict]:
    import h5py

    f = h5py.File(src, "r")
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    root = dict(f.attrs)
    info = json.loads(root["vtn_cache_attrs"]) if "vtn_cache_attrs" in root else {}

    def items():
        try:
            for name in sorted(names):
                ds = f[name]
                yield name, ds[()], {k: ds.attrs[k] for k in META_KEYS if k in ds.attrs}
        finally:
            f.close()

    return items(), info


def _npy_items(src: Path) -> Iterator[tuple[str, np.ndarray, dict]]:
    for path in sorted(src.rglob("*.npy")):
        try:  # no pickles: an object array or a pickle file is refused, never run
            x = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise StoreError(f"{path}: not a numeric array in .npy format ({e})") from None
        if not isinstance(x, np.ndarray):  # np.load opens an .npz archive whatever the file is named
            x.close()
            raise StoreError(f"{path}: an .npz archive, not an .npy array")
        yield path.relative_to(src).with_suffix("").as_posix(), x, {}


def _features(src: Path, vid: str, x) -> np.ndarray:
    """A video's [T, D] array of numbers, or a StoreError naming it."""
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise StoreError(f"{src}: {vid!r} holds {x.dtype} values, expected numbers (a [T, D] float array)")
    if x.ndim != 2:
        raise StoreError(f"{src}: {vid!r} has shape {list(x.shape)}, expected [T, D]")
    return x


def import_features(src: str | Path, out: str, labels_csv: str | None = None, fps: float = 1.0,
                    dtype: str = "float16", overwrite: bool = False, progress: bool = True) -> int:
    """Import per-video feature arrays into a new cache; returns the number of videos written.

    Without recorded timestamps, frame i gets timestamp i / fps and frame index i (`fps` is the feature rate).
    Re-running the same import continues where an interrupted one stopped.
    """
    src = Path(src)
    if src.is_dir():
        items, info = _npy_items(src), {}
        count = sum(1 for _ in src.rglob("*.npy"))
    elif src.is_file() and src.suffix.lower() in (".h5", ".hdf5"):
        try:
            items, info = _h5_items(src)
        except OSError as e:
            raise StoreError(f"{src}: cannot read as HDF5 ({e})") from None
        count = None
    else:
        raise StoreError(f"{src}: expected an HDF5 file (.h5/.hdf5) or a folder of .npy files")
    check_cache_out(out, inputs=[src, *([labels_csv] if labels_csv else [])], overwrite=overwrite)
    labels = read_labels(labels_csv) if labels_csv else None
    class_names = list(info.get("class_names", []))
    if labels is not None and not class_names:
        class_names = sorted({lab for lab, _ in labels.values()})
    first = next(items, None)
    if first is None:
        raise StoreError(f"{src}: no feature arrays found")
    _features(src, first[0], first[1])
    attrs = {k: v for k, v in info.items() if k not in ("vtn_schema", "feature_dim", "dtype", "class_names", "created_at")}
    attrs["imported_from"] = {"source": str(src.resolve()), "labels": str(labels_csv) if labels_csv else None}
    # share: an import claims all its videos, so the same import started twice cannot store each video twice
    writer = CacheWriter(out, feature_dim=int(np.shape(first[1])[1]), dtype=dtype, class_names=class_names,
                         attrs=attrs, identity=("imported_from",), overwrite=overwrite, name="import", share=(0, 1))
    done = writer.committed_ids()
    written = 0
    with writer, progress_bar(total=count, unit="video", desc="import", disable=not progress) as bar:
        for vid, x, meta in itertools.chain([first], items):
            bar.update(1)
            if vid in done:
                continue
            x = _features(src, vid, x)
            t = len(x)
            label, split = int(meta.get("label", -1)), str(meta.get("split", "train"))
            if labels is not None:
                if vid not in labels:
                    raise StoreError(f"{labels_csv}: no row for id {vid!r} (from {src})")
                name, csv_split = labels[vid]
                if name not in class_names:
                    raise StoreError(f"{labels_csv}: id {vid!r} has unknown label {name!r} (classes: {class_names[:10]}...)")
                label, split = class_names.index(name), csv_split or split
            writer.add(
                vid, x, meta.get("timestamps", np.arange(t) / fps), meta.get("frame_indices", np.arange(t)),
                label=label, split=split, fps=float(meta.get("fps", fps)),
                duration=float(meta.get("duration", t / fps)), num_frames=int(meta.get("num_frames", t)),
            )
            written += 1
    return written


def export_h5(cache_url: str, out: str | Path, progress: bool = True, overwrite: bool = False) -> int:
    """One dataset per video id (features), its timestamps and metadata as attributes, the cache's attributes at the root.

    An existing `out` is replaced only with `overwrite`, and only when it is a file this function wrote.
    """
    import h5py

    cache = open_cache(cache_url)
    check_export_out(out, inputs=[cache_url], overwrite=overwrite)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    try:
        with h5py.File(tmp, "w", libver="latest") as f:  # "latest": attributes larger than 64 KiB (long timestamp lists)
            f.attrs["vtn_cache_attrs"] = json.dumps(cache.attrs)
            f.attrs["class_names"] = json.dumps(cache.class_names)
            for vid in progress_bar(iterable=cache.ids, unit="video", desc="export", disable=not progress):
                v = cache.video(vid)
                ds = f.create_dataset(vid, data=v.features)
                ds.attrs.update({"timestamps": v.timestamps, "frame_indices": v.frame_indices, "label": v.label,
                                 "split": v.split, "fps": v.fps, "duration": v.duration, "num_frames": v.num_frames})
        tmp.replace(out)  # a killed export never leaves a half-written file under the final name
    except BaseException:  # a damaged chunk, a full disk, Ctrl-C: no half-written file is left behind either
        tmp.unlink(missing_ok=True)
        raise
    return len(cache)
