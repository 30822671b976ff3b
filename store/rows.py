"""Fast reads of row ranges from a part's sharded arrays.

zarr-python spends about a millisecond of Python and event-loop work per `array[a:b]`, whatever the size,
which caps random single-video reads well below what a disk or an object store can serve. Our arrays
have one known codec chain (sharding; inner chunks: bytes -> blosc -> crc32c; shard index at the end with
its own crc32c), so this reader fetches the byte ranges itself, caches each shard's index, checks every
checksum and decodes with the same numcodecs/blosc that zarr uses. Anything else falls back to zarr.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import google_crc32c
import numpy as np
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from vtn.store.layout import StoreError

MISSING = 2**64 - 1


def _open_files() -> int:
    """Shard files kept open per process, whatever the number of shards or readers: an eighth of the descriptor
    limit, 64 to 1,024 (re-opening a shard file for each read was a sixth of a streamed clip's cost)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1024 if soft == resource.RLIM_INFINITY else max(64, min(1024, soft // 8))


OPEN_FILES = _open_files()


class _Handles:
    """The open shard files of every RowReader in the process: the `cap` most recently used stay open.

    A cache of Kinetics size has thousands of shard files, and a descriptor per shard would exceed
    `ulimit -n` (often 1,024). Keeping the recent ones open spares an open() per read (a metadata round trip
    on network file systems). Handles are keyed by reader and shard, not by path: a reader made later (a new
    `open_cache`, `verify`) opens the file now at that name, never one deleted or replaced since. A handle
    in use is never closed: the count may exceed the cap while threads hold handles, and a descriptor number
    is never reused under a concurrent pread. A freed reader's handles close as newer ones push them out.
    """

    def __init__(self, cap: int):
        self.cap = cap
        self._lock = threading.Lock()
        self._open: OrderedDict[tuple, list[int]] = OrderedDict()  # key -> [fd, users], least recently used first
        os.register_at_fork(after_in_child=self._reset_lock)  # a fork while a thread held the lock

    def _reset_lock(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, key: tuple, path: str) -> list[int]:
        """[fd, users] of `path` (opened under `key`), held until `release`; FileNotFoundError when it is absent."""
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                entry = self._open[key] = [os.open(path, os.O_RDONLY), 1]
                self._trim()  # after counting our use: the new handle is not among those it may close
            else:
                self._open.move_to_end(key)
                entry[1] += 1
            return entry

    def release(self, key: tuple, entry: list[int]) -> None:
        with self._lock:
            entry[1] -= 1
            if entry[1] == 0 and self._open.get(key) is not entry:  # forgotten while in use
                os.close(entry[0])
            else:
                self._trim()

    def forget(self, key: tuple) -> None:
        """Close the handle of `key` (once nobody uses it), so the next read opens the file now at its name."""
        with self._lock:
            entry = self._open.pop(key, None)
            if entry is not None and entry[1] == 0:
                os.close(entry[0])

    def _trim(self) -> None:
        """Close the least recently used handles nobody holds, down to the cap."""
        excess = len(self._open) - self.cap
        if excess > 0:
            for key in list(itertools.islice((k for k, (_, users) in self._open.items() if users == 0), excess)):
                os.close(self._open.pop(key)[0])


HANDLES = _Handles(OPEN_FILES)
_readers = itertools.count()  # a key per RowReader (id() is reused once a reader is freed)


class CorruptChunk(StoreError):
    """A chunk or shard index failed its checksum, could not be decoded, or is missing where rows were committed.

    A StoreError, so the CLI prints the message (which names the array, the rows and `vtn store verify`) on one
    line instead of a traceback.
    """


def damaged(store) -> str:
    """The advice every read of a damaged cache ends with, naming the cache (the zarr store it was opened as)."""
    if isinstance(store, LocalStore):
        url = str(store.root)
    elif hasattr(store, "fs"):  # FsspecStore: s3://bucket/cache.zarr and the like
        url = store.fs.unstrip_protocol(store.path)
    else:
        url = "CACHE"
    return f"the cache is damaged; `vtn store verify {url}` lists all the damage"


def missing_chunks(array, lo: int, hi: int) -> list[tuple[int, int]]:
    """[(a, b)] row ranges inside [lo, hi) whose chunk file (shard file, for a sharded array) is absent.

    zarr reads an absent chunk as the fill value, so rows a writer committed and the disk then lost would read as
    NaN, -1 or "" without a word. Only the caller knows whether a range is committed, and whether the array's
    fill value is one a committed row can hold (zarr stores no chunk whose values all equal it).
    """
    if hi <= lo:
        return []
    rows = array.metadata.chunk_grid.chunk_shape[0]  # the outer grid: shards when sharded, else chunks
    outer = range(lo // rows, (hi - 1) // rows + 1)
    tails = list(itertools.product(*(range(n) for n in array.cdata_shape[1:])))
    prefix = array.store_path.path
    keys = [[f"{prefix}/{k}" if prefix else k for k in (array.metadata.encode_chunk_key((c, *t)) for t in tails)]
            for c in outer]
    store = array.store_path.store

    async def present():
        return await asyncio.gather(*(asyncio.gather(*(store.exists(k) for k in ks)) for ks in keys))

    found = sync(present())
    return [(max(lo, c * rows), min(hi, (c + 1) * rows)) for c, ok in zip(outer, found) if not all(ok)]


def _crc_ok(raw: bytes | memoryview) -> bool:
    return google_crc32c.value(bytes(raw[:-4])) == int.from_bytes(bytes(raw[-4:]), "little")


class RowReader:
    """Reads rows [a, b) of a 1-D or 2-D array sharded along its first axis.

    Every row asked for must have been committed: a shard file or chunk that is absent is damage, never fill
    values (NaN features, NaN timestamps, frame index -1 would pass as data).
    """

    def __init__(self, array):
        self.array = array
        self.where = array.store_path.path  # parts/<part>/<array>
        self.dtype = np.dtype(array.dtype.to_native_dtype() if hasattr(array.dtype, "to_native_dtype") else array.dtype)
        self.tail = tuple(array.shape[1:])
        self._index: dict[int, np.ndarray] = {}
        self._paths: dict[int, str] = {}  # shard -> its file, for local stores
        self._token = next(_readers)
        codecs = array.metadata.codecs
        self.fast = (
            len(codecs) == 1 and isinstance(codecs[0], ShardingCodec)
            and [type(c) for c in codecs[0].codecs] == [BytesCodec, BloscCodec, Crc32cCodec]
            and [type(c) for c in codecs[0].index_codecs] == [BytesCodec, Crc32cCodec]
            and codecs[0].index_location.value == "end"
            and all(s == full for s, full in zip(codecs[0].chunk_shape[1:], array.shape[1:]))
        )
        if self.fast:
            self.chunk_rows = codecs[0].chunk_shape[0]
            self.shard_rows = array.shards[0]
            self.chunks_per_shard = self.shard_rows // self.chunk_rows
            self.store = array.store_path.store
            self.local_root = str(self.store.root) if isinstance(self.store, LocalStore) else None

    # -- bytes -------------------------------------------------------------------------------------------
    def key(self, shard: int) -> str:
        coords = (shard,) + (0,) * len(self.tail)
        return f"{self.where}/{self.array.metadata.encode_chunk_key(coords)}"

    def _path(self, shard: int) -> str:
        path = self._paths.get(shard)
        if path is None:
            path = self._paths[shard] = os.path.join(self.local_root, self.key(shard))
        return path

    def fetch(self, shard: int, start: int | None, length: int) -> bytes | None:
        """Bytes [start, start+length) of a shard file, or its last `length` bytes when start is None."""
        if self.local_root is not None:
            key = (self._token, shard)
            try:
                entry = HANDLES.acquire(key, self._path(shard))
            except FileNotFoundError:
                return None
            try:
                if start is None:
                    start = max(0, os.fstat(entry[0]).st_size - length)
                return os.pread(entry[0], length, start)
            finally:
                HANDLES.release(key, entry)
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest

        req = SuffixByteRequest(length) if start is None else RangeByteRequest(start, start + length)
        buf = sync(self.store.get(self.key(shard), prototype=default_buffer_prototype(), byte_range=req))
        return None if buf is None else buf.to_bytes()

    def shard_index(self, shard: int, refresh: bool = False) -> np.ndarray | None:
        """[chunks_per_shard, 2] (offset, nbytes) of each inner chunk; None when the shard file is missing."""
        if refresh or shard not in self._index:
            n = self.chunks_per_shard * 16 + 4
            raw = self.fetch(shard, None, n)
            if raw is None:
                return None
            if len(raw) != n or not _crc_ok(raw):
                raise CorruptChunk(f"{self.key(shard)}: shard index checksum mismatch")
            self._index[shard] = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
        return self._index[shard]

    def decode(self, raw: bytes, where: str | tuple[int, int]) -> np.ndarray:
        """One chunk's rows from its stored bytes; `where` names the chunk in an error: a string, or (shard, chunk),
        made into one only then (a streamed clip decodes many chunks)."""
        problem = None
        if not _crc_ok(raw):
            problem = "chunk checksum mismatch"
        else:
            try:
                return np.frombuffer(blosc.decompress(raw[:-4]), dtype=self.dtype).reshape(self.chunk_rows, *self.tail)
            except Exception as e:
                problem = f"cannot decompress ({e})"
        raise CorruptChunk(f"{self.chunk_name(*where) if isinstance(where, tuple) else where}: {problem}")

    def chunk_name(self, shard: int, c: int) -> str:
        r0 = shard * self.shard_rows + c * self.chunk_rows
        return f"{self.key(shard)} chunk {c} (rows {r0}..{r0 + self.chunk_rows - 1})"

    # -- rows --------------------------------------------------------------------------------------------
    def _read_shard_rows(self, shard: int, a: int, b: int, out: np.ndarray, retry: bool = True) -> None:
        """Rows [a, b) (absolute) that all lie in `shard` into `out`; CorruptChunk, naming them, if any is lost."""
        try:
            self._decode_rows(shard, a, b, out)
        except CorruptChunk as e:
            if retry:
                # The shard may have been rewritten by a writer after we opened it or cached its index: reopen once.
                self._forget(shard)
                return self._read_shard_rows(shard, a, b, out, retry=False)
            raise CorruptChunk(f"{self.where} rows {a}..{b - 1} cannot be read: {e}; "
                               f"{damaged(self.array.store_path.store)}") from None

    def _forget(self, shard: int) -> None:
        self._index.pop(shard, None)
        if self.local_root is not None:
            HANDLES.forget((self._token, shard))

    def _decode_rows(self, shard: int, a: int, b: int, out: np.ndarray) -> None:
        # The per-read Python is what a streamed clip pays most for after decoding: plain ints, no per-chunk strings.
        base = shard * self.shard_rows
        rows = self.chunk_rows
        c0, c1 = (a - base) // rows, (b - base - 1) // rows + 1
        index = self.shard_index(shard)
        if index is None:
            raise CorruptChunk(f"shard file {self.key(shard)} is missing")
        entries = index[c0:c1].tolist()
        for i, (off, _) in enumerate(entries):
            if off == MISSING:
                raise CorruptChunk(f"{self.chunk_name(shard, c0 + i)} is missing")
        lo = min(off for off, _ in entries)  # inner chunks are written in order, so one range read covers them
        blob = self.fetch(shard, lo, max(off + n for off, n in entries) - lo)
        if blob is None:  # removed since its index was read
            raise CorruptChunk(f"shard file {self.key(shard)} is missing")
        blob = memoryview(blob)  # chunks: views, no copies
        for i, (off, n) in enumerate(entries):
            r0 = base + (c0 + i) * rows
            s0, s1 = max(a, r0), min(b, r0 + rows)
            out[s0 - a:s1 - a] = self.decode(blob[off - lo:off - lo + n], (shard, c0 + i))[s0 - r0:s1 - r0]

    def read(self, a: int, b: int, out: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
        """Rows [a, b) as one array (into `out` when given); shards are decoded on `threads` threads."""
        if out is None:
            out = np.empty((b - a, *self.tail), dtype=self.dtype)
        if b <= a:
            return out
        if not self.fast:
            lost = missing_chunks(self.array, a, b)
            if lost:
                r0, r1 = lost[0]
                raise CorruptChunk(f"{self.where} rows {r0}..{r1 - 1} cannot be read: their chunk file is missing; "
                                   f"{damaged(self.array.store_path.store)}")
            out[:] = self.array[a:b]
            return out
        spans = []
        for shard in range(a // self.shard_rows, (b - 1) // self.shard_rows + 1):
            s0 = max(a, shard * self.shard_rows)
            s1 = min(b, (shard + 1) * self.shard_rows)
            spans.append((shard, s0, s1))
        if threads > 1 and len(spans) > 1:
            with ThreadPoolExecutor(threads) as pool:  # blosc and crc release the GIL
                list(pool.map(lambda s: self._read_shard_rows(s[0], s[1], s[2], out[s[1] - a:s[2] - a]), spans))
        else:
            for shard, s0, s1 in spans:
                self._read_shard_rows(shard, s0, s1, out[s0 - a:s1 - a])
        return out
