"""`vtn bench temporal` runs end to end through the CLI (tiny sizes) and prints its table."""

from vtn.cli import main


def test_bench_temporal_cli(capsys):
    argv = ["bench", "temporal", "--lengths", "8", "--hidden", "32", "--heads", "2", "--batch", "1",
            "--repeats", "1", "--threads", "1", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cpu, batch 1, hidden 32, 2 heads" in out
    rows = [line.split() for line in out.splitlines() if line.endswith(tuple("0123456789")) and "]" in line]
    assert [r[-7] for r in rows] == ["8", "8"]  # T column, one row per window set
