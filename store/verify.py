"""`vtn store verify`: read everything and report what is wrong, with the place it is wrong."""

from __future__ import annotations

import numpy as np

from vtn.progress import progress_bar
from vtn.store.index import lost_entries, newest_index, part_states, read_columns
from vtn.store.layout import ROW_ARRAYS, TABLE_COLUMNS, StoreError
from vtn.store.rows import CorruptChunk, RowReader
from vtn.store.writer import check_id


def _read_table(group, n: int, names, problems: list[str]) -> dict[str, np.ndarray]:
    """Entries [0, n) of a video table; each lost chunk is a problem, and what it held reads as fill values."""
    for name in names:
        for a, b in lost_entries(group[name], name, 0, n):
            problems.append(f"{group.path}/{name}: entries {a}..{b - 1} of the video table are missing (chunk file absent)")
    return read_columns(group, 0, n, names, allow_lost=True)


def _check_rows(name: str, part: str, reader: RowReader, rows: int, problems: list[str], progress=None) -> None:
    """Every shard file present, every chunk's checksum good, no NaN/inf, no fill values inside `rows`."""
    where = f"parts/{part}/{name}"
    if not reader.fast:
        problems.append(f"{where}: unexpected codecs, cannot verify chunk by chunk")
        return
    for shard in range(0, (rows + reader.shard_rows - 1) // reader.shard_rows):
        a, b = shard * reader.shard_rows, min(rows, (shard + 1) * reader.shard_rows)
        try:
            index = reader.shard_index(shard)
        except CorruptChunk as e:
            problems.append(str(e))
            continue
        if index is None:
            problems.append(f"{where}: shard file {reader.key(shard)} is missing (rows {a}..{b - 1})")
            continue
        present = index[index[:, 0] != 2**64 - 1]  # one read per shard: its chunks are small
        blob = memoryview(reader.fetch(shard, 0, int((present[:, 0] + present[:, 1]).max()))) if len(present) else b""
        for c in range((b - a + reader.chunk_rows - 1) // reader.chunk_rows):
            r0 = a + c * reader.chunk_rows
            r1 = min(b, r0 + reader.chunk_rows)
            off, n = (int(v) for v in index[c])
            if off == 2**64 - 1:
                problems.append(f"{where}: chunk {r0 // reader.chunk_rows} (rows {r0}..{r1 - 1}) is missing")
                continue
            try:
                chunk = reader.decode(blob[off:off + n], f"{reader.key(shard)} chunk {c}")[: r1 - r0]
            except CorruptChunk as e:
                problems.append(str(e))
                continue
            if chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
                problems.append(f"{where}: NaN or inf in rows {r0}..{r1 - 1}")
            if name == "frame_index" and (chunk < 0).any():
                problems.append(f"{where}: negative frame index in rows {r0}..{r1 - 1}")
        if progress is not None:
            progress.update(b - a)


def verify(cache_url: str, progress: bool = True) -> tuple[list[str], dict]:
    """Return (problems, summary). An empty problem list means the cache is clean."""
    from vtn.store.layout import open_root

    problems: list[str] = []
    root = open_root(cache_url, "r")
    parts = part_states(root)
    n_classes = len(root.attrs.get("class_names", []))
    seen: dict[str, str] = {}
    total_rows = sum(int(s.get("rows", 0)) for s in parts.values())
    bar = progress_bar(total=total_rows * len(ROW_ARRAYS), unit="row", desc="verify", disable=not progress)
    tables = {}
    for part, state in sorted(parts.items()):
        g = root["parts"][part]
        committed, rows = int(state.get("committed", 0)), int(state.get("rows", 0))
        if committed == 0 and rows == 0:
            # Nothing committed: a writer killed while it created this part may have left it without some of
            # its arrays. Readers ignore it, a resumed writer starts a new part: an empty part, not a problem.
            tables[part] = {col: np.empty(0, dtype=object if dt is str else dt) for col, (dt, _) in TABLE_COLUMNS.items()}
            continue
        try:
            cols = _read_table(g, committed, list(TABLE_COLUMNS), problems)
        except Exception as e:  # noqa: BLE001 - a broken table is a finding, not a crash
            problems.append(f"parts/{part}: cannot read the video table ({type(e).__name__}: {e})")
            continue
        tables[part] = cols
        starts, lengths = cols["start"], cols["length"]
        expected = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if committed else starts
        if (lengths < 1).any() or not np.array_equal(starts, expected) or (committed and starts[-1] + lengths[-1] != rows):
            problems.append(f"parts/{part}: video table rows disagree with the committed row count {rows}")
        bad_ids = []
        for k, vid in enumerate(cols["id"]):
            try:
                check_id(vid)
            except StoreError as e:  # an empty id (a lost chunk reads as ""), an absolute path, ...
                bad_ids.append(f"parts/{part}: entry {k} of the video table: {e}")
                continue
            if vid in seen:
                problems.append(f"video {vid!r}: duplicate id in parts {seen[vid]} and {part}")
            seen[vid] = part
        problems += bad_ids[:10] + ([f"parts/{part}: ... and {len(bad_ids) - 10} more bad ids"] if len(bad_ids) > 10 else [])
        bad = cols["id"][(cols["label"] < -1) | (cols["label"] >= n_classes)]
        for vid in bad[:10]:
            problems.append(f"video {vid!r}: label outside the {n_classes} class names")
        for name in ROW_ARRAYS:
            if name not in g:
                problems.append(f"parts/{part}/{name}: array is missing")
                continue
            arr = g[name]
            if arr.shape[0] < rows:
                problems.append(f"parts/{part}/{name}: {arr.shape[0]} rows allocated but {rows} committed")
                continue
            _check_rows(name, part, RowReader(arr), rows, problems, bar)
    bar.close()
    idx = newest_index(root)
    if idx is not None:
        covered = idx.attrs["parts"]
        cols = _read_table(idx, int(idx.attrs["videos"]), list(TABLE_COLUMNS) + ["part"], problems)
        for part, n in covered.items():
            if part not in tables:
                problems.append(f"index: refers to part {part!r}, which is missing")
                continue
            mine = cols["part"] == part
            for col in ("id", "start", "length", "label", "split"):
                if mine.sum() != n or not np.array_equal(cols[col][mine], tables[part][col][:n]):
                    problems.append(f"index: column {col!r} disagrees with parts/{part}")
                    break
    summary = {"parts": len(parts), "videos": len(seen), "rows": total_rows}
    return problems, summary
