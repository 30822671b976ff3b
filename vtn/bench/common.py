"""What the benchmarks share: the device they measure on, waiting for it, and peak memory (of this process on
CUDA or the CPU, or of a whole process tree)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

M_MMAP_THRESHOLD = -3  # mallopt parameter, from glibc's malloc.h


def device(spec: str):
    """"auto" is CUDA where present, else the CPU; anything else as torch reads it."""
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec)


def sync(device) -> None:
    """Wait for the device's queued work, so a timer read next covers it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_peak_bytes(step) -> int:
    """Growth of CUDA's allocated memory during `step()` at its peak."""
    import torch

    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated() - base


def cpu_peak_bytes(step) -> int:
    """Resident-set growth during one step, after the timed ones (so it is not slowed by the settings below).

    glibc keeps freed heap pages for reuse, which a later step would then use without the resident set
    growing; a fixed mmap threshold makes every large buffer come from and go back to the OS, and
    malloc_trim returns what is cached now. Then the high-water mark is reset to the current resident set.
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _proc_status_bytes("VmRSS")
    step()
    return _proc_status_bytes("VmHWM") - base


def _proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: resident high-water mark) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss(cmd: list[str], err: list | None = None) -> tuple[int, float, float]:
    """Run `cmd`; returns (exit status, peak MiB of the summed RSS of its process tree, peak MiB of its largest
    process), sampled from /proc every 50 ms. Its stderr is appended to `err` when given."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = single = 0
    while proc.poll() is None:
        total, largest = _tree_rss(proc.pid)
        peak, single = max(peak, total), max(single, largest)
        time.sleep(0.05)
    text = proc.stderr.read().decode(errors="replace")
    if err is not None:
        err.append(text)
    if proc.returncode != 0:
        print(text[-2000:], file=sys.stderr)
    return proc.returncode, peak / (1 << 20), single / (1 << 20)


def _tree_rss(pid: int) -> tuple[int, int]:
    """Bytes resident in `pid` and all its descendants, from /proc: (their sum, the largest one)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, largest, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        largest = max(largest, rss.get(p, 0))
        stack.extend(children.get(p, []))
    return total, largest
