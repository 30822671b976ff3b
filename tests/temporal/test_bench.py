"""`vtn bench temporal` runs end to end through the CLI (tiny sizes) and prints its tables."""

import numpy as np

from vtn.cli import main
from vtn.store import CacheWriter


def test_bench_temporal_cli(capsys, tmp_path):
    cache = str(tmp_path / "c.zarr")
    attrs = {"backbone": {"name": "resnet18", "preprocessing": {"input_size": [3, 32, 32]}}}
    with CacheWriter(cache, feature_dim=16, class_names=["a", "b"], attrs=attrs) as w:
        for v in range(8):
            w.add(f"v{v}.mp4", np.random.default_rng(v).standard_normal((20, 16)), np.arange(20) / 5, np.arange(20),
                  label=v % 2, split="train")
    argv = ["bench", "temporal", "--lengths", "8", "--hidden", "32", "--heads", "2", "--batch", "1",
            "--repeats", "1", "--threads", "1", "--device", "cpu", "--cache", cache]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cpu, batch 1 clips, hidden 32, 2 heads" in out
    rows = [line.split() for line in out.splitlines() if line.endswith(tuple("0123456789")) and "]" in line]
    assert [(r[-8], r[-7]) for r in rows] == [("8", "1"), ("8", "1")]  # T and batch, one row per window set
    assert "encoder + head from the cache" in out and "backbone resnet18 @32" in out
