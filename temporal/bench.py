"""`vtn bench temporal`: forward+backward time and peak memory of the `hf` and `fast` encoder backends.

Each (device, windows, T, backend) runs in a fresh Python process, so one measurement's allocations never
flatter or burden the next. Time is the median of `repeats` steps after a warm-up step, in train mode
(dropout on), fp32. Peak memory is the growth during one more step over the footprint before it (model,
inputs, initialised libraries): activations and parameter gradients. On CUDA it is
torch.cuda.max_memory_allocated; on the CPU the resident-set high-water mark (see _cpu_peak_bytes).
"""

from __future__ import annotations

import ctypes
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WINDOW_SETS = ((16, 32, 64), (256,))
LENGTHS = (16, 64, 256, 1024, 4096)
FRAMES_PER_STEP = 512  # 32 clips of 16 frames, 8 of 64, 2 of 256, 1 of 1024 or 4096
M_MMAP_THRESHOLD = -3  # mallopt parameter, from glibc's malloc.h


@dataclass(frozen=True)
class BenchConfig:
    """What `vtn bench temporal` measures; modest sizes so the CPU run takes a few minutes on 2 cores."""

    batch: int | None = None  # clips per step; None: about FRAMES_PER_STEP frames, as training batches are sized
    hidden: int = 256
    heads: int = 4
    lengths: tuple[int, ...] = LENGTHS
    repeats: int = 3
    threads: int = 1  # CPU threads; one keeps timings stable on a shared machine (idle threads stall at barriers)
    devices: tuple[str, ...] = ("cpu", "cuda")  # cuda is skipped where there is none


def measure(device: str, backend: str, windows: list[int], T: int, batch: int, hidden: int, heads: int,
            repeats: int, threads: int) -> dict:
    """One fwd+bwd measurement in this process: median seconds and peak memory growth in bytes."""
    import torch

    torch.set_num_threads(threads)

    from vtn.temporal.model import VTN, VTNConfig

    torch.manual_seed(0)
    config = VTNConfig(
        feature_dim=hidden, hidden_size=hidden, num_layers=len(windows), num_heads=heads,
        intermediate_size=4 * hidden, attention_window=tuple(windows), max_positions=T, num_classes=10,
        backend=backend,
    )
    model = VTN(config).to(device).train()
    features = torch.randn(batch, T, hidden, device=device)
    mask = torch.ones(batch, T, dtype=torch.bool, device=device)
    positions = torch.arange(T, device=device).expand(batch, T)

    def step():
        model(features, mask, positions).sum().backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: lazy initialisation (kernels, thread pools, allocator caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _cuda_peak_bytes(step) if device == "cuda" else _cpu_peak_bytes(step)
    return {"seconds": statistics.median(times), "peak_bytes": peak}


def _cuda_peak_bytes(step) -> int:
    import torch

    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated() - base


def _cpu_peak_bytes(step) -> int:
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


def measure_in_subprocess(**spec) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "vtn.temporal.bench", json.dumps(spec)], capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"benchmark of {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(cfg: BenchConfig) -> list[dict]:
    """Measure every combination and print one table per device; returns the rows."""
    import torch

    devices = [d for d in cfg.devices if d == "cpu" or torch.cuda.is_available()]
    rows = []
    for device in devices:
        batches = "max(1, 512 / T) clips" if cfg.batch is None else f"{cfg.batch} clips"
        print(f"\nvtn bench temporal: {device}, batch {batches}, hidden {cfg.hidden}, {cfg.heads} heads, "
              f"FFN {4 * cfg.hidden}, one layer per window, fp32, train mode, {cfg.threads} CPU thread(s); "
              f"forward+backward, median of {cfg.repeats}; peak = memory growth during a step")
        print(f"{'windows':<14}{'T':>6}{'batch':>6}{'hf ms':>10}{'fast ms':>10}{'speed-up':>10}{'hf MiB':>10}{'fast MiB':>10}"
              f"{'fast KiB/frame':>16}")
        for windows in WINDOW_SETS:
            for T in cfg.lengths:
                batch = cfg.batch or max(1, FRAMES_PER_STEP // T)
                r = {"device": device, "windows": list(windows), "T": T, "batch": batch}
                for backend in ("hf", "fast"):
                    m = measure_in_subprocess(device=device, backend=backend, windows=list(windows), T=T,
                                              batch=batch, hidden=cfg.hidden, heads=cfg.heads,
                                              repeats=cfg.repeats, threads=cfg.threads)
                    r[backend] = m
                rows.append(r)
                hf, fast = r["hf"], r["fast"]
                print(f"{str(list(windows)):<14}{T:>6}{batch:>6}{hf['seconds'] * 1e3:>10.1f}{fast['seconds'] * 1e3:>10.1f}"
                      f"{hf['seconds'] / fast['seconds']:>9.1f}x{hf['peak_bytes'] / 2**20:>10.1f}"
                      f"{fast['peak_bytes'] / 2**20:>10.1f}{fast['peak_bytes'] / 1024 / (batch * T):>16.1f}",
                      flush=True)
    return rows


if __name__ == "__main__":  # one measurement, run by measure_in_subprocess
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
