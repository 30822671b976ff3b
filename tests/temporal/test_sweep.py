"""`vtn sweep`, batched runs and `vtn probe` on the small generated caches of test_train (classes in frame order)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import make_cache, records

import vtn.temporal.loop as loop_job
from vtn.cli import main
from vtn.config import resolve
from vtn.store import open_cache
from vtn.temporal.sweep import ablations, expand, parse_grid, variants_of
from vtn.temporal.settings import TrainConfig

# A tiny encoder without dropout (so lr/seed runs are batched), 3 steps per epoch on the 48 train clips.
SMALL = ["model.hidden_size=16", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=32",
         "model.attention_window=4", "data.clip_frames=8", "data.stride=2", "optim.batch_size=16",
         "model.dropout=0", "model.attention_dropout=0", "model.head_dropout=0"]
SETS = [x for s in SMALL for x in ("--set", s)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache") / "cache")


def test_grid_expands_to_the_product_of_its_values_with_list_values_and_seeds():
    base = resolve(TrainConfig, sets=SMALL)
    grids = parse_grid(["optim.lr=1e-3,3e-4", "model.attention_window=[2,4],6"], base)
    assert grids == [("optim.lr", [1e-3, 3e-4]), ("model.attention_window", [[2, 4], 6])]
    runs = expand(base, variants_of(grids, zipped=False), seeds=2)
    assert [r.name for r in runs[:3]] == ["lr-0.001_attention_window-2-4_seed-0",
                                          "lr-0.001_attention_window-2-4_seed-1", "lr-0.001_attention_window-6_seed-0"]
    assert len(runs) == 8
    assert {(r.cfg.optim.lr, r.cfg.model.attention_window, r.cfg.run.seed) for r in runs} == {
        (lr, w, s) for lr in (1e-3, 3e-4) for w in ((2, 4), 6) for s in (0, 1)}
    assert all(r.cfg.model.hidden_size == 16 for r in runs)  # the base's --set values stay
    zipped = expand(base, variants_of(parse_grid(["optim.lr=1e-3,3e-4", "run.seed=5,6"], base), zipped=True), 1)
    assert [(r.cfg.optim.lr, r.cfg.run.seed) for r in zipped] == [(1e-3, 5), (3e-4, 6)]
    # The paper's ablations: one factor at a time from the base, the base first.
    variants = ablations(resolve(TrainConfig))
    assert variants[0] == {} and {"model.num_layers": 6, "model.attention_window": 18} in variants
    assert {"model.attention_window": [8, 16, 32]} in variants and {"model.positions": "none"} in variants
    assert {"data.clip_frames": 32} in variants and {"data.stride": 4} in variants


def test_the_results_table_by_hand(tmp_path, capsys):
    from vtn.temporal.results import table, write_results

    base = resolve(TrainConfig, sets=SMALL)
    runs = expand(base, variants_of(parse_grid(["optim.lr=1e-3,3e-3"], base), zipped=False), seeds=2)
    results = [{"val_top1": t, "val_top5": 1.0, "val_mean_class_accuracy": t / 2, "parameters": 99,
                "train_seconds": 2.0 + i, "diverged_at_step": 3 if i == 3 else None}
               for i, t in enumerate((0.5, 0.7, 0.25, 0.25))]
    rows = table(runs, results)
    assert [r["run"] for r in rows] == ["lr-0.001", "lr-0.003"] and [r["optim.lr"] for r in rows] == [1e-3, 3e-3]
    assert rows[0]["val_top1_mean"] == pytest.approx(0.6) and rows[0]["val_top1_std"] == pytest.approx(0.1 * 2 ** 0.5)
    assert rows[1]["val_mean_class_accuracy_std"] == 0.0 and rows[1]["train_seconds"] == 4.5
    assert [r["diverged"] for r in rows] == [0, 1] and rows[0]["seeds"] == 2
    probe = {"run": "probe: mean", "seeds": 1, "parameters": 5, "train_seconds": 0.1,
             **{f"val_{k}_{s}": 0.3 for k in ("top1", "top5", "mean_class_accuracy") for s in ("mean", "std")}}
    write_results([*rows, probe], tmp_path, ["optim.lr"], base=base)
    assert (tmp_path / "results.csv").read_text().splitlines()[0] == (
        "run,optim.lr,seeds,val_top1_mean,val_top1_std,val_top5_mean,val_top5_std,val_mean_class_accuracy_mean,"
        "val_mean_class_accuracy_std,parameters,train_seconds,diverged")
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0] == "| run | optim.lr | seeds | top-1 | top-5 | mean class | parameters | train s |"
    assert md[2] == "| lr-0.001 | 0.001 | 2 | 60.0 ± 14.1 | 100.0 ± 0.0 | 30.0 ± 7.1 | 99 | 2.5 |"
    assert md[3].startswith("| lr-0.003 (diverged: 1 of 2) |") and md[4].startswith("| probe: mean |  | 1 | 30.0 ± 30.0")
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out.startswith("| run | optim.lr |")


@pytest.mark.parametrize("grid, named", [
    ("optim.lrr=1e-3,3e-4", "unknown config key 'optim.lrr'"),
    ("optim.lr=1e-3,fast", "optim.lr: expected a number, got 'fast'"),
    ("model.positions=index,frames", "model.positions: 'frames' is not one of"),
    ("model.attention_window=[2,4],4", "attention_window has 2 values for 1 layers"),
])
def test_a_bad_grid_is_refused_naming_it_before_anything_runs(cache, tmp_path, capsys, grid, named):
    out = tmp_path / "sweep"
    assert main(["sweep", cache, "--out", str(out), "--grid", grid, *SETS, "--quiet"]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_batched_members_equal_their_separate_runs_and_the_table_equals_metrics_json(cache, tmp_path, capsys):
    out = tmp_path / "sweep"
    # Batches of 10 (the 5th of 8) and clips of up to 12 frames (videos have 8..16): members' batches differ in
    # size and length at some steps, so the batched pass pads them.
    argv = ["sweep", cache, "--out", str(out), "--grid", "optim.lr=1e-3,3e-3", "--seeds", "2", *SETS,
            "--set", "optim.batch_size=10", "--set", "data.clip_frames=12", "--set", "data.stride=1",
            "--set", "optim.steps=6", "--quiet"]
    assert main(argv) == 0
    assert "4 to train in 1 unit(s) (1 batched)" in capsys.readouterr().out
    results = {d.name: json.loads((d / "metrics.json").read_text()) for d in out.iterdir() if d.is_dir()}
    assert sorted(results) == ["lr-0.001_seed-0", "lr-0.001_seed-1", "lr-0.003_seed-0", "lr-0.003_seed-1"]
    assert all(r["batched"] == 4 for r in results.values())
    # Members that differ in seed and in lr each equal a separate `vtn train` run of the same config.
    for name in ("lr-0.001_seed-0", "lr-0.003_seed-1"):
        alone = tmp_path / name
        assert main(["train", cache, "--out", str(alone), "--config", str(out / name / "config.yaml"), "--quiet"]) == 0
        mine, theirs = load_file(str(out / name / "last" / "model.safetensors")), load_file(str(alone / "last" / "model.safetensors"))
        for k in theirs:
            torch.testing.assert_close(mine[k], theirs[k], atol=1e-5, rtol=1e-4, msg=f"{name} {k}")
        for a, b in zip(records(out / name), records(alone), strict=True):
            assert a["step"] == b["step"] and a["val_top1"] == b["val_top1"]
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    lr_1, lr_3 = (load_file(str(out / f"lr-{lr}_seed-0" / "last" / "model.safetensors")) for lr in ("0.001", "0.003"))
    assert not torch.allclose(lr_1["head.4.weight"], lr_3["head.4.weight"])  # the members did differ
    # The table: mean and sample std over the seeds of each run's metrics.json.
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["run"] for r in rows] == ["lr-0.001", "lr-0.003"]
    for row in rows:
        mine = [results[f"{row['run']}_seed-{s}"] for s in (0, 1)]
        for metric in ("val_top1", "val_top5", "val_mean_class_accuracy"):
            values = [m[metric] for m in mine]
            assert float(row[f"{metric}_mean"]) == pytest.approx(np.mean(values))
            assert float(row[f"{metric}_std"]) == pytest.approx(np.std(values, ddof=1))
        assert int(row["parameters"]) == mine[0]["parameters"] == sum(
            t.numel() for k, t in load_file(str(out / f"{row['run']}_seed-0" / "best" / "model.safetensors")).items()
            if not k.startswith("feature_"))
    assert "| lr-0.001 | 0.001 | 2 |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rerun_skips_finished_runs_and_resumes_an_interrupted_one(cache, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["sweep", cache, "--out", str(out), "--grid", "optim.lr=1e-3,3e-3", *SETS, "--set", "optim.steps=6",
            "--set", "run.checkpoint_every=2", "--no-batch", "--quiet"]
    checkpointed = loop_job.step_checkpoint

    def interrupted(loop, every):  # the second run stops after its checkpoint at step 4
        checkpointed(loop, every)
        if loop.dir.name == "lr-0.003_seed-0" and loop.state["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_job, "step_checkpoint", interrupted)
    assert main(argv) == 130
    first = out / "lr-0.001_seed-0" / "metrics.json"
    done = first.read_text()
    assert not (out / "lr-0.003_seed-0" / "metrics.json").exists()
    assert json.loads((out / "lr-0.003_seed-0" / "last" / "state.json").read_text())["step"] == 4
    monkeypatch.setattr(loop_job, "step_checkpoint", checkpointed)
    capsys.readouterr()

    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 finished, 1 to train in 1 unit(s) (0 batched: --no-batch)" in printed and "resuming at step 4" in printed
    assert first.read_text() == done  # not trained again
    assert [(r["epoch"], r["step"]) for r in records(out / "lr-0.003_seed-0")] == [(1, 3), (2, 6)]
    # A third run finds both finished and trains nothing.
    assert main(argv) == 0
    assert "2 finished, 0 to train" in capsys.readouterr().out


def test_a_failing_run_is_reported_and_the_others_finish(cache, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["sweep", cache, "--out", str(out), "--grid", "optim.lr=1e-3,3e-3", *SETS, "--set", "optim.steps=3",
            "--no-batch", "--quiet"]
    real_train = loop_job.fit

    def failing(cache_url, run, *args, **kw):  # the first run fails part-way (a bug, a lost disk ...)
        if Path(run).name == "lr-0.001_seed-0":
            raise RuntimeError("the disk went away")
        return real_train(cache_url, run, *args, **kw)

    monkeypatch.setattr(loop_job, "fit", failing)
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "run lr-0.001_seed-0 failed: RuntimeError: the disk went away" in err
    assert "1 of 2 runs failed" in err
    assert "== lr-0.001_seed-0\nTraceback" in (out / "failures.log").read_text()
    assert (out / "lr-0.003_seed-0" / "metrics.json").is_file()  # the run after the failed one trained
    assert [r["run"] for r in csv.DictReader((out / "results.csv").open())] == ["lr-0.003"]

    monkeypatch.setattr(loop_job, "fit", real_train)
    assert main(argv) == 0
    assert "1 finished, 1 to train" in capsys.readouterr().out
    assert not (out / "failures.log").exists()
    assert [r["run"] for r in csv.DictReader((out / "results.csv").open())] == ["lr-0.001", "lr-0.003"]


def test_batched_runs_out_of_memory_together_train_one_by_one(cache, tmp_path, capsys, monkeypatch):
    import vtn.temporal.batched as batched

    def out_of_memory(*args, **kw):
        raise torch.OutOfMemoryError("out of memory (as a GPU says it)")

    monkeypatch.setattr(batched, "train_batched", out_of_memory)
    out = tmp_path / "sweep"
    assert main(["sweep", cache, "--out", str(out), "--grid", "optim.lr=1e-3,3e-3", *SETS, "--set",
                 "optim.steps=3", "--quiet"]) == 0
    assert "2 batched runs ran out of memory together; training them one by one" in capsys.readouterr().out
    for name in ("lr-0.001_seed-0", "lr-0.003_seed-0"):
        assert json.loads((out / name / "metrics.json").read_text())["batched"] == 1


def test_a_diverged_run_is_named_in_the_table_and_warned_about_batched_or_alone(cache, tmp_path, capsys):
    out = tmp_path / "sweep"
    steps = [*SETS, "--set", "optim.steps=6", "--quiet"]
    assert main(["sweep", cache, "--out", str(out), "--grid", "optim.lr=1e-3,1e9", *steps]) == 0
    printed = capsys.readouterr()
    diverged = json.loads((out / "lr-1e+09_seed-0" / "metrics.json").read_text())["diverged_at_step"]
    assert isinstance(diverged, int) and 1 <= diverged <= 6
    assert json.loads((out / "lr-0.001_seed-0" / "metrics.json").read_text())["diverged_at_step"] is None
    assert f"run lr-1e+09_seed-0 diverged (its train loss became NaN or infinite at step {diverged})" in printed.err
    assert "| lr-1e+09 (diverged: 1 of 1) |" in printed.out and "| lr-0.001 |" in printed.out
    assert [r["diverged"] for r in csv.DictReader((out / "results.csv").open())] == ["0", "1"]
    # The same run on its own diverges at the same step and says so.
    assert main(["train", cache, "--out", str(tmp_path / "alone"), "--set", "optim.lr=1e9", *steps]) == 0
    assert f"the train loss became NaN or infinite at step {diverged}: the run diverged" in capsys.readouterr().err


def test_probes_equal_scikit_learn_called_directly(cache, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    assert main(["probe", cache, "--out", str(tmp_path)]) == 0
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "probes.csv").open())}

    c = open_cache(cache)
    def videos(split):
        ids = c.split_ids(split)
        return [c.video(v).features.astype(np.float64) for v in ids], np.array([c.video(v).label for v in ids])
    (train, y), (val, y_val) = videos("train"), videos("val")

    def top1(model, x, x_val):
        return np.mean(model.fit(x, y_fit).predict(x_val) == y_val)

    y_fit = y
    mean = top1(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                np.stack([f.mean(0) for f in train]), np.stack([f.mean(0) for f in val]))
    pooled = lambda fs: np.stack([np.concatenate([f.mean(0), f.max(0)]) for f in fs])  # noqa: E731
    mlp = top1(make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(256,), max_iter=500, random_state=0)),
               pooled(train), pooled(val))
    picks = [np.unique(np.linspace(0, len(f) - 1, min(len(f), 8)).round().astype(int)) for f in train]
    y_fit = np.concatenate([np.full(len(p), label) for p, label in zip(picks, y)])
    frame = top1(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                 np.concatenate([f[p] for f, p in zip(train, picks)]), np.stack([f[len(f) // 2] for f in val]))
    assert float(rows["probe: logistic regression (mean pooling)"]["val_top1_mean"]) == pytest.approx(mean)
    assert float(rows["probe: MLP (mean + max pooling)"]["val_top1_mean"]) == pytest.approx(mlp)
    assert float(rows["probe: single frame (logistic regression)"]["val_top1_mean"]) == pytest.approx(frame)
    assert mean <= 0.75  # a video and its reversal have one mean: order-blind probes cannot separate them


@pytest.mark.slow
def test_sweep_probes_are_vtn_probes_rows_in_its_table(cache, tmp_path):
    out, probes = tmp_path / "sweep", tmp_path / "probes"
    assert main(["sweep", cache, "--out", str(out), "--grid", "optim.lr=1e-3", *SETS, "--set", "optim.steps=3",
                 "--probes", "--quiet"]) == 0
    assert main(["probe", cache, "--out", str(probes), *SETS]) == 0
    swept = [r for r in csv.DictReader((out / "results.csv").open()) if r["run"].startswith("probe: ")]
    alone = list(csv.DictReader((probes / "probes.csv").open()))
    assert len(swept) == 3 and [r["run"] for r in swept] == [r["run"] for r in alone]
    for a, b in zip(swept, alone):
        assert {k: a[k] for k in a if k.startswith("val_")} == {k: b[k] for k in b if k.startswith("val_")}
    assert (out / "results.png").is_file()


@pytest.mark.parametrize("positions, feature_dim, T", [("index", 32, 8), ("time", 16, 70), ("none", 32, 40)])
def test_members_forward_equals_each_members_own_forward(positions, feature_dim, T):
    """The batched pass computes VTN.forward of every member: dense and blocked (T > 2 blocks) attention,
    padded frames, each positions mode, with and without input_proj (feature_dim = hidden_size)."""
    from vtn.temporal.batched import members_forward, stacked
    from vtn.temporal.model import VTN, VTNConfig

    torch.manual_seed(0)
    cfg = VTNConfig(feature_dim=feature_dim, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                    attention_window=(4, 8), positions=positions, dropout=0, attention_dropout=0, head_dropout=0,
                    num_classes=4)
    models = [VTN(cfg) for _ in range(3)]
    for m in models:
        m.set_feature_stats(torch.randn(feature_dim), torch.rand(feature_dim) + 0.5)
    x = torch.randn(3, 5, T, feature_dim)
    mask = torch.ones(3, 5, T, dtype=torch.bool)
    mask[:, 1, T // 2:] = False
    mask[2, 3, 3:] = False
    p = None if positions == "none" else torch.randint(0, 200, (3, 5, T)).sort(-1).values
    logits = members_forward(models[0], stacked(models), x, mask, p)
    assert logits.shape == (3, 5, 4)
    for i, m in enumerate(models):
        torch.testing.assert_close(logits[i], m(x[i], mask[i], None if p is None else p[i]))
    logits.sum().backward()  # the gradient reaches each member's own parameters
    assert all(m.head[4].weight.grad is not None for m in models)


def test_a_sweep_over_two_caches_of_different_feature_sizes_writes_one_table(cache, tmp_path, capsys):
    wide = make_cache(tmp_path / "caches" / "wide.zarr", dim=10, seed=1)  # beside the module's 6-dim cache
    narrow = tmp_path / "caches" / "narrow.zarr"
    narrow.symlink_to(cache)
    out = tmp_path / "sweep"
    common = ["--out", str(out), "--grid", "optim.lr=1e-3,3e-3", *SETS, "--set", "optim.steps=3", "--quiet"]
    assert main(["sweep", "--grid", f"cache={narrow},{wide}", *common]) == 0
    # The lr runs batch together within a cache, never across caches.
    assert "4 to train in 2 unit(s) (2 batched)" in capsys.readouterr().out
    results = {d.name: json.loads((d / "metrics.json").read_text()) for d in out.iterdir() if d.is_dir()}
    assert sorted(results) == [f"backbone-{b}_lr-{lr}_seed-0" for b in ("narrow", "wide") for lr in ("0.001", "0.003")]
    assert all(r["batched"] == 2 for r in results.values())
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["run"], r["backbone"], r["optim.lr"]) for r in rows] == [
        ("backbone-narrow_lr-0.001", "narrow", "0.001"), ("backbone-narrow_lr-0.003", "narrow", "0.003"),
        ("backbone-wide_lr-0.001", "wide", "0.001"), ("backbone-wide_lr-0.003", "wide", "0.003")]
    for row in rows:  # each row is its run's metrics.json; the models took their cache's feature size
        mine = results[f"{row['run']}_seed-0"]
        assert float(row["val_top1_mean"]) == pytest.approx(mine["val_top1"])
        assert int(row["parameters"]) == mine["parameters"]
    assert int(rows[2]["parameters"]) - int(rows[0]["parameters"]) == 4 * 16  # the input projection: 4 more dims
    assert "| backbone-wide_lr-0.003 | wide | 0.003 | 1 |" in (out / "results.md").read_text()
    # --cache-glob names the same caches: the same runs, all finished.
    assert main(["sweep", "--cache-glob", str(tmp_path / "caches" / "*.zarr"), *common]) == 0
    assert "4 finished, 0 to train" in capsys.readouterr().out
    # One way to name the caches, and each must be one.
    assert main(["sweep", cache, "--grid", f"cache={wide}", *common]) == 2
    assert "give the caches one way" in capsys.readouterr().err
    assert main(["sweep", "--grid", f"cache={wide},{tmp_path}", *common]) == 2
    assert f"{tmp_path}: not a vtn feature cache" in capsys.readouterr().err
