"""`vtn store ...` subcommands. Only argparse at module level, so `vtn --help` stays instant."""

from __future__ import annotations


def register(sub) -> None:
    """Add `vtn store` (info, verify, import, export) to `vtn`."""
    p = sub.add_parser("store", help="inspect, verify, import and export feature caches",
                       description="Work with a vtn feature cache (a Zarr v3 group; local path or fsspec URL).")
    store_sub = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    for add in (_add_info, _add_verify, _add_import, _add_export):
        add(store_sub)


def _add_info(store_sub) -> None:
    q = store_sub.add_parser("info", help="videos per split, classes, frames, size on disk, backbone, failures")
    q.add_argument("cache")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    q.set_defaults(func=_info)


def _add_verify(store_sub) -> None:
    q = store_sub.add_parser("verify", help="read everything; exit 0 only when the cache is clean",
                             description="Checks every shard and chunk checksum, NaN/inf, missing chunks, "
                             "duplicate ids and that the consolidated index agrees with the parts.")
    q.add_argument("cache")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_verify)


def _add_import(store_sub) -> None:
    q = store_sub.add_parser("import", help="build a cache from an HDF5 file or a folder of .npy files",
                             description="SRC is an HDF5 file with one [T, D] dataset per video id, or a folder of "
                             "per-video .npy files (the id is the relative path without .npy). Re-running resumes.")
    q.add_argument("src")
    q.add_argument("--out", required=True, help="the cache to write")
    q.add_argument("--labels", help="CSV of id,label[,split]; class names are the sorted labels")
    q.add_argument("--fps", type=float, default=1.0, help="feature rate for timestamps when the source has none (default 1)")
    q.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    q.add_argument("--overwrite", action="store_true", help="replace an existing vtn cache at --out (never anything else)")
    q.set_defaults(func=_import)


def _add_export(store_sub) -> None:
    q = store_sub.add_parser("export", help="write a cache to HDF5: one dataset per video id")
    q.add_argument("cache")
    q.add_argument("--out", required=True, help="the .h5 file to write")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out that vtn store export wrote")
    q.set_defaults(func=_export)


def disk_usage(url: str) -> tuple[int, int] | None:
    import os

    if "://" in url:
        return None
    files = size = 0
    for dirpath, _, names in os.walk(url):
        files += len(names)
        size += sum(os.path.getsize(os.path.join(dirpath, n)) for n in names)
    return files, size


def cache_info(url: str) -> dict:
    from collections import Counter

    from vtn.store import open_cache

    c = open_cache(url)
    splits = Counter(c.splits)
    frames: Counter = Counter()
    for s, n in zip(c.splits, c.lengths):
        frames[s] += int(n)
    per_class = Counter(int(x) for x in c.labels)
    usage = disk_usage(url)
    return {
        "cache": url,
        "videos": len(c),
        "frames": int(c.lengths.sum()),
        "splits": {s: {"videos": splits[s], "frames": frames[s]} for s in sorted(splits)},
        "classes": len(c.class_names),
        "class_names": c.class_names,
        "videos_per_class": {_class_name(c.class_names, k): v for k, v in sorted(per_class.items())},
        "unnamed_labels": {k: v for k, v in sorted(per_class.items()) if k != -1 and not 0 <= k < len(c.class_names)},
        "feature_dim": c.feature_dim,
        "dtype": c.dtype.name,
        "files": usage[0] if usage else None,
        "bytes": usage[1] if usage else None,
        "backbone": c.attrs.get("backbone"),
        "sampling": c.attrs.get("sampling"),
        "created_at": c.attrs.get("created_at"),
        "failures": c.failures,
    }


def _class_name(names: list[str], label: int) -> str:
    """A label's class name; a label the cache's class names do not cover (written behind vtn's back, or names
    lost) is shown as such rather than crash `info` (`vtn store verify` reports it)."""
    if label == -1:
        return "(unlabeled)"
    return names[label] if 0 <= label < len(names) else f"label {label} (no class name)"


def _info(args) -> int:
    import json

    info = cache_info(args.cache)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"cache        {info['cache']}")
    print(f"videos       {info['videos']:,}   frames {info['frames']:,}")
    for s, v in info["splits"].items():
        print(f"  {s:<10} {v['videos']:,} videos, {v['frames']:,} frames")
    print(f"classes      {info['classes']}")
    for line in _wrap_names(info["class_names"]):
        print(f"  {line}")
    if info["unnamed_labels"]:
        labels = ", ".join(f"label {k} ({v:,} video(s))" for k, v in info["unnamed_labels"].items())
        print(f"  without a class name: {labels}; the cache is inconsistent (`vtn store verify` reports it)")
    print(f"features     D={info['feature_dim']} {info['dtype']}")
    if info["bytes"] is not None:
        print(f"on disk      {info['bytes'] / 2**20:,.1f} MiB in {info['files']:,} files")
    for key in ("backbone", "sampling"):
        if info[key]:
            print(f"{key:<12} {json.dumps(info[key])}")
    print(f"failures     {len(info['failures'])}")
    for f in info["failures"][:20]:
        print(f"  {f['id']}: {f['error']}: {f['message']}")
    if len(info["failures"]) > 20:
        print(f"  ... and {len(info['failures']) - 20} more (--json lists all)")
    return 0


def _wrap_names(names: list[str], shown: int = 50, width: int = 100) -> list[str]:
    """The first `shown` class names, each quoted (a name may hold spaces or commas: 4 classes must read as 4) and
    never split over lines, in lines of about `width` characters, and how many more."""
    import json

    items = [json.dumps(n, ensure_ascii=False) for n in names[:shown]]
    if len(names) > shown:
        items.append(f"... and {len(names) - shown} more (--json lists all)")
    lines = [""] if items else []
    for item in items:
        if lines[-1] and len(lines[-1]) + 2 + len(item) > width:
            lines.append("")
        lines[-1] += (", " if lines[-1] else "") + item
    return [line + ("," if i < len(lines) - 1 else "") for i, line in enumerate(lines)]


def _verify(args) -> int:
    from vtn.store.verify import verify

    problems, summary = verify(args.cache, progress=not args.quiet)
    for p in problems:
        print(f"PROBLEM {p}")
    state = "clean" if not problems else f"{len(problems)} problem(s)"
    print(f"{args.cache}: {summary['videos']:,} videos, {summary['rows']:,} frames in {summary['parts']} part(s): {state}")
    return 0 if not problems else 1


def _import(args) -> int:
    from vtn.store.interop import import_features

    n = import_features(args.src, args.out, args.labels, args.fps, args.dtype, args.overwrite)
    print(f"imported {n:,} videos into {args.out}")
    return 0


def _export(args) -> int:
    from vtn.store.interop import export_h5

    n = export_h5(args.cache, args.out, overwrite=args.overwrite)
    print(f"exported {n:,} videos to {args.out}")
    return 0
