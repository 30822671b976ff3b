"""`vtn bench export`: what TensorBoard logging costs a tiny `vtn train` run, and ONNX Runtime against PyTorch on the
CPU for the paper's encoder (`vtn export --onnx`) at 16 and 288 frames."""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from dataclasses import replace
from pathlib import Path


def tensorboard_overhead(tmp: Path, steps: int, repeats: int) -> tuple[float, float, float]:
    """Best-of-`repeats` seconds of a tiny in-process `vtn train` run with TensorBoard events and with --no-tb, and
    the seconds of importing tensorboard, once per process (before the runs, so it falls on neither)."""
    from vtn.bench.sweep import BENCH_SETS, bench_cache
    from vtn.cli import main

    tick = time.perf_counter()
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    imported = time.perf_counter() - tick

    cache = bench_cache(tmp / "cache")
    common = ["--model", "tiny", *(x for s in BENCH_SETS for x in ("--set", s)), "--set", f"optim.steps={steps}",
              "--quiet"]
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeats):
        for tb in (True, False):  # alternated, so a change in the machine's load falls on both
            tick = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                if main(["train", cache, "--out", str(tmp / f"run{i}{tb}"), *common, *([] if tb else ["--no-tb"])]):
                    raise RuntimeError("vtn train failed")
            times[tb].append(time.perf_counter() - tick)
    return min(times[True]), min(times[False]), imported


def latency(model, session, frames: int, repeats: int) -> tuple[float, float]:
    """Median ms of one video's logits at `frames` frames: PyTorch (fast backend, eager, no_grad) and the ONNX
    Runtime `session` of the same model (checked equal within 1e-4 first)."""
    import numpy as np
    import torch

    from vtn.temporal.export import example_inputs

    inputs = example_inputs(model, frames, batch=1)
    features, positions = inputs["features"], inputs.get("positions")
    feeds = {name: x.numpy() for name, x in inputs.items()}

    def timed(call) -> float:
        for _ in range(3):
            call()
        out = []
        for _ in range(repeats):
            tick = time.perf_counter()
            call()
            out.append(time.perf_counter() - tick)
        return statistics.median(out) * 1e3

    with torch.no_grad():
        expected = model(features, None, positions).numpy()
        np.testing.assert_allclose(session.run(None, feeds)[0], expected, atol=1e-4, rtol=0)
        torch_ms = timed(lambda: model(features, None, positions))
    return torch_ms, timed(lambda: session.run(None, feeds))


def bench(steps: int = 60, repeats: int = 3, size: str = "base") -> dict:
    """Prints and returns the figures: TensorBoard's overhead, then the latency at 16 and 288 frames of the encoder
    of `size` on 768-D features with 400 classes (base: the paper's vit_b_vtn, window 18), random weights."""
    import tempfile

    import onnxruntime as ort
    import torch

    from vtn.temporal.export import export_onnx
    from vtn.temporal.model import SIZES, VTN

    with tempfile.TemporaryDirectory() as tmp:
        with_tb, without, imported = tensorboard_overhead(Path(tmp), steps, repeats)
        print(f"vtn bench export: tiny vtn train, {steps} steps of 16 clips x 8 frames, 96 train / 32 val videos; "
              f"best of {repeats}: with TensorBoard {with_tb:.2f} s, --no-tb {without:.2f} s = {with_tb / without:.2f}x "
              f"(importing tensorboard, once per process: {imported:.2f} s)", flush=True)
        torch.manual_seed(0)
        model = VTN(replace(SIZES[size], feature_dim=768, num_classes=400)).eval()
        session = ort.InferenceSession(str(export_onnx(model, Path(tmp) / "vtn.onnx")),
                                       providers=["CPUExecutionProvider"])
        figures = {"tb_s": with_tb, "no_tb_s": without, "tb_import_s": imported}
        for frames in (16, 288):
            torch_ms, ort_ms = latency(model, session, frames, 20 * repeats)
            print(f"  {size} encoder + head (768-D features, 400 classes), 1 video x {frames} frames on the CPU ({torch.get_num_threads()} torch "
                  f"threads): PyTorch {torch_ms:.1f} ms, ONNX Runtime {ort_ms:.1f} ms = {ort_ms / torch_ms:.2f}x",
                  flush=True)
            figures.update({f"torch_ms_{frames}": torch_ms, f"ort_ms_{frames}": ort_ms})
    return figures
