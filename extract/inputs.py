"""The videos to extract: a folder (labels and splits from its sub-folders) or a CSV manifest.

Video ids are source paths relative to the input root (the folder, or the CSV's folder), in POSIX form
with the extension kept, so `a/x.mp4` and `b/x.mp4` (or `x.mp4` and `x.avi`) never collide.

Folder layout, decided by the shallowest video in the tree:
- `video.mp4` at the top: unlabelled (label -1), split "train";
- `class/video.mp4`: label from the folder, split "train";
- `split/class/video.mp4` (or deeper): split from the first folder, class from the second.
Manifest: rows `path,label[,split]`, an optional header row `path,label[,split]`; an empty label is
unlabelled, an empty or missing split is "train"; relative paths resolve against the CSV's folder.
Class names are sorted; a video's label is the index of its class name.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vtn.errors import UserError

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp", ".ogv"}
DEFAULT_SPLIT = "train"


class InputError(UserError):
    """The input folder or manifest is missing, empty or malformed."""


@dataclass(frozen=True)
class VideoEntry:
    """One video to extract."""

    id: str  # relative POSIX path from the input root
    path: Path  # where to read it
    label: int  # index into the class names, -1 when unlabelled
    split: str


def discover(source: str | Path) -> tuple[list[VideoEntry], list[str]]:
    """The videos under a folder or listed in a CSV manifest, sorted by id, and the sorted class names."""
    source = Path(source)
    if source.is_dir():
        rows = _scan_folder(source)
    elif source.is_file() and source.suffix.lower() == ".csv":
        rows = _read_manifest(source)
    elif source.exists():
        raise InputError(f"{source}: the input must be a folder of videos or a .csv manifest")
    else:
        raise InputError(f"{source}: no such folder or manifest")
    if not rows:
        raise InputError(f"{source}: no videos found (looked for {', '.join(sorted(VIDEO_SUFFIXES))})")
    class_names = sorted({cls for _, _, cls, _ in rows if cls})
    lookup = {c: i for i, c in enumerate(class_names)}
    entries, seen = [], set()
    for vid, path, cls, split in sorted(rows, key=lambda r: r[0]):
        if vid in seen:
            raise InputError(f"{source}: video '{vid}' is listed twice")
        seen.add(vid)
        entries.append(VideoEntry(vid, path, lookup[cls] if cls else -1, split))
    return entries, class_names


def _scan_folder(root: Path) -> list[tuple[str, Path, str, str]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix.lower() in VIDEO_SUFFIXES and not name.startswith("."):
                found.append(path.relative_to(root).as_posix())
    if not found:
        return []
    depth = min(len(PurePosixPath(rel).parts) for rel in found)
    rows = []
    for rel in found:
        parts = PurePosixPath(rel).parts
        if depth == 1:
            rows.append((rel, root / rel, "", DEFAULT_SPLIT))
        elif depth == 2:
            rows.append((rel, root / rel, parts[0], DEFAULT_SPLIT))
        else:
            rows.append((rel, root / rel, parts[1], parts[0]))
    return rows


def _read_manifest(csv_path: Path) -> list[tuple[str, Path, str, str]]:
    try:
        # utf-8-sig: a spreadsheet's byte-order mark is not part of the first cell.
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            return _manifest_rows(csv_path, csv.reader(f))
    except UnicodeDecodeError as e:
        raise InputError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start}); save the manifest as UTF-8") from None


def _manifest_rows(csv_path: Path, reader) -> list[tuple[str, Path, str, str]]:
    base = csv_path.parent.resolve()
    rows = []
    for line_no, row in enumerate(reader, start=1):
        row = [c.strip() for c in row]
        if not row or not any(row) or row[0].startswith("#"):
            continue
        if line_no == 1 and row[0].lower() == "path":
            continue  # header
        if len(row) > 3:
            raise InputError(f"{csv_path}:{line_no}: expected path,label[,split], got {len(row)} columns")
        raw, label = row[0], row[1] if len(row) > 1 else ""
        split = row[2] if len(row) > 2 and row[2] else DEFAULT_SPLIT
        path = Path(os.path.normpath(base / raw))  # an absolute `raw` replaces `base`
        try:
            vid = path.relative_to(base).as_posix()
        except ValueError:
            raise InputError(f"{csv_path}:{line_no}: '{raw}' is outside the manifest's folder {base}; "
                             "video ids are paths relative to it") from None
        rows.append((vid, path, label, split))
    return rows
