"""The on-disk layout of a vtn feature cache (Zarr v3), readable with plain `zarr`.

    CACHE/                       group; attrs: vtn_schema, feature_dim, dtype, class_names, created_at,
                                 and what the producer recorded (backbone, sampling, config, versions, ...)
      parts/<part>/              one group per writer session ("ragged part"); attrs:
                                   committed  number of committed videos (rows 0..committed-1 of the video table)
                                   rows       number of committed frame rows
                                   failures   [{id, error, message}] videos this writer could not process
        features     [R, D]      float16 (or the cache dtype); chunks of feature_chunk_rows inside shards
        timestamps   [R]         float64, seconds from the start of the source video
        frame_index  [R]         int64, the frame's index in the source video
        id, split    [V]         strings: video id (source path relative to the input root), split name
        label        [V]         int64 index into class_names, -1 when unlabeled
        start, length[V]         int64: the video's rows are features[start:start+length]
        fps, duration[V]         float64: native frame rate, seconds
        num_frames   [V]         int64: frames in the source video
      index/<stamp>/             consolidated index of every part (written when writers close):
                                 the video-table columns above plus `part` (string); attrs:
                                   complete   true once fully written
                                   parts      {part: committed videos covered}
      writers/<stamp>-<token>/   one group per live writer (store/lease.py); attrs: host, pid, share, started, beat

Arrays are allocated in whole shards, so their shapes may exceed `rows`/`committed`; only the committed
prefix is meaningful. Reading one video with plain zarr:

    g = zarr.open_group(CACHE, mode="r"); p = g["parts"][part]
    x = p["features"][start:start + length]

Commit protocol: a writer appends rows to its own part, then writes the video-table entries, then
rewrites the part's attributes (one atomic object write) — that last write is the commit. A writer killed
at any instant leaves a part whose committed prefix is complete; anything after it is ignored. On local
disks this rests on zarr >= 3.1.3 writing every object to a temporary file and renaming it into place
(a shard that already holds committed rows is rewritten whole on each flush). A part with nothing
committed (committed == rows == 0) may lack its arrays, when its writer was killed while creating it: it
holds no videos and readers and `verify` pass over it.
"""

from __future__ import annotations

import time

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.errors import ContainsGroupError

from vtn.errors import UserError


class StoreError(UserError):
    """A cache, or something written into one, is not what it must be; the message names the culprit."""


class DiskFull(StoreError):
    """No space (or quota) left where the cache is written: the whole job stops, not one video."""


SCHEMA_VERSION = 1
SCHEMA_KEY = "vtn_schema"

CHUNK_ROWS = 256  # rows per chunk of the timeline arrays, and at most of the features
FEATURE_CHUNK_BYTES = 64 * 2**10  # features per chunk, at most: a streamed clip decodes little beyond its rows
TABLE_CHUNK = 16384  # entries per chunk of the per-video columns
SHARD_BYTES = 16 * 2**20  # target shard size: one file per ~16 MiB of features

ROW_ARRAYS = ("features", "timestamps", "frame_index")
TABLE_COLUMNS = {  # per-video columns: dtype, fill value
    "id": (str, ""),
    "split": (str, ""),
    "label": (np.int64, -1),
    "start": (np.int64, -1),
    "length": (np.int64, -1),
    "fps": (np.float64, np.nan),
    "duration": (np.float64, np.nan),
    "num_frames": (np.int64, -1),
}


def rows_per_shard(feature_dim: int, itemsize: int) -> int:
    """Shard height: about SHARD_BYTES of features, a whole number of chunks."""
    rows = SHARD_BYTES // max(1, feature_dim * itemsize)
    return max(CHUNK_ROWS, rows // CHUNK_ROWS * CHUNK_ROWS)


def feature_chunk_rows(feature_dim: int, itemsize: int) -> int:
    """Rows per feature chunk: a power of two of at most FEATURE_CHUNK_BYTES and CHUNK_ROWS rows (so a shard is a
    whole number of them), at least 16. A training clip (16 frames at stride 8 span 121 rows) decodes whole chunks;
    with D = 768 in float16, 32-row chunks decode about its span where 256-row ones decoded 1.5 x 256 rows."""
    rows = FEATURE_CHUNK_BYTES // max(1, feature_dim * itemsize)
    return min(CHUNK_ROWS, max(16, 1 << max(0, rows.bit_length() - 1)))


def compressors(itemsize: int) -> list:
    """Blosc-lz4 with byte shuffle, then a CRC32C so a corrupted chunk is caught on read. lz4, not zstd: float16
    features barely compress (their mantissas are noise: zstd saved 8 % of the bytes) and zstd decoded 20x slower,
    the bulk of a streamed clip's cost; the timeline arrays are 1 % of the bytes."""
    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize), Crc32cCodec()]


def open_root(url: str, mode: str = "r", storage_options: dict | None = None):
    """Open the cache group at `url` and check it is a vtn cache of this schema version."""
    import zarr

    try:
        root = zarr.open_group(str(url), mode=mode, storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError, zarr.errors.ContainsArrayError) as e:
        raise StoreError(f"{url}: not a vtn cache (no Zarr group there: {e})") from None
    version = root.attrs.get(SCHEMA_KEY)
    if version is None:
        raise StoreError(f"{url}: not a vtn cache (the Zarr group has no '{SCHEMA_KEY}' attribute)")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{url}: cache schema version {version}, but this vtn reads version {SCHEMA_VERSION}; "
            "re-extract it or use the vtn release that wrote it"
        )
    return root


def require_group(root, name: str):
    """The group `name` of `root`, made by whichever writer needs it first: two making it at once race in zarr's
    require_group (one sees it half made), so the loser tries again once the other has made it."""
    for _ in range(100):
        try:
            return root.require_group(name)
        except (ContainsGroupError, FileNotFoundError):
            time.sleep(0.01)
    return root.require_group(name)
