"""`vtn bench extract` runs and prints every figure (values are machine-dependent and not asserted)."""

import pytest


@pytest.mark.slow
def test_bench_extract_prints_all_figures(tmp_path, vtn):
    proc = vtn("bench", "extract", "--videos", "4", "--batch-size", "8", "--image-size", "64", "--long-seconds", "4",
               "--workdir", tmp_path, check_rc=0, timeout=400)
    for line in ("decode only", "model only", "pipeline", "sequential loop", "peak memory"):
        assert line in proc.stdout
