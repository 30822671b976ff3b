"""Decode worker processes with a per-video timeout.

`DecodePool` hands videos one at a time to `workers` spawned processes and streams back what they
decode as events, in arrival order, so frames of many videos interleave and the model never waits on one
slow file. Each worker has its own pipe: a worker killed mid-message (hung decode) or crashed (a segfault
in a decoder) only breaks its own pipe, which is dropped with it; its video is recorded as failed and a
fresh worker takes its place. Frames cross the pipe as raw bytes straight into a preallocated array.

A background thread in the parent reads the pipes into a bounded queue: while the model runs (which
releases the GIL), decoded chunks keep arriving, and when the queue is full the workers block on their
pipes, so memory stays bounded by `prefetch` chunks plus one chunk per worker.

Events, each a tuple (kind, key, payload):
- ("info", key, StreamInfo): decoding started; timestamps of every frame are known;
- ("chunk", key, Chunk): consecutive sampled frames;
- ("reset", key, None): drop what arrived for this video, it restarts with another decoder;
- ("done", key, None): every sampled frame was sent;
- ("fail", key, (error class, message)): the video failed; drop what arrived for it.
The timeout counts only time in which the worker sent nothing while the parent was ready to receive, so a
worker waiting on a busy model is never killed. Besides its events, a worker that is decoding sends a small
"alive" message (at most every `timeout / 4` s, 1 s at most) from inside the decoders' demux and decode
loops: a sparse sample of an hour-long file sends its first chunk only after minutes of decoding, and that
is progress, not a hang. The pool reads those and does not pass them on. A worker that is really stuck (in a
read that never returns, a decoder that spins in one call) sends nothing and is killed after the timeout.
Workers ignore SIGINT: on Ctrl-C the parent alone stops (closing the pool stops them), so the terminal shows
the CLI's one line, not a KeyboardInterrupt traceback from every worker.

Only a `VideoError` (decode.py's taxonomy of unusable files) is recorded as the video's failure. Any other
exception is a bug (in vtn or a decoder), not a property of the file: it stops the job with its traceback (a
worker's traceback as the text of a `DecodeBug` raised in the parent), instead of being filed under the video.

`workers=0` decodes each video in a thread of this process, watched the same way: a thread that makes no
progress for the timeout is abandoned (a thread cannot be killed; it stays blocked, as a daemon, until the
process exits) and its video recorded as a DecodeTimeout, and whatever it sends afterwards goes nowhere.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue
import signal
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import wait

import numpy as np

from vtn.extract import decode
from vtn.extract.decode import Chunk, StreamInfo, VideoError, decode_video
from vtn.extract.sampling import SamplingConfig

_END = object()
# A worker that has not said it is up yet (spawning, importing its decoders) is given at least this long:
# that time is not spent on the video it was handed, and the timeout may be set shorter than a start.
_STARTUP_S = 60.0


class DecodeBug(RuntimeError):
    """A decode worker process raised something other than a `VideoError`: a bug, reported with its traceback."""


class _Abandoned(Exception):
    """Stops an inline decode thread whose events are no longer wanted (timed out, or the pool is closing)."""


def _heartbeat(send, key, every: float):
    """`alive()` for `decode_video`: sends ("alive", key, None) at most every `every` seconds."""
    last = time.monotonic()

    def alive() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every:
            last = now
            send("alive", key, None)

    return alive


def _send_video(send, key, path, cfg: SamplingConfig, chunk_bytes: int, threads: int, alive=None) -> None:
    """Decode one video and report it through `send(kind, key, payload)`; `alive()` is called while decoding
    makes progress. A `VideoError` is the video's failure; any other exception propagates (a bug)."""
    try:
        for item in decode_video(path, cfg, chunk_bytes, threads, alive):
            if item is None:
                send("reset", key, None)
            elif isinstance(item, StreamInfo):
                send("info", key, item)
            else:
                send("chunk", key, item)
        send("done", key, None)
    except VideoError as e:
        send("fail", key, (type(e).__name__, str(e)))


def _worker_main(conn, chunk_bytes: int, threads: int, heartbeat: float) -> None:
    """A decode worker: receive (key, path, sampling) until None; send events back; frames as raw bytes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (see the module docstring)
    decode.CAPTURE_DECORD_LOG = True  # decord's raw log lines stay out of the terminal (see decode.py)
    decode.load_readers()

    def send(kind, key, payload):
        if kind == "chunk":
            conn.send((kind, key, (payload.frame_indices, payload.timestamps, payload.frames.shape)))
            conn.send_bytes(np.ascontiguousarray(payload.frames).reshape(-1))  # 1-D: send_bytes counts len()
        else:
            conn.send((kind, key, payload))

    send("alive", None, None)  # up and ready
    while True:
        msg = conn.recv()
        if msg is None:
            return
        key, path, sampling = msg
        try:
            _send_video(send, key, path, SamplingConfig(**sampling), chunk_bytes, threads,
                        _heartbeat(send, key, heartbeat))
        except Exception:  # a bug: the parent raises it (see the module docstring); this worker is done
            send("bug", key, traceback.format_exc())
            return


class _Worker:
    def __init__(self, ctx, chunk_bytes: int, threads: int, heartbeat: float):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, chunk_bytes, threads, heartbeat), daemon=True)
        # SIGINT blocked in the thread that starts the process: the child inherits the mask, so a Ctrl-C in
        # the second before `_worker_main` ignores it (the interpreter starting, imports) cannot interrupt it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()  # so a dead worker shows as EOF on our end
        self.job = None  # (key, path) being decoded
        self.stall = 0.0  # seconds waited on this worker without hearing from it
        self.ready = False  # it has sent its first message (it is up, its decoders imported)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


class DecodePool:
    """Decode `jobs` ((key, path) pairs, or (key, path, SamplingConfig) for a video with its own sampling) in
    `workers` processes; iterate to get the events.

    `workers=0` decodes in threads of this process instead, under the same timeout (see the module docstring).
    Always `close()` (or use `with`), which stops and reaps the workers.
    """

    def __init__(self, jobs, cfg: SamplingConfig, workers: int = 2, timeout: float = 120.0,
                 chunk_bytes: int = 64 << 20, threads: int = 1, prefetch: int = 8):
        self.jobs = deque(jobs)
        self.cfg, self.workers, self.timeout = cfg, workers, timeout
        self.chunk_bytes, self.threads = chunk_bytes, threads
        self.heartbeat = min(1.0, timeout / 4)  # so several heartbeats fit in one timeout
        self._events: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._pool: list[_Worker] = []
        self._thread = threading.Thread(target=self._run, name="vtn-decode-pool", daemon=True)
        self._thread.start()

    def __iter__(self):
        while True:
            ev = self._events.get()
            if ev is _END:
                return
            if isinstance(ev, BaseException):
                raise ev
            yield ev

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._stop.set()
        # Unblock the thread if it waits to put into a full queue.
        while self._thread.is_alive():
            try:
                self._events.get(timeout=0.05)
            except queue.Empty:
                pass
        for w in self._pool:
            if w.job is None:
                w.proc.join(timeout=2)  # idle workers got None and exit by themselves
            w.kill()  # one still decoding (stopped early, e.g. Ctrl-C) is not waited for: it ignores SIGINT
        self._pool = []

    # -- the background thread -----------------------------------------------------------------------------
    def _put(self, event) -> bool:
        while not self._stop.is_set():
            try:
                self._events.put(event, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self) -> None:
        try:
            if self.workers == 0:
                self._run_inline()
            else:
                self._run_workers()
        except BaseException as e:  # surface bugs in the consumer, not as a silent hang
            self._put(e)
        self._put(_END)

    def _run_inline(self) -> None:
        decode.load_readers()  # as a worker does: importing the decoders is starting up, not decoding a video
        for key, path, *own in self.jobs:
            if self._stop.is_set():
                return
            self._decode_inline(key, path, own[0] if own else self.cfg)

    def _decode_inline(self, key, path, sampling: SamplingConfig) -> None:
        """Decode one video in a thread of its own, watched: the time it spends waiting on a full queue (a busy
        consumer) does not count, as for a worker; one that makes no other progress for the timeout is abandoned."""
        lock = threading.Lock()
        state = {"last": time.monotonic(), "putting": False, "abandoned": False}
        bugs: list[BaseException] = []

        def alive() -> None:
            if state["abandoned"]:  # the pool is closing (or gave up on it): stop decoding
                raise _Abandoned
            state["last"] = time.monotonic()

        def send(kind, k, payload) -> None:
            with lock:  # the watchdog's abandoning and this event's going out exclude each other
                if state["abandoned"]:
                    raise _Abandoned
                state["putting"] = True
            try:
                sent = self._put((kind, k, payload))
            finally:
                with lock:
                    state["putting"], state["last"] = False, time.monotonic()
            if not sent:
                raise _Abandoned  # the pool is closing

        def decode_in_thread() -> None:
            try:
                _send_video(send, key, path, sampling, self.chunk_bytes, self.threads, alive)
            except _Abandoned:
                pass
            except BaseException as e:  # a bug: raised to the consumer with its traceback
                bugs.append(e)

        thread = threading.Thread(target=decode_in_thread, name=f"vtn-decode-{key}", daemon=True)
        thread.start()
        while True:
            thread.join(min(1.0, self.timeout / 4))
            if not thread.is_alive():
                break
            with lock:
                stalled = not state["putting"] and time.monotonic() - state["last"] > self.timeout
                state["abandoned"] = stalled or self._stop.is_set()
            if stalled:
                self._put(("fail", key, ("DecodeTimeout", f"{path}: no decoding progress for {self.timeout:g} s; "
                                         "its decoding thread was abandoned (no worker process to kill with --workers 0)")))
            if state["abandoned"]:
                return
        if bugs:
            raise bugs[0]

    def _run_workers(self) -> None:
        ctx = mp.get_context("spawn")  # no inherited threads or CUDA state; workers import only numpy and decoders
        self._pool = [_Worker(ctx, self.chunk_bytes, self.threads, self.heartbeat) for _ in range(self.workers)]
        sampling = dataclasses.asdict(self.cfg)
        while not self._stop.is_set():
            for w in self._pool:
                if w.job is None and self.jobs:
                    key, path, *own = self.jobs.popleft()
                    w.job, w.stall = (key, path), 0.0
                    w.conn.send((key, path, dataclasses.asdict(own[0]) if own else sampling))
            busy = [w for w in self._pool if w.job is not None]
            if not busy:
                break
            t0 = time.monotonic()
            ready = wait([w.conn for w in busy], timeout=min(1.0, self.timeout))
            waited = time.monotonic() - t0
            for i, w in enumerate(self._pool):
                if w.job is None:
                    continue
                if w.conn not in ready:
                    w.stall += waited
                    if w.stall > (self.timeout if w.ready else max(self.timeout, _STARTUP_S)):
                        self._replace(i, "DecodeTimeout", f"no decoding progress for {self.timeout:g} s; the worker was killed")
                    continue
                w.stall = 0.0
                w.ready = True
                try:
                    kind, key, payload = w.conn.recv()
                    if kind == "chunk":
                        indices, timestamps, shape = payload
                        frames = np.empty(shape, dtype=np.uint8)
                        w.conn.recv_bytes_into(frames.reshape(-1))
                        payload = Chunk(indices, timestamps, frames)
                except (EOFError, OSError):
                    self._replace(i, "WorkerCrashed", f"the decode worker died (exit code {w.proc.exitcode})", dead=True)
                    continue
                if kind == "alive":  # progress (or the worker saying it is up); nothing for the consumer
                    continue
                if kind == "bug":
                    raise DecodeBug(f"decoding {w.job[1]} raised an exception that is not a VideoError: a bug in vtn or "
                                    f"a decoder, not a bad video. The worker's traceback:\n{payload}")
                if kind in ("done", "fail"):
                    w.job = None
                if not self._put((kind, key, payload)):
                    return
        for w in self._pool:
            if w.proc.is_alive():
                try:
                    w.conn.send(None)
                except OSError:
                    pass

    def _replace(self, i: int, error: str, why: str, dead: bool = False) -> None:
        """Record worker i's video as failed, and put a fresh worker in its place."""
        w = self._pool[i]
        key, path = w.job
        if not dead:
            w.kill()
        else:
            w.proc.join()
            w.conn.close()
        self._pool[i] = _Worker(mp.get_context("spawn"), self.chunk_bytes, self.threads, self.heartbeat)
        self._put(("fail", key, (error, f"{path}: {why}")))
