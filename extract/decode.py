"""Video decoding: real frame timestamps and the sampled frames, in bounded chunks.

The readers are tried in the order of `READERS`: decord first (fast random access), PyAV for files decord
cannot open or read. Both report every frame's presentation time from the container's timestamps, so sampling
by time is right for variable-frame-rate files. Frames come out as uint8 RGB arrays [n, H, W, 3] in chunks of at
most `chunk_bytes`, so a 4K or hour-long file is never held whole.

Every way a file can be unusable raises a `VideoError` subclass whose name is recorded in the cache as
the failure's error class. This module imports no torch: it runs in the decode worker processes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from vtn.extract.sampling import SamplingConfig, sample, video_duration

DEFAULT_CHUNK_BYTES = 64 << 20
# decord's C++ logger writes "[hh:mm:ss] file.cc:NN: ERROR opening: FILE, REASON" straight to file descriptor 2, and
# no log level turns it off (decord's level is its FFmpeg's). A decode worker process, where nothing else writes
# to stderr meanwhile, sets this, and decord's open then runs with fd 2 captured and such lines dropped. Not in
# the parent (`--workers 0`): there fd 2 is the user's terminal, shared with the progress bar, and an open that
# hangs would keep it captured.
CAPTURE_DECORD_LOG = False
_DECORD_LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+\.cc:\d+: ")


class VideoError(Exception):
    """A video that cannot be used; recorded as a failure (error class = the subclass name), never substituted."""


class EmptyFile(VideoError):
    """The file has zero bytes."""


class NotAVideo(VideoError):
    """The file cannot be opened as media, or has no video stream (text, audio-only, missing index)."""


class Unreadable(VideoError):
    """The file exists but cannot be read: permission denied, an I/O error. Nothing says it is not a video."""


class NoFrames(VideoError):
    """The video stream holds no decodable frame."""


class DecodeError(VideoError):
    """Some frames decode and a needed one does not (corrupt or truncated data)."""


class DecodeTimeout(VideoError):
    """Decoding made no progress for longer than the timeout and the worker was killed."""


class WorkerCrashed(VideoError):
    """The decode worker process died while decoding this video."""


@dataclass
class StreamInfo:
    """What the decoder learnt about a video before reading frames."""

    timestamps: np.ndarray  # [n] float64 seconds from the first frame, every frame in presentation order
    fps: float  # native frame rate: frames / duration (the average for variable-rate files)
    duration: float  # seconds, first frame start to last frame end
    num_frames: int  # frames in the stream (counted from its packets, not read from the header)
    width: int
    height: int
    backend: str  # "decord" or "pyav"


@dataclass
class Chunk:
    """Consecutive sampled frames of one video."""

    frame_indices: np.ndarray  # [n] int64 indices of the frames in the video
    timestamps: np.ndarray  # [n] float64 seconds
    frames: np.ndarray  # [n, H, W, 3] uint8 RGB


def _info(timestamps, width: int, height: int, backend: str, rate: float) -> StreamInfo:
    """`rate` is the container's average frame rate (frames per second; 0 when it gives none)."""
    t = np.asarray(timestamps, dtype=np.float64)
    # Seconds from the first frame, to the microsecond: decord reports float32 seconds, PyAV exact
    # ticks; rounding makes both agree.
    t = np.round(t - t[0], 6)
    duration = round(video_duration(t), 6)
    if len(t) == 1 and rate > 0:  # no second frame to time the first by: it lasts one frame at the container's rate
        duration = round(1 / rate, 6)
    fps = round(len(t) / duration, 3) if duration > 0 else 0.0
    return StreamInfo(t, fps, duration, len(t), width, height, backend)


def _chunk_frames(width: int, height: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // max(1, width * height * 3))


def check_file(path: str | Path) -> None:
    """Fail fast on files no decoder should be handed: missing, zero-byte or unreadable.

    Reading is tried here, because the decoders report a file they may not read as one they cannot parse.
    Only regular files are opened: opening a FIFO blocks until someone writes to it (the decode timeout
    covers that, as it covers a stuck network mount).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotAVideo(f"{path}: no such file") from None
    except OSError as e:  # a folder on the way that may not be searched, an I/O error
        raise Unreadable(f"{path}: cannot read it: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        return
    if st.st_size == 0:
        raise EmptyFile(f"{path}: the file is empty (0 bytes)")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise Unreadable(f"{path}: cannot read it: {e.strerror or e}") from None


@contextlib.contextmanager
def _decord_log_dropped():
    """Run the calls inside with fd 2 in a temporary file (if CAPTURE_DECORD_LOG), then pass on all but decord's
    logger lines."""
    if not CAPTURE_DECORD_LOG:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            rest = [line for line in log.read().decode(errors="replace").splitlines(keepends=True)
                    if not _DECORD_LOG_LINE.match(line)]
            if rest:
                sys.stderr.write("".join(rest))
                sys.stderr.flush()


def _sorted_unique(values) -> np.ndarray:
    return np.unique(np.asarray(values, dtype=np.float64))


class DecordReader:
    """Frames through decord: the packet index gives every frame's timestamp; `get_batch` reads by index."""

    backend = "decord"
    library = "decord"  # the module it imports
    # decord's reader keeps pushing packets to its decoder thread whenever a frame is not ready yet (its pop does
    # not wait), and that thread decodes every pushed packet into an RGB frame in the background: behind a slow
    # consumer (a busy model) a whole video can pile up in memory (README, Benchmarks). decord therefore reads only
    # videos whose every frame together fits in this many bytes; longer or larger ones go to PyAV, whose memory stays
    # flat and which decodes them as fast.
    max_bytes: int | None = 256 << 20
    # Frames per `get_batch` call: between calls the reader reports that it is alive (a sparse chunk can take
    # one seek and GOP decode per frame).
    batch = 16

    def __init__(self, path: str | Path, threads: int = 1, alive=None):
        import decord

        # decord's own FFmpeg logs every damaged packet of a bad file on stderr; what matters is in the error.
        decord.logging.set_level(decord.logging.QUIET)
        self.alive = alive or _nothing

        # What decord raises for every kind of bad file; anything else is a bug and propagates.
        self.errors = (decord.DECORDError, RuntimeError)
        try:
            with _decord_log_dropped():
                self.vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)
            n = len(self.vr)
            if n == 0:
                raise NoFrames(f"{path}: the video stream has no frames")
            ts = self.vr.get_frame_timestamp(np.arange(n))[:, 0]
            height, width = self.vr[0].shape[:2]
            rate = self.vr.get_avg_fps()
        except self.errors as e:
            raise NotAVideo(f"{path}: decord cannot open it: {_first_line(e)}") from None
        self.path = path
        self.info = _info(ts, width, height, self.backend, rate)
        # decord seeks to a frame by its timestamp, so they must be distinct; if they are not, let PyAV read it.
        if len(_sorted_unique(ts)) != n:
            raise NotAVideo(f"{path}: decord reports repeated frame timestamps")

    def read(self, indices: np.ndarray, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
        step = _chunk_frames(self.info.width, self.info.height, chunk_bytes)
        for i in range(0, len(indices), step):
            idx = indices[i: i + step]
            try:
                parts = []
                for j in range(0, len(idx), self.batch):
                    parts.append(self.vr.get_batch(idx[j: j + self.batch].tolist()).asnumpy())
                    self.alive()
                frames = parts[0] if len(parts) == 1 else np.concatenate(parts)
            except self.errors as e:
                raise DecodeError(f"{self.path}: decord cannot decode frames {idx[0]}..{idx[-1]}: {_first_line(e)}") from None
            yield Chunk(idx, self.info.timestamps[idx], frames)


class PyAVReader:
    """Frames through PyAV: one demux pass (packets only, no decoding) for the index, then one decode pass.

    The index is the presentation time of every packet the decoder will output a frame for: packets the
    demuxer flags as discarded (frames before an MP4 edit list's start, e.g. a trimmed clip) are left out, and
    repeated times are kept (each packet is a frame). The decode pass is the truth: frame i is the i-th frame
    the decoder outputs (presentation order) and its timestamp is that frame's own pts, so a frame the index
    did not foresee can never shift the times of the frames after it. Sequential decoding is slower than
    decord's seeking for sparse sampling, but it reads files decord cannot.
    """

    backend = "pyav"
    library = "av"
    max_bytes: int | None = None  # its memory stays flat however long the video

    def __init__(self, path: str | Path, threads: int = 1, alive=None):
        import av

        self.path, self.threads, self.alive = path, threads, alive or _nothing
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise NotAVideo(f"{path}: no video stream")
                stream = container.streams.video[0]
                width, height = stream.codec_context.width, stream.codec_context.height
                rate = float(stream.average_rate or stream.guessed_rate or 0)
                self.time_base = float(stream.time_base)
                pts, untimed = [], 0
                for packet in container.demux(stream):
                    self.alive()
                    if packet.size == 0 or packet.is_discard:  # end-of-stream marker; frame dropped by an edit list
                        continue
                    t = _packet_time(packet)
                    if t is None:
                        untimed += 1
                    else:
                        pts.append(t)
        except av.FFmpegError as e:
            raise NotAVideo(f"{path}: cannot open it as a video: {_first_line(e)}") from None
        if untimed:
            raise NotAVideo(f"{path}: {untimed} of {untimed + len(pts)} frames carry no timestamp")
        if not pts:
            raise NoFrames(f"{path}: the video stream has no frames")
        ts = np.sort(np.asarray(pts, dtype=np.int64)) * self.time_base
        self.t0 = ts[0]  # what frames' times are counted from, as in `_info`
        self.info = _info(ts, width, height, self.backend, rate)

    def read(self, indices: np.ndarray, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
        import av

        step = _chunk_frames(self.info.width, self.info.height, chunk_bytes)
        wanted = set(indices.tolist())
        last = int(indices[-1])
        buf_idx: list[int] = []
        buf_pts: list[int] = []
        buf: list[np.ndarray] = []
        decoded = 0
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_count = self.threads
                for frame in container.decode(stream):
                    self.alive()
                    if decoded in wanted:
                        pts = _packet_time(frame)
                        if pts is None:
                            raise DecodeError(f"{self.path}: frame {decoded} decodes without a timestamp")
                        buf_idx.append(decoded)
                        buf_pts.append(pts)
                        # Turned upright as the container's display matrix says (decord does the same); PyAV's
                        # angle is counter-clockwise, as np.rot90's.
                        buf.append(np.rot90(frame.to_ndarray(format="rgb24"), frame.rotation // 90))
                        if len(buf) == step:
                            yield self._chunk(buf_idx, buf_pts, buf)
                            buf_idx, buf_pts, buf = [], [], []
                    decoded += 1
                    if decoded > last:
                        break
        except av.FFmpegError as e:
            if decoded == 0:
                raise NoFrames(f"{self.path}: no frame decodes: {_first_line(e)}") from None
            raise DecodeError(f"{self.path}: decoding fails after frame {decoded - 1}: {_first_line(e)}") from None
        if decoded == 0:
            raise NoFrames(f"{self.path}: the stream lists {self.info.num_frames} frames but none decodes")
        if decoded <= last:
            raise DecodeError(f"{self.path}: only {decoded} of {self.info.num_frames} listed frames decode")
        if buf:
            yield self._chunk(buf_idx, buf_pts, buf)

    def _chunk(self, idx: list[int], pts: list[int], frames: list[np.ndarray]) -> Chunk:
        # The frames' own times, computed exactly as `_info` computes the index's, so they agree to the bit.
        t = np.round(np.asarray(pts, dtype=np.int64) * self.time_base - self.t0, 6)
        return Chunk(np.asarray(idx, dtype=np.int64), t, np.stack(frames))


def _packet_time(p) -> int | None:
    """A packet's or decoded frame's presentation time in time-base ticks: its pts, else its dts (streams
    without B-frames whose container stores one time only), else None."""
    return p.pts if p.pts is not None else p.dts


def _nothing() -> None:
    pass


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    # decord's messages carry a C++ source location and a stack; the first line says what failed.
    return text.splitlines()[0][:300]


# The readers, in the order they are tried. A reader is a class with `backend` (its name in StreamInfo),
# `library` (the module it imports), `max_bytes` (the largest video, every frame as RGB, it takes; None: any),
# `__init__(path, threads, alive)` setting `info` (a StreamInfo) and `read(indices, chunk_bytes)` yielding Chunks;
# it raises a VideoError for a file it cannot read.
READERS = (DecordReader, PyAVReader)


def load_readers() -> None:
    """Import every reader's library now (a decode worker's start-up, not its first video's decode time)."""
    for reader in READERS:
        importlib.import_module(reader.library)


def decoder_attrs() -> dict:
    """What a cache records of its decoding: the readers in the order they are tried, what frames and times are."""
    return {"primary": READERS[0].backend, "fallback": ", ".join(r.backend for r in READERS[1:]),
            "frames": "RGB uint8, container presentation order",
            "timestamps": "seconds from the first frame, from container pts, rounded to 1 us"}


def decode_video(path: str | Path, cfg: SamplingConfig, chunk_bytes: int = DEFAULT_CHUNK_BYTES, threads: int = 1,
                 alive=None):
    """Decode the sampled frames of one video: yields the `StreamInfo` first, then `Chunk`s.

    `alive()`, if given, is called often while the decoders make progress (every packet demuxed, frame decoded
    or small batch read), so a caller can tell a slow decode (an hour-long file sampled sparsely sends its first
    chunk only after decoding most of it) from a hung one; it must be cheap.

    The `READERS` in order: the first that can open and read the file (and whose `max_bytes` all its frames fit
    in) gives the frames. When a reader fails after some chunks were yielded, a `None` is yielded before the next
    reader's own `StreamInfo`, telling the consumer to drop what it got for this video (two decoders may disagree
    on frames, and nothing is mixed or substituted). Raises a `VideoError` when no reader can produce every
    sampled frame.
    """
    check_file(path)
    errors = []
    for i, reader_class in enumerate(READERS):
        yielded = False
        try:
            reader = reader_class(path, threads, alive)
            info = reader.info
            if reader.max_bytes is not None and info.num_frames * info.width * info.height * 3 > reader.max_bytes:
                raise NotAVideo(f"{path}: {info.num_frames} frames of {info.width}x{info.height} are more than "
                                f"{reader.backend} reads in bounded memory")
            indices = sample(info.timestamps, cfg)
            yield info
            yielded = True
            yield from reader.read(indices, chunk_bytes)
            return
        except VideoError as e:
            errors.append(e)
        if yielded and i + 1 < len(READERS):
            yield None
    # Report the most specific error: the last one that is not a NotAVideo (e.g. PyAV's "no video stream" over
    # decord's "cannot open", decord's decode error over PyAV's "cannot open").
    raise next((e for e in reversed(errors) if not isinstance(e, NotAVideo)), errors[-1])
