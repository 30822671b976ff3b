"""`vtn demo` through the CLI: the whole pipeline, and the result it exists to show."""

import re

import pytest

from vtn.cli import main


@pytest.mark.slow
def test_demo_vtn_learns_order_that_mean_pooling_cannot(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    vtn = float(re.search(r"VTN \(order-aware\)\s+val top-1\s+([\d.]+)%", out).group(1))
    baseline = float(re.search(r"logistic\s+val top-1\s+([\d.]+)%", out).group(1))
    assert vtn >= 90.0, out
    assert baseline <= 45.0, out  # order-blind: every class shows the same frames, chance is 25 %
    assert (tmp_path / "run" / "predictions.csv").is_file() and (tmp_path / "cache" / "zarr.json").is_file()
