"""The videos to extract: a folder (labels and splits from its sub-folders) or a CSV manifest.

Video ids are source paths relative to the input root, in POSIX form with the extension kept, so `a/x.mp4`
and `b/x.mp4` (or `x.mp4` and `x.avi`) never collide. The root of a folder is the folder. The root of a
manifest is `root` when given (`vtn extract --root DIR`); otherwise the CSV's folder when every listed video
lies under it (the usual manifest next to its videos), else the deepest folder common to all listed videos
(the usual cluster manifest of absolute paths, written in a work directory). `discover` returns the root
used, for the cache to record.

Folder layout, decided by the shallowest video in the tree:
- `video.mp4` at the top: unlabelled (label -1), split "train";
- `class/video.mp4`: label from the folder, split "train";
- `split/class/video.mp4` (or deeper): split from the first folder, class from the second.
Manifest: rows `path,label[,split]`, an optional header row `path,label[,split]`; an empty label is
unlabelled, an empty or missing split is "train"; relative paths resolve against the CSV's folder, absolute
paths may lie anywhere.
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


def discover(source: str | Path, root: str | Path | None = None) -> tuple[list[VideoEntry], list[str], Path]:
    """The videos under a folder or listed in a CSV manifest, sorted by id; the sorted class names; and the
    root folder the ids are relative to. `root` (a manifest only) fixes that folder."""
    source = Path(source)
    if source.is_dir():
        if root is not None:
            raise InputError(f"{source}: --root applies to a .csv manifest; the ids of a folder's videos are "
                             "relative to the folder itself")
        rows, base = _scan_folder(source), source.resolve()
    elif source.is_file() and source.suffix.lower() == ".csv":
        rows, base = _read_manifest(source, root)
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
    return entries, class_names, base


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


def _read_manifest(csv_path: Path, root: str | Path | None) -> tuple[list[tuple[str, Path, str, str]], Path]:
    try:
        # utf-8-sig: a spreadsheet's byte-order mark is not part of the first cell.
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            listed = _manifest_rows(csv_path, csv.reader(f))
    except UnicodeDecodeError as e:
        raise InputError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start}); save the manifest as UTF-8") from None
    return _assign_ids(csv_path, listed, root)


def _manifest_rows(csv_path: Path, reader) -> list[tuple[int, str, Path, str, str]]:
    """(line number, path as written, absolute normalised path, label, split) for every video row."""
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
        if not raw:
            raise InputError(f"{csv_path}:{line_no}: the path is empty")
        split = row[2] if len(row) > 2 and row[2] else DEFAULT_SPLIT
        # Lexical normalisation (no symlinks resolved): the id keeps the folder names the manifest uses.
        path = Path(os.path.normpath(base / raw))  # an absolute `raw` replaces `base`
        rows.append((line_no, raw, path, label, split))
    return rows


def _assign_ids(csv_path: Path, listed, root: str | Path | None) -> tuple[list[tuple[str, Path, str, str]], Path]:
    """Each listed video's id relative to the manifest's root; refuses a video outside `root` and two videos
    that would share an id (one would silently stand for the other in the cache)."""
    if root is not None:
        base = Path(os.path.abspath(root))
        if not base.is_dir():
            raise InputError(f"--root {root}: no such folder")
    else:
        base = csv_path.parent.resolve()
        if listed and not all(_relative(path, base) for _, _, path, _, _ in listed):
            # Some video lies outside the CSV's folder (a manifest of absolute paths written in a work
            # directory): ids are relative to the deepest folder the videos share.
            base = Path(os.path.commonpath([str(path.parent) for _, _, path, _, _ in listed]))
    rows, first = [], {}
    for line_no, raw, path, label, split in listed:
        vid = _relative(path, base)
        if vid is None:
            raise InputError(f"{csv_path}:{line_no}: {path} is outside --root {base}; "
                             "video ids are paths relative to it")
        if vid in first:
            other_line, other = first[vid]
            raise InputError(f"{csv_path}:{line_no}: '{raw}' and '{other}' (line {other_line}) would both have "
                             f"the video id '{vid}' (relative to {base}); list each video once")
        first[vid] = (line_no, raw)
        rows.append((vid, path, label, split))
    return rows, base


def _relative(path: Path, base: Path) -> str | None:
    """`path` relative to `base` in POSIX form, or None when it lies outside. Compared as written first, then
    with symlinks resolved, so `--root /data/k400` also accepts the real paths behind a /data symlink."""
    for p, b in ((path, base), (Path(os.path.realpath(path)), Path(os.path.realpath(base)))):
        try:
            return p.relative_to(b).as_posix()
        except ValueError:
            pass
    return None
