"""`vtn bench sweep`: batched against separate `vtn train` runs, and a mixed grid with `--jobs` against separate
commands, on a small generated cache; wall times with process start-up, as a user runs them."""

from __future__ import annotations

import itertools
from pathlib import Path

BENCH_SETS = ["data.clip_frames=8", "data.stride=2", "optim.batch_size=16", "model.dropout=0",
              "model.attention_dropout=0", "model.head_dropout=0"]


def bench_cache(path: Path) -> str:
    """A small generated cache: 4 classes of 32-D features, 96 train and 32 val videos of 16-32 frames."""
    import numpy as np

    from vtn.store import CacheWriter

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    with CacheWriter(str(path), feature_dim=32, class_names=[f"k{c}" for c in range(4)]) as w:
        for split, n in (("train", 24), ("val", 8)):
            for c in range(4):
                for i in range(n):
                    t = int(rng.integers(16, 33))
                    idx = np.arange(t) * 2
                    w.add(f"{split}/{c}/{i}", centres[c] + rng.normal(size=(t, 32)), idx / 25, idx, label=c,
                          split=split, fps=25.0)
    return str(path)


def _timed(argvs: list[list[str]]) -> float:
    """Seconds to run these `vtn` commands one after another (each a fresh process, as a user runs them)."""
    import subprocess
    import sys
    import time

    tick = time.perf_counter()
    for argv in argvs:
        done = subprocess.run([sys.executable, "-m", "vtn", *argv], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"vtn {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - tick


def bench(steps: int = 60, jobs: int = 2) -> dict:
    """8 seed x lr runs batched vs 8 `vtn train` commands; a 12-run mixed grid with --jobs vs 12 commands."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = bench_cache(tmp / "cache")
        common = ["--model", "tiny", *(x for s in BENCH_SETS for x in ("--set", s)), "--set", f"optim.steps={steps}",
                  "--quiet"]

        def commands(grid: dict, seeds: int, out: str) -> list[list[str]]:
            combos = [dict(zip(grid, c)) for c in itertools.product(*grid.values())]
            return [["train", cache, "--out", str(tmp / out / f"{i}-{s}"), *common, "--set", f"run.seed={s}",
                     *(x for k, v in combo.items() for x in ("--set", f"{k}={v}"))]
                    for i, combo in enumerate(combos) for s in range(seeds)]

        def grid_args(grid: dict) -> list[str]:
            return [x for k, v in grid.items() for x in ("--grid", f"{k}={','.join(map(str, v))}")]

        # Each figure is printed as soon as it is measured: the whole bench takes minutes on a busy machine.
        print(f"vtn bench sweep: tiny encoder (hidden 128, 2 layers, no dropout unless varied), {steps} steps of 16 "
              f"clips x 8 frames per run, 96 train / 32 val videos of 32-D features; wall time with process "
              f"start-up", flush=True)
        same = {"optim.lr": [1e-3, 3e-3]}
        separate = _timed(commands(same, 4, "separate8"))
        batched = _timed([["sweep", cache, "--out", str(tmp / "sweep8"), *grid_args(same), "--seeds", "4", *common]])
        print(f"  8 runs (lr 1e-3, 3e-3 x 4 seeds): 8 vtn train commands {separate:.1f} s; one batched vtn sweep "
              f"{batched:.1f} s = {batched / separate:.2f}x", flush=True)
        mixed = {"model.num_layers": [1, 2], "model.dropout": [0.0, 0.1], "optim.lr": [1e-3, 3e-3, 1e-2]}
        separate12 = _timed(commands(mixed, 1, "separate12"))
        swept12 = _timed([["sweep", cache, "--out", str(tmp / "sweep12"), *grid_args(mixed), "--jobs", str(jobs),
                           *common]])
        print(f"  12 runs (layers 1, 2 x dropout 0, 0.1 x lr 1e-3, 3e-3, 1e-2): 12 vtn train commands "
              f"{separate12:.1f} s; vtn sweep --jobs {jobs} {swept12:.1f} s = {swept12 / separate12:.2f}x", flush=True)
    figures = {"separate_8": separate, "batched_8": batched, "separate_12": separate12, f"jobs{jobs}_12": swept12}
    return figures
