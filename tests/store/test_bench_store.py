"""`vtn bench store --kinetics`: a tiny Kinetics-shaped cache, every figure printed as a positive number (values
are machine-dependent and not asserted)."""

import re

FIGURES = ("write", "open + index", "index memory", "files", "load_split train", "clips/s from memory",
           "clips/s streamed", "verify", "open descriptors at peak")


def test_bench_store_kinetics_prints_every_figure_measured_and_at_full_size(tmp_path, vtn):
    proc = vtn("bench", "store", "--kinetics", "0.0002", "--batches", "2", "--path", str(tmp_path / "k.zarr"))
    assert proc.returncode == 0, proc.stderr
    assert "48 videos x 250 frames x D=768" in proc.stdout  # 0.0002 of 240,000
    for name in FIGURES:
        (line,) = [x[len(name):] for x in proc.stdout.splitlines() if x.startswith(name + "  ")]
        numbers = [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", line)]
        assert len(numbers) >= 2 and numbers[0] > 0, (name, line)  # measured, and extrapolated to 240,000 videos


def test_bench_store_kinetics_refuses_a_share_outside_0_1(vtn):
    proc = vtn("bench", "store", "--kinetics", "16")
    assert proc.returncode == 2 and "'16' is not a share of the videos in (0, 1]" in proc.stderr
    assert vtn("bench", "store", "--kinetics", "1/0").returncode == 2


def test_bench_store_prints_streamed_against_memory_clips(vtn):
    """Both rates of the loader alone, and of the base model trained on what each feeds it, with their ratio."""
    proc = vtn("bench", "store", "--videos", "200", "--reads", "20", "--batches", "2")
    assert proc.returncode == 0, proc.stderr
    for name in ("loader alone", "base model trained"):
        (line,) = [x for x in proc.stdout.splitlines() if x.startswith(f"clips/s streamed, {name}")]
        assert re.search(r"[\d,.]+ \(\d+ workers, 2 batches\) +[\d,.]+ from memory +\d+\.\d\dx", line), line
