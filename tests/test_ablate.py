"""`vtn ablate` on a few tiny generated videos: two tiny backbones, a two-config grid, two seeds, a one-step
fine-tuning. One ablation, killed in its sweep, re-run to the end and re-run once more, serves every test: the
re-runs redo nothing finished, and the report's cells are the runs' metrics.json."""

import json
import re
import statistics

import pytest

import vtn.temporal.sweep as sweep_job
from vtn import synth

BACKBONES = ["test_resnet", "test_vit"]
ENCODER = ["model.hidden_size=16", "model.num_heads=2", "model.intermediate_size=32", "model.attention_window=4",
           "model.dropout=0", "model.attention_dropout=0", "model.head_dropout=0", "data.clip_frames=4",
           "data.stride=1", "optim.batch_size=4", "run.threads=1"]
ARGS = [a for b in BACKBONES for a in ("--backbone", b)] + [
    "--random-init", "--image-size", "32", "--fps", "6", "--workers", "0", "--device", "cpu", "--quiet",
    "--grid", "model.num_layers=1,2", "--seeds", "2", "--steps", "2", "--finetune-steps", "1",
    "--finetune-set", "optim.batch_size=4", *(a for s in ENCODER for a in ("--set", s))]


def mtimes(folder, pattern):
    return {p: p.stat().st_mtime_ns for p in folder.glob(pattern)}


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """(the ablation folder, [stdout of each of the three commands], what each re-run left untouched)."""
    from tests.cli_runner import run_vtn

    root = tmp_path_factory.mktemp("ablate")
    synth.make_dataset(root / "videos", per_split={"train": 2, "val": 1}, seconds=(1.0, 1.5), seed=1)
    out = root / "out"
    units, real = [], sweep_job.train_unit

    def killed_at_the_second(*args, **kwargs):  # Ctrl-C while the sweep trains its second unit
        units.append(args[2])
        if len(units) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(sweep_job, "train_unit", killed_at_the_second)
    first = run_vtn("ablate", root / "videos", "--out", out, *ARGS, check_rc=130)
    mp.undo()
    before = {"caches": mtimes(out / "caches", "*.zarr/parts/**/*"), "runs": mtimes(out / "sweep", "*/metrics.json")}
    second = run_vtn("ablate", root / "videos", "--out", out, *ARGS, check_rc=0)
    after = {"caches": mtimes(out / "caches", "*.zarr/parts/**/*"), "runs": mtimes(out / "sweep", "*/metrics.json"),
             "finetune": mtimes(out / "finetune", "*/**/*"), "report": (out / "report.md").stat().st_mtime_ns}
    third = run_vtn("ablate", root / "videos", "--out", out, *ARGS, check_rc=0)
    return out, [first.stdout, second.stdout, third.stdout], before, after, [u[0].name for u in units]


@pytest.mark.slow
def test_a_rerun_after_a_kill_or_a_finished_run_redoes_nothing_finished(ablation):
    out, (first, second, third), before, after, killed = ablation
    # The kill: both caches extracted, the sweep's first unit (one cache's two batched seeds) trained.
    assert "1/4 extract done" in first and "12 videos stored" in first and "2/4 sweep done" not in first
    finished = {p.parent.name for p in before["runs"]}
    assert len(finished) == 2 and killed[1] not in finished
    # The re-run: no video extracted again, the finished runs skipped, the rest trained, every stage timed.
    assert "0 videos stored, 12 already in every cache" in second
    assert "vtn sweep: 8 runs in" in second and ": 2 finished, 6 to train" in second
    assert all(after["caches"][p] == t for p, t in before["caches"].items())  # the caches were not rewritten
    assert all(after["runs"][p] == t for p, t in before["runs"].items())
    assert "4 trained, 0 already finished" in second
    for n in range(1, 5):
        assert re.search(rf"vtn ablate: {n}/4 \w+: .*\n", second) and re.search(rf"{n}/4 \w+ done in \d+ s", second)
    # A finished ablation re-run: nothing trained or written again but the report.
    assert "0 videos stored" in third and ": 8 finished, 0 to train" in third and "0 trained, 4 already finished" in third
    assert mtimes(out / "caches", "*.zarr/parts/**/*") == after["caches"]
    assert mtimes(out / "sweep", "*/metrics.json") == after["runs"]
    assert mtimes(out / "finetune", "*/**/*") == after["finetune"]
    assert (out / "report.md").stat().st_mtime_ns > after["report"]


def cell(records: list[dict], key: str = "val_top1") -> str:
    values = [100 * r[key] for r in records]
    seconds = statistics.mean(r["train_seconds"] for r in records)
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} ({seconds:.0f} s)"


@pytest.mark.slow
def test_the_report_cells_are_the_runs_metrics(ablation):
    out = ablation[0]
    report = (out / "report.md").read_text()
    rows = {}
    for title, body in re.findall(r"^## (.+?)\n\n(.+?)\n\n!\[", report, flags=re.S | re.M):
        head, _, *lines = body.splitlines()
        assert head == "| | " + " | ".join(BACKBONES) + " |"
        for line in lines:
            name, *cells = [c.strip() for c in line.strip("|").split("|")]
            rows[(title, name)] = cells
        assert (out / ("report-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") + ".png")).read_bytes()[:4] \
            == b"\x89PNG"
    assert {t for t, _ in rows} == {"Backbone", "Depth", "Frozen vs fine-tuned"}

    def runs(backbone, layers, folder="sweep"):
        return [json.loads((out / folder / f"backbone-{backbone}_num_layers-{layers}_seed-{s}" / "metrics.json")
                           .read_text()) for s in (0, 1)]

    best = {}
    for i, b in enumerate(BACKBONES):
        for layers in (1, 2):
            assert rows[("Depth", f"num_layers {layers}")][i] == cell(runs(b, layers))
        best[b] = max((1, 2), key=lambda n: statistics.mean(r["val_top1"] for r in runs(b, n)))
        assert rows[("Backbone", "VTN, best config")][i] == cell(runs(b, best[b]))
        assert rows[("Frozen vs fine-tuned", "frozen backbone (stage two)")][i] == cell(runs(b, best[b]))
        tuned = runs(b, best[b], "finetune")
        assert rows[("Frozen vs fine-tuned", "fine-tuned end to end")][i] == cell(tuned)
        for t, s in zip(tuned, (0, 1)):  # the fine-tuning record is the run's best epoch
            epochs = (out / "finetune" / f"backbone-{b}_num_layers-{best[b]}_seed-{s}" / "metrics.jsonl").read_text()
            assert t["val_top1"] == max(json.loads(x)["val_top1"] for x in epochs.splitlines()) and t["steps"] == 1
    probes = [name for t, name in rows if name.startswith("probe:")]
    assert len(probes) == 3 and all(re.fullmatch(r"\d+\.\d \(\d+ s\)", c) for p in probes
                                    for c in rows[("Backbone", p)])


def test_usage_errors_are_refused_before_anything_runs(tmp_path, vtn):
    proc = vtn("ablate", tmp_path, "--out", tmp_path / "a", "--backbone", "resnet10t", "--grid", "optim.lrr=1",
               check_rc=2)
    assert "unknown config key 'optim.lrr'" in proc.stderr and not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    proc = vtn("ablate", tmp_path, "--out", tmp_path / "b", "--backbone", "resnet10t", check_rc=2)
    assert "is not a folder vtn ablate wrote" in proc.stderr
    proc = vtn("ablate", tmp_path, "--out", tmp_path / "c", "--backbone", "resnet10t", "--finetune-steps", "-1",
               check_rc=2)
    assert "--finetune-steps must be >= 0" in proc.stderr
