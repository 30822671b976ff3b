"""The videos to extract: a folder (labels and splits from its sub-folders) or a CSV manifest.

Video ids are source paths relative to the input root, in POSIX form with the extension kept, so `a/x.mp4`
and `b/x.mp4` (or `x.mp4` and `x.avi`) never collide. The root of a folder is the folder. The root of a
manifest is `root` when given (`vtn extract --root DIR`); otherwise the CSV's folder when every listed video
lies under it (the usual manifest next to its videos), else the deepest folder common to all listed videos
(the usual cluster manifest of absolute paths, written in a work directory). `discover` returns the root
used, for the cache to record.

Folder layout:
- `video.mp4` at the top: unlabelled (label -1), split "train";
- `class/video.mp4` (or deeper under the class): label from the folder, split "train";
- `split/class/video.mp4` (or deeper): split from the first folder, class from the second. It is the layout
  when the shallowest video lies two folders down, or when a top-level folder named as a split holds videos
  in class folders.
A video that does not fit the layout (a stray `x.mp4` beside class folders, `extra/x.mp4` beside `train/` and
`val/`, a first folder that is no split name) is refused, naming it: it would silently relabel the others.
Every folder is read once: a folder that cannot be read, or that a symbolic link leads back to (a loop, or two
links to one folder), is refused, naming it.
Manifest: comma-separated rows `path,label[,split]`, or any order of these columns under a header row naming
them (`label,path`, `path,split`); an unknown column name or another separator is refused, naming the line.
An empty label is unlabelled (label -1); an empty or missing split is "train". Relative paths resolve against
the CSV's folder and must stay inside it; absolute paths may lie anywhere.
Split names are train, val and test; `SPLIT_ALIASES` maps the usual other spellings onto them (any case:
`Train` -> train, `validation` -> val); any other split name is refused, naming where it came from.
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
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "testing": "test"}
COLUMNS = ("path", "label", "split")  # a manifest's columns, in their order when it has no header


class InputError(UserError):
    """The input folder or manifest is missing, empty or malformed."""


# Still-image formats by their first bytes (a renamed file is caught too). A decoder opens them as one-frame videos,
# which a video model then classifies without complaint; GIF is left out, as it is often an animation.
IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"BM": "BMP", b"II*\x00": "TIFF",
               b"MM\x00*": "TIFF"}


def image_format(path: str | Path) -> str | None:
    """"PNG", "JPEG", ... when the file is a still image; None for anything else (videos, unreadable files)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":  # AVI is RIFF too, with "AVI " there
        return "WebP"
    return next((name for magic, name in IMAGE_MAGIC.items() if head.startswith(magic)), None)


@dataclass(frozen=True)
class InputEntry:
    """One video to extract."""

    id: str  # relative POSIX path from the input root
    path: Path  # where to read it
    label: int  # index into the class names, -1 when unlabelled
    split: str


def discover(source: str | Path, root: str | Path | None = None) -> tuple[list[InputEntry], list[str], Path]:
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
        entries.append(InputEntry(vid, path, lookup[cls] if cls else -1, split))
    return entries, class_names, base


def split_name(text: str) -> str | None:
    """The split `text` names (train, val, test, or one of their aliases, in any case), or None."""
    name = text.strip().lower()
    return name if name in SPLITS else SPLIT_ALIASES.get(name)


def _known_splits() -> str:
    return f"{', '.join(SPLITS)} (also, in any case: {', '.join(SPLIT_ALIASES)})"


def _walk(root: Path) -> list[str]:
    """The videos under `root` as POSIX paths relative to it, reading each real folder once."""

    def unreadable(e: OSError):
        raise InputError(f"{e.filename}: cannot read this folder ({e.strerror}); its videos would be left out "
                         "(make it readable, or move it out of the input)")

    found, read = [], {}  # read: real path of each folder read -> the path it was read by
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in read:  # os.walk follows links without noticing it has been there
            raise InputError(f"{dirpath}: a symbolic link leads to {read[real]}, which is already read (a link loop, "
                             "or two links to one folder), so its videos would be listed again under other ids; "
                             "remove the link, or list the videos in a CSV manifest")
        read[real] = dirpath
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix.lower() in VIDEO_SUFFIXES and not name.startswith("."):
                found.append(path.relative_to(root).as_posix())
    return found


def _scan_folder(root: Path) -> list[tuple[str, Path, str, str]]:
    parts = {rel: PurePosixPath(rel).parts for rel in _walk(root)}
    if not parts:
        return []
    split_layout = any(len(p) >= 3 and split_name(p[0]) for p in parts.values())
    split_layout = split_layout or min(len(p) for p in parts.values()) >= 3
    flat = not split_layout and all(len(p) == 1 for p in parts.values())
    if flat:
        return [(rel, root / rel, "", DEFAULT_SPLIT) for rel in parts]
    layout = "split/class/video (train/, val/, test/)" if split_layout else "class/video"
    stray = [rel for rel, p in parts.items() if len(p) < (3 if split_layout else 2)]
    if stray:
        one = len(stray) == 1
        more = f" and {len(stray) - 3} more" if len(stray) > 3 else ""
        raise InputError(f"{root}: refused: {', '.join(stray[:3])}{more} {'lies' if one else 'lie'} outside the "
                         f"folder's layout {layout}, which gives every video its label; move {'it' if one else 'them'} "
                         f"into a class folder{' of a split' if split_layout else ''}, or list the videos in a CSV "
                         "manifest")
    rows = []
    for rel, p in parts.items():
        if not split_layout:
            rows.append((rel, root / rel, p[0], DEFAULT_SPLIT))
            continue
        split = split_name(p[0])
        if split is None:
            raise InputError(f"{root / p[0]}: '{p[0]}' is not a split name, and folders of split/class/video "
                             f"start with one: {_known_splits()}; rename it, or list the videos in a CSV manifest")
        rows.append((rel, root / rel, p[1], split))
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
    columns, rows = None, []  # columns: the header's names in order, None before the first row
    for line_no, row in enumerate(reader, start=1):
        row = [c.strip() for c in row]
        if not any(row) or row[0].startswith("#"):
            continue
        if len(row) == 1 and any(sep in row[0] for sep in ";\t|") and not (base / row[0]).exists():
            raise InputError(f"{csv_path}:{line_no}: one column holding '{row[0]}': manifest columns are separated "
                             "by ',' (save it as comma-separated CSV)")
        if columns is None:
            columns = COLUMNS
            if any(c.lower() in COLUMNS for c in row):  # a header row: columns are read by their names
                columns = tuple(c.lower() for c in row)
                unknown = [c for c in row if c.lower() not in COLUMNS]
                if unknown or len(set(columns)) < len(columns) or "path" not in columns:
                    raise InputError(f"{csv_path}:{line_no}: the header names the columns {', '.join(row)}; expected "
                                     f"each of {', '.join(COLUMNS)} at most once, path among them")
                continue
        if len(row) > len(columns):
            raise InputError(f"{csv_path}:{line_no}: expected {','.join(columns)}, got {len(row)} columns")
        cell = dict(zip(columns, row))
        raw, label, split = cell["path"], cell.get("label", ""), cell.get("split", "")
        if not raw:
            raise InputError(f"{csv_path}:{line_no}: the path is empty")
        if split and split_name(split) is None:
            raise InputError(f"{csv_path}:{line_no}: unknown split '{split}'; split names are {_known_splits()}")
        # Lexical normalisation (no symlinks resolved): the id keeps the folder names the manifest uses.
        path = Path(os.path.normpath(base / raw))  # an absolute `raw` replaces `base`
        rows.append((line_no, raw, path, label, split_name(split) if split else DEFAULT_SPLIT))
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
        outside = [(n, raw, path) for n, raw, path, _, _ in listed if _relative(path, base) is None]
        if outside:
            # A manifest of absolute paths written in a work directory: ids are relative to the deepest folder
            # the videos share. A relative path is the manifest's own, so it must not move that folder.
            for n, raw, _ in outside:
                if not os.path.isabs(raw):
                    raise InputError(f"{csv_path}:{n}: '{raw}' leads outside the manifest's folder {base}; a "
                                     "relative path must stay inside it: list the video by its absolute path, or give "
                                     "--root DIR")
            relative = [(n, raw) for n, raw, _, _, _ in listed if not os.path.isabs(raw)]
            n, raw, _ = outside[0]
            if relative:
                raise InputError(f"{csv_path}:{n}: {raw} lies outside the manifest's folder {base}, while line "
                                 f"{relative[0][0]} lists '{relative[0][1]}' relative to that folder: the ids would "
                                 "silently become relative to another folder; give --root DIR, or list every video "
                                 "by its absolute path")
            base = Path(os.path.commonpath([str(path.parent) for _, _, path, _, _ in listed]))
            if base == Path(base.anchor):
                n1, raw1, first = listed[0][:3]
                n, raw = next(((n, raw) for n, raw, path, _, _ in listed if path.parts[:2] != first.parts[:2]),
                              (n1, raw1))
                raise InputError(f"{csv_path}: the listed videos share no folder but {base} (line {n1}: {raw1}; line "
                                 f"{n}: {raw}), which would silently become the root of their ids; give --root DIR")
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
