"""Who is writing a cache right now: one entry per live writer under `writers/`.

A job launched twice on one cache once stored every video twice (each saw nothing committed and did it all),
and `--overwrite` beside a running job deleted the parts it was writing. So every CacheWriter registers
`writers/<stamp>-<token>` (attributes: host, pid, share, started, beat), refreshes `beat` from a thread every
BEAT_S seconds, and removes its entry when it closes. An entry is live while its beat is younger than STALE_S
and, on this host, its process still exists: a writer killed with SIGKILL stops counting at once on its own
host and STALE_S after its last beat seen from another.

A writer that claims a share of the videos (`vtn extract`: its --shard K/N, or all of them as 0/1) refuses to
start while a live writer that registered before it claims an overlapping share. Each registers before it
looks, and the earlier (started, name) wins, so of two jobs launched together exactly one goes on. Writers
that claim nothing (torchrun ranks other than 0, which share rank 0's claim; store-level writers that split
the videos themselves) still count as live for `--overwrite`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from datetime import datetime, timezone

from vtn.store.index import child_groups
from vtn.store.layout import StoreError, require_group

GROUP = "writers"
BEAT_S = 20.0
STALE_S = 120.0


def _alive(entry: dict, now: float) -> bool:
    if now - float(entry.get("beat", 0)) > STALE_S:
        return False
    if entry.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(entry["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _overlap(a, b) -> bool:
    """Whether two claimed shares [k, n] can hold the same video (only k-th and j-th of the same n cannot)."""
    return not (a[1] == b[1] and a[0] != b[0])


def live_writers(root, prune: bool = True) -> dict[str, dict]:
    """{entry name: attributes} of the writers now live on the cache; dead entries are removed on the way (`prune`;
    a reader leaves them)."""
    if GROUP not in root:
        return {}
    now, live = time.time(), {}
    for name, g in child_groups(root[GROUP]):
        entry = dict(g.attrs)
        if _alive(entry, now):
            live[name] = entry
        elif prune:
            with contextlib.suppress(KeyError, OSError):  # another writer removed it first
                del root[GROUP][name]
    return live


def describe(entry: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    share = entry.get("share")
    what = "all videos" if share == [0, 1] else f"share {share[0]}/{share[1]}" if share else "its own videos"
    started = datetime.fromtimestamp(float(entry["started"]), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f"pid {entry.get('pid')} on {entry.get('host')}, {what}, started {started}, "
            f"last seen {now - float(entry['beat']):.0f} s ago")


class Lease:
    """This writer's entry in `writers/`, kept fresh by a daemon thread until `release()`."""

    def __init__(self, root, url: str, share: tuple[int, int] | None):
        self.root, self.url = root, url
        now = time.time()
        self.name = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        entry = {"host": socket.gethostname(), "pid": os.getpid(), "share": list(share) if share else None,
                 "started": now, "beat": now}
        self._group = require_group(root, GROUP).create_group(self.name, attributes=entry)
        if share is not None:
            self._check(entry)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="vtn-writer-lease", daemon=True)
        self._thread.start()

    def _check(self, mine: dict) -> None:
        rivals = [(e["started"], name, e) for name, e in live_writers(self.root).items()
                  if name != self.name and e.get("share") and _overlap(e["share"], mine["share"])
                  and (e["started"], name) < (mine["started"], self.name)]
        if rivals:
            self._remove()
            rival = min(rivals, key=lambda r: r[:2])[2]
            raise StoreError(
                f"{self.url}: another writer is writing the same videos into this cache ({describe(rival)}); "
                "two jobs on one cache would store every video twice, so this one did nothing. Let it finish "
                "and re-run to add what it leaves out, or give each job its own --shard K/N. A job that was "
                f"killed stops counting {STALE_S:.0f} s after it was last seen (at once on its own host)")

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            with contextlib.suppress(OSError):  # a full or flaky disk: the writer itself reports it; the beat tries again
                self._group = self._group.update_attributes({"beat": time.time()})

    def _remove(self) -> None:
        with contextlib.suppress(KeyError, OSError):  # already gone (an --overwrite elsewhere) or the disk is failing
            del self.root[GROUP][self.name]

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._remove()


def check_no_writers(root, url: str) -> None:
    """Refuse to replace a cache that a live writer is writing."""
    live = live_writers(root)
    if live:
        who = "; ".join(describe(e) for e in live.values())
        raise StoreError(f"{url}: a writer is live on this cache ({who}); --overwrite would delete what it is "
                         "writing, so nothing was changed. Stop that job first, or write to another --out")
