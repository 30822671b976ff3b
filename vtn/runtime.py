"""Where a job runs: the one "auto" device rule, autocast, torch's threads, and the torchrun environment.

Read once at the top of a job and passed down; library code never reads RANK or picks a device itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch

from vtn.errors import UserError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Processes:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1


def processes() -> Processes:
    """This process's place: torchrun's variables, derived from SLURM's first under `srun` (see slurm_ranks)."""
    env = os.environ
    for key, value in slurm_ranks(env).items():
        env.setdefault(key, value)  # into the environment: torch.distributed's env:// rendezvous reads them there
    return Processes(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                     int(env.get("LOCAL_WORLD_SIZE", 1)))


def slurm_ranks(env) -> dict[str, str]:
    """torchrun's RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE for a task of an `srun` step of several tasks
    (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, and this node's count in SLURM_STEP_TASKS_PER_NODE, e.g.
    "4(x2),2"); {} under torchrun (it sets RANK), outside a step, or for a step of one task. Only a step's
    variables count: a batch script sees SLURM_NTASKS of the whole allocation while it runs as one process.
    MASTER_ADDR and MASTER_PORT stay the job script's to set (README: a multi-node job)."""
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "RANK" in env or tasks <= 1 or "SLURM_PROCID" not in env:
        return {}
    per_node = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        count, _, times = part.partition("(x")
        per_node += [count] * int(times.rstrip(")") or 1) if count else []
    node = int(env.get("SLURM_NODEID", "0"))
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(tasks), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": per_node[node] if node < len(per_node) else "1"}


def slurm_array_shard(env) -> tuple[tuple[int, int], str] | None:
    """((K, N), why) of a SLURM array task: K = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / its step, N =
    SLURM_ARRAY_TASK_COUNT, so `--array=0-99` and `--array=1-100` give shares 0..99 of 100; None outside an array."""
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    task, first = int(env["SLURM_ARRAY_TASK_ID"]), int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    step, count = int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1), int(env["SLURM_ARRAY_TASK_COUNT"])
    k = (task - first) // step
    why = (f"SLURM_ARRAY_TASK_ID={task}, SLURM_ARRAY_TASK_MIN={first}, SLURM_ARRAY_TASK_COUNT={count}"
           + (f", SLURM_ARRAY_TASK_STEP={step}" if step != 1 else ""))
    if not 0 <= k < count or (task - first) % step:
        raise UserError(f"this SLURM array task is not one of {count} evenly spaced ones ({why}): give --shard K/N")
    return (k, count), why


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """"auto" is this process's GPU (cuda:LOCAL_RANK) when there is one, else the CPU; anything else must be a
    usable torch device."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec!r}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available on this machine")
    return device


def setup_processes(device_spec: str, timeout: float | None = None) -> tuple[Processes, torch.device, bool]:
    """The one process setup of every job: this process's rank and device ("auto": see resolve_device), joining
    torchrun's process group when there is one (`timeout` seconds for its collectives; None: torch's default).
    Returns (processes, device, whether this call created the group, so the caller destroys it)."""
    import torch.distributed as dist

    procs = processes()
    device = resolve_device(device_spec, procs.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    own_group = procs.world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=None if timeout is None else timedelta(seconds=timeout))
    return procs, device, own_group


def size_threads(workers: int = 0, threads: int | None = None) -> int:
    """Size this process's torch threads, once at the top of a job: `threads`, or the cores this process may use
    (its CPU affinity, which torch's default ignores) less the `workers` busy worker processes beside it, at least
    one. Oversubscribed cores make torch's threads spin against the workers. Returns the count."""
    n = threads or max(1, len(os.sched_getaffinity(0)) - workers)
    torch.set_num_threads(n)
    return n


def autocast(device: torch.device, amp: str):
    """The autocast context for an amp setting ("none", "bf16", "fp16") on `device`."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# -- failing together under torchrun ----------------------------------------------------------------------------
# The first rank to fail writes its message in the process group's store; every other rank raises it at its next
# check (between decoded chunks, at most once a second) or while it waits for the others, instead of finishing
# its share and then failing on a peer's closed connection without knowing why.
FAILED = "vtn/failed"  # JSON [whether a UserError, message] of the first rank to fail (never a pickle: the store
# listens on a network port)
LEFT = "vtn/left"  # ranks that have left through a failure
LINGER = 10.0  # seconds rank 0 stays for the others to read the message (without torchrun's agent it hosts the store)
WATCH_EVERY = 0.5  # seconds between a watching rank's looks for another rank's failure
WATCH_GRACE = 3.0  # seconds a rank that saw one has to fail by itself before its watchdog ends it


class RankFailed(RuntimeError):
    """Another rank's failure, raised here: that rank reports it, this one only stops."""


def on_rank0(fn: Callable, rank: int, world_size: int):
    """`fn()` on rank 0 only; whatever it raises stops every rank at once with rank 0's message (the others would
    otherwise wait in their next collective for the job's timeout). Rank 0 raises its own exception; the others a
    UserError for a UserError (one line, exit 2), else a RankFailed naming rank 0's exception."""
    import torch.distributed as dist

    error, result = [None], None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:
            error = [(isinstance(e, UserError), type(e).__name__, str(e))]
            if world_size > 1:
                dist.broadcast_object_list(error, src=0)
            raise
    if world_size > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        user, kind, message = error[0]
        raise UserError(message) if user else RankFailed(f"rank 0 failed: {kind}: {message}")
    return result


def _store():
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def _failure(record: bytes) -> Exception:
    user, message = json.loads(record)
    return UserError(message) if user else RankFailed(message)


class FailTogether:
    """`with FailTogether(rank, world) as ranks:` any exception on a rank is published before it leaves;
    `ranks.check()` raises another rank's published failure (cheap: at most one store look-up a second).

    With `watch`, a thread looks for another rank's failure every WATCH_EVERY seconds, so a rank blocked in a
    collective that will never complete (DDP's gradient all-reduce waiting for the rank that failed) does not
    wait for the job's timeout: given WATCH_GRACE seconds to fail on its own (its collective broken by the
    failed rank leaving), it then prints that rank's message and ends its process."""

    def __init__(self, rank: int, world: int, watch: bool = False):
        self.rank, self.world, self.last = rank, world, 0.0
        self._inside = threading.Event()
        self._watch = watch and world > 1

    def check(self, now: bool = False) -> None:
        if self.world == 1 or (not now and time.monotonic() - self.last < 1.0):
            return
        self.last = time.monotonic()
        if _store().check([FAILED]):
            raise _failure(_store().get(FAILED))

    def wait(self, work) -> None:
        """Wait for an async collective (e.g. the barrier where ranks that finished wait for the others), raising
        a failure published meanwhile by a rank that will never arrive."""
        while not work.is_completed():
            self.check(now=True)
            time.sleep(0.2)
        work.wait()

    def __enter__(self):
        if self._watch:
            self._inside.set()
            threading.Thread(target=self._watchdog, args=(_store(),), daemon=True, name="vtn-fail-together").start()
        return self

    def _watchdog(self, store) -> None:
        try:
            while self._inside.is_set() and not store.check([FAILED]):
                time.sleep(WATCH_EVERY)
            if not self._inside.is_set():
                return
            record = store.get(FAILED)
        except Exception:  # the store is gone: the job is ending, and this rank's collectives fail by themselves
            return
        deadline = time.monotonic() + WATCH_GRACE
        while self._inside.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._inside.is_set():  # still inside: blocked where no exception can reach it
            failure = _failure(record)
            user = isinstance(failure, UserError)
            print(f"vtn: {'error: ' if user else ''}{failure} (rank {self.rank} stops too)", file=sys.stderr, flush=True)
            os._exit(2 if user else 1)

    def __exit__(self, kind, error, tb):
        self._inside.clear()
        if self.world == 1 or not isinstance(error, Exception):
            return False
        try:
            first = self._publish(kind, error)
        except Exception:  # the store is gone (rank 0 left): this rank's own error is all there is to report
            return False
        if first is not None:
            raise first from error
        return False

    def _publish(self, kind, error) -> Exception | None:
        """Publish `error` unless another rank's came first: that one is returned."""
        store = _store()
        if not isinstance(error, RankFailed):
            user = isinstance(error, UserError)
            mine = json.dumps([user, str(error) if user else f"rank {self.rank} failed: {kind.__name__}: {error}"]).encode()
            first = store.compare_set(FAILED, "", mine)
            if first != mine:  # another rank failed first (this one's collective may have broken because it left)
                store.add(LEFT, 1)
                return _failure(first)
        store.add(LEFT, 1)
        deadline = time.monotonic() + LINGER
        while self.rank == 0 and store.add(LEFT, 0) < self.world and time.monotonic() < deadline:
            time.sleep(0.1)
        return None


def peak_memory(device: torch.device) -> int:
    """This process's peak memory in bytes: on CUDA the most allocated by torch on `device`, on the CPU the
    resident-set high-water mark (what the operating system had to give, the figure that runs out)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB
