"""`vtn train` (and `vtn evaluate` on its run) through the CLI on small generated caches.

The caches hold "features whose class lies in temporal order": class 2k ramps from one vector to another,
class 2k + 1 is the same ramp reversed, so a video and its reversal have the same mean and only a model
that uses the frames' order separates them.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vtn.temporal.loop as loop_job
from vtn.cli import main
from vtn.store import CacheWriter

TINY = ["--set", "model.hidden_size=16", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
        "--set", "model.intermediate_size=32", "--set", "model.attention_window=4", "--frames", "8", "--stride", "2",
        "--batch-size", "16"]


def interrupt_at(monkeypatch, step: int):
    """Ctrl-C when the loop starts `step` (it asks for that step's learning rate first); returns the undo."""
    real = loop_job.lr_factor

    def interrupted(at, total, optim):
        if at == step:
            raise KeyboardInterrupt
        return real(at, total, optim)

    monkeypatch.setattr(loop_job, "lr_factor", interrupted)
    return lambda: monkeypatch.setattr(loop_job, "lr_factor", real)


def make_cache(path, dim=6, classes=2, per_class=None, seed=0, prefix="c"):
    """Videos of 8..16 frames (every 3rd source frame at 30 fps): a noisy ramp between two class vectors.
    `classes` must be even (each class has its time-reversed twin)."""
    per_class = per_class or {"train": 24, "val": 8}
    rng = np.random.default_rng(seed)
    w = CacheWriter(str(path), feature_dim=dim, class_names=[f"{prefix}{i}" for i in range(classes)], overwrite=True)
    basis = rng.normal(size=(classes, dim)) * 2
    for split, n in per_class.items():
        for c in range(classes):
            a, b = (c - c % 2, c - c % 2 + 1) if c % 2 == 0 else (c, c - 1)
            for i in range(n):
                t = int(rng.integers(8, 17))
                u = np.linspace(0, 1, t)[:, None]
                x = basis[a] * (1 - u) + basis[b] * u + 0.2 * rng.normal(size=(t, dim))
                idx = np.arange(t) * 3
                w.add(f"{split}/c{c}/{i:03d}", x, idx / 30.0, idx, label=c, split=split, fps=30.0)
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache") / "cache")


def records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_learns_order_and_evaluate_reproduces_its_val_figures(cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", cache, "--out", str(run), "--lr", "3e-3", "--set", "optim.min_steps=150",
                 "--set", "optim.patience=0", *TINY]) == 0
    recs = records(run)
    # 48 clips / 16 per step = 3 steps per epoch, so the step floor (150) decides the length of the run; of its
    # 50 short epochs every second one is evaluated (about 25 evaluations per run).
    assert [r["epoch"] for r in recs] == list(range(2, 51, 2)) and recs[-1]["step"] == 150
    assert {"train_loss", "val_top1", "val_top5", "val_mean_class_accuracy", "val_loss", "lr"} <= set(recs[0])
    best = max(recs, key=lambda r: (r["val_top1"], -r["val_loss"]))
    assert best["val_top1"] >= 0.85  # order learnt: a mean-pooling model is at 50 % here
    assert json.loads((run / "best" / "state.json").read_text())["epoch"] == best["epoch"]
    # config.yaml leaves what the cache decides unpinned (so it serves another cache); the checkpoint has it.
    assert "feature_dim: null" in (run / "config.yaml").read_text()
    assert json.loads((run / "best" / "config.json").read_text())["feature_dim"] == 6
    for name in ("config.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        assert (run / "last" / name).is_file()
    # The train split's normalisation travels inside the model's weights.
    weights = load_file(str(run / "best" / "model.safetensors"))
    assert weights["feature_scale"].shape == (6,) and not torch.equal(weights["feature_scale"], torch.ones(6))
    captured = capsys.readouterr()
    assert "best val top-1" in captured.out and "50 epochs, 150 steps" in captured.out
    # stderr is not a terminal (a job's log): the bar is drawn at start and end, not on every step or epoch.
    bar_lines = [line for line in captured.err.replace("\r", "\n").splitlines() if "step/s" in line or "/150" in line]
    assert 2 <= len(bar_lines) <= 3 and "150/150" in bar_lines[-1]

    assert main(["evaluate", str(run), "--cache", cache, "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["videos"] == 16
    assert m["top1"] == pytest.approx(best["val_top1"]) and m["loss"] == pytest.approx(best["val_loss"], abs=1e-5)
    assert m["top5"] == 1.0 and m["mean_class_accuracy"] == pytest.approx(best["val_mean_class_accuracy"])
    rows = (run / "predictions.csv").read_text().splitlines()
    assert rows[0] == "id,label,prediction,top5,probabilities" and len(rows) == 17


def test_resume_mid_epoch_ends_bitwise_equal_to_an_uninterrupted_run(cache, tmp_path, monkeypatch, capsys):
    # 3 steps per epoch, 7 epochs; checkpoints at every epoch end and at step 7 (mid-epoch 3).
    # mixed views with temporal-scale augmentation (data.speed's default): every draw replayed on resume
    args = [*TINY, "--steps", "21", "--set", "run.checkpoint_every=7", "--set", "data.sampling=mixed", "--quiet"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train", cache, "--out", str(whole), *args]) == 0

    undo = interrupt_at(monkeypatch, 8)
    assert main(["train", cache, "--out", str(parts), *args]) == 130
    assert "interrupted; the last checkpoint is kept; add --resume" in capsys.readouterr().err
    state = json.loads((parts / "last" / "state.json").read_text())
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (7, 2, 1)  # mid-epoch checkpoint
    undo()

    assert main(["train", cache, "--out", str(parts), *args]) == 2  # a run is there: --resume or another --out
    assert "--resume" in capsys.readouterr().err
    assert main(["train", cache, "--out", str(parts), *args, "--lr", "1e-2", "--resume"]) == 2  # another config
    assert "optim.lr" in capsys.readouterr().err
    assert main(["train", cache, "--out", str(parts), "--resume", "--quiet"]) == 0  # the saved config

    a, b = load_file(str(whole / "last" / "model.safetensors")), load_file(str(parts / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "elapsed"} for r in records(whole)]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed"} for r in records(parts)]


def test_the_default_length_stops_early_and_the_stop_resumes(cache, tmp_path, monkeypatch, capsys):
    # 3 steps per epoch, at most 100 epochs (min_steps 300), evaluated every epoch; stops once val top-1 has not
    # risen for 3 epochs. Interrupted mid-run and resumed, it stops at the same epoch with the same weights.
    args = [*TINY, "--lr", "3e-3", "--set", "optim.min_steps=300", "--set", "optim.patience=3",
            "--set", "run.eval_every=1", "--set", "data.sampling=mixed", "--quiet"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train", cache, "--out", str(whole), *args]) == 0
    out = capsys.readouterr().out
    assert "stops early once val top-1 has not improved for 3 epochs" in out and "mixed views" in out
    state = json.loads((whole / "last" / "state.json").read_text())
    recs = records(whole)
    top = max(r["val_top1"] for r in recs)
    first_top = next(r["epoch"] for r in recs if r["val_top1"] == top)
    assert state["stopped_at"] == recs[-1]["epoch"] == first_top + 3 < 100 and state["step"] == 3 * recs[-1]["epoch"]
    assert f"stopped early at epoch {state['stopped_at']} of 100" in out

    undo = interrupt_at(monkeypatch, 4)
    assert main(["train", cache, "--out", str(parts), *args]) == 130
    undo()
    assert main(["train", cache, "--out", str(parts), "--resume", "--quiet"]) == 0
    assert json.loads((parts / "last" / "state.json").read_text())["stopped_at"] == state["stopped_at"]
    a, b = load_file(str(whole / "last" / "model.safetensors")), load_file(str(parts / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a stopped run, resumed, has nothing left to do
    assert main(["train", cache, "--out", str(parts), "--resume", "--quiet"]) == 0
    assert json.loads((parts / "last" / "state.json").read_text())["step"] == state["step"]


def test_a_top1_within_guessing_noise_does_not_count_as_learning():
    from vtn.temporal.loop import chance, early_stop

    labels = np.repeat(np.arange(6), 4)  # 24 val videos of 6 classes
    assert chance(labels) == pytest.approx(1 / 6 + 2 * np.sqrt(5 / 36 / 24))  # 0.319
    assert chance(np.repeat(np.arange(6), 4000)) < 0.18 and chance(np.array([-1])) == 0.0
    state = {"patience": 3, "epochs": 100, "chance": chance(labels), "top1_best": None}
    for epoch, top1 in ((1, 0.25), (4, 0.25), (5, 0.5), (7, 0.5)):  # one video above chance is not progress
        early_stop(state, {"epoch": epoch, "val_top1": top1})
    assert state["top1_best"] == {"epoch": 5, "val_top1": 0.5} and "stopped_at" not in state
    early_stop(state, {"epoch": 8, "val_top1": 0.25})
    assert state["stopped_at"] == 8


def test_reference_recipe_bf16_streamed_with_a_loader_process(cache, tmp_path):
    run = tmp_path / "run"
    assert main(["train", cache, "--out", str(run), *TINY, "--recipe", "reference", "--amp", "bf16",
                 "--set", "data.load=stream", "--set", "data.workers=1", "--set", "optim.min_steps=3",
                 "--epochs", "1"]) == 0
    cfg = (run / "config.yaml").read_text()
    assert "optimizer: sgd" in cfg and "amp: bf16" in cfg and "load: stream" in cfg
    assert len(records(run)) == 1


def test_two_process_ddp_under_torchrun(cache, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vtn",
           "train", cache, "--out", str(run), *TINY, "--set", "optim.min_steps=4", "--epochs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    recs = records(run)  # rank 0 alone writes: one line per epoch
    # 48 clips in batches of 8 per process: 6 batches, 3 steps per process and epoch.
    assert [r["epoch"] for r in recs] == [1, 2] and recs[-1]["step"] == 6
    assert recs[-1]["val_top1"] is not None
    assert set(load_file(str(run / "last" / "rng.safetensors"))) == {"cpu.0", "cpu.1"}
    assert done.stdout.count("vtn train:") == 2  # one header and one summary, from rank 0


@pytest.mark.parametrize("setting, words", [
    ("model.feature_dim=99", ["99", "6 dimensions"]),
    ("model.num_classes=5", ["2 classes", "num_classes=5"]),
    ("data.val_split=test", ["'test'", "['train', 'val']"]),
    ("data.train_split=nope", ["'nope'"]),
    ("optim.lrr=1", ["unknown config key 'optim.lrr'"]),
])
def test_bad_config_or_mismatched_cache_is_refused_clearly(cache, tmp_path, capsys, setting, words):
    assert main(["train", cache, "--out", str(tmp_path / "run"), *TINY, "--set", setting]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    if "optim" not in setting:
        assert cache in err  # names the cache
    assert not (tmp_path / "run" / "last").exists()


def test_resume_refuses_another_cache(cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", cache, "--out", str(run), *TINY, "--set", "optim.min_steps=1", "--epochs", "1"]) == 0
    other = make_cache(tmp_path / "other", dim=5)
    assert main(["train", other, "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert other in err and "6 dimensions" in err and "this cache has 5" in err
    renamed = make_cache(tmp_path / "renamed", prefix="k")
    assert main(["train", renamed, "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert renamed in err and "['c0', 'c1']" in err and "['k0', 'k1']" in err


@pytest.mark.parametrize("flags, words", [
    (["--set", "optim.lr=-1"], ["optim.lr", "-1.0 is out of range", "> 0"]),
    (["--set", "data.clip_frames=0"], ["data.clip_frames", "0 is out of range", ">= 1"]),
    (["--frames", "0"], ["data.clip_frames (--frames)", "0 is out of range", ">= 1"]),
    (["--batch-size", "0"], ["optim.batch_size", "0 is out of range", ">= 1"]),
    (["--set", "model.dropout=2"], ["model.dropout", "2.0 is out of range", "[0, 1)"]),
    (["--set", "data.stride=0"], ["data.stride", "0 is out of range", ">= 1"]),
    (["--stride", "-3"], ["data.stride", "-3 is out of range", ">= 1"]),
    (["--set", "optim.weight_decay=-1"], ["optim.weight_decay", "-1.0 is out of range", ">= 0"]),
    (["--set", "model.attention_window=[8,0]"], ["model.attention_window", "(8, 0) is out of range", ">= 1"]),
])
def test_values_out_of_range_are_refused_naming_the_key_and_range(cache, tmp_path, capsys, flags, words):
    run = tmp_path / "run"
    assert main(["train", cache, "--out", str(run), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "out of range" in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()  # refused before anything


def small_cache(path, videos):
    """A cache of 6-D features from (id, split, label, features or None: random) rows."""
    rng = np.random.default_rng(1)
    with CacheWriter(str(path), feature_dim=6, class_names=["c0", "c1"]) as w:
        for vid, split, label, x in videos:
            x = rng.normal(size=(10, 6)) + label if x is None else x
            w.add(vid, x, np.arange(len(x)) / 10, np.arange(len(x)), label=label, split=split, fps=10.0)
    return str(path)


def labelled(split, n, prefix=None):
    return [(f"{prefix or split}/{c}/{i}", split, c, None) for c in range(2) for i in range(n)]


@pytest.mark.parametrize("load", ["memory", "stream"])
def test_a_nan_feature_in_the_train_split_is_refused_before_training_naming_the_video(tmp_path, capsys, load):
    import zarr

    from vtn.store import open_cache

    cache = small_cache(tmp_path / "c", [*labelled("train", 4), ("train/1/bad", "train", 1, None), *labelled("val", 2)])
    index = open_cache(cache).index  # the writer refuses NaN: put one on disk, as a missing chunk reads
    row = index["id"].tolist().index("train/1/bad")
    part = zarr.open_group(cache, mode="r+")[f"parts/{index['part'][row]}/features"]
    part[int(index["start"][row]) + 4, 2] = np.nan
    run = tmp_path / "run"
    assert main(["train", cache, "--out", str(run), *TINY, "--steps", "1", "--set", f"data.load={load}"]) == 2
    err = capsys.readouterr().err
    assert "'train/1/bad'" in err and "not finite" in err and cache in err and "Lower optim.lr" not in err
    assert not (run / "last").exists() and not (run / "metrics.jsonl").exists()


def test_normalisation_statistics_leave_out_the_held_out_videos(tmp_path):
    from safetensors.torch import load_file

    from vtn.store import open_cache

    # The held-out videos (no val split) are far from the others: including them would move the mean a lot.
    rows = [(f"train/{c}/{i}", "train", c, np.full((10, 6), 100.0 * (i == 9)) + np.arange(6) * i / 10)
            for c in range(2) for i in range(10)]
    cache = small_cache(tmp_path / "c", rows)
    run = tmp_path / "run"
    assert main(["train", cache, "--out", str(run), *TINY, "--steps", "1", "--quiet"]) == 0
    held = set(json.loads((run / "holdout.json").read_text())["ids"])
    assert held == {"train/0/9", "train/1/9"}  # the crc32 picks; the test relies on them being the far ones
    c = open_cache(cache)
    train = np.concatenate([c.features(v).astype(np.float64) for v in c.ids if v not in held])
    mean = load_file(str(run / "best" / "model.safetensors"))["feature_mean"].numpy()
    np.testing.assert_allclose(mean, train.mean(0), rtol=1e-5, atol=1e-5)


def test_an_unlabelled_val_split_is_refused_at_start_by_train_and_sweep(tmp_path, capsys):
    cache = small_cache(tmp_path / "c", [*labelled("train", 4), ("val/x", "val", -1, None), ("val/y", "val", -1, None)])
    assert main(["train", cache, "--out", str(tmp_path / "run"), *TINY, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "val split 'val' has no labelled videos (2 unlabelled)" in err and cache in err
    assert main(["sweep", cache, "--out", str(tmp_path / "sweep"), "--grid", "optim.lr=1e-3,1e-2", "--model", "tiny",
                 "--set", "optim.steps=1"]) == 2  # before any run trains (not a failed run, exit 3)
    assert "val split 'val' has no labelled videos" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_train_warns_with_the_count_of_videos_it_leaves_out_and_why(tmp_path, capsys):
    cache = small_cache(tmp_path / "c", [*labelled("train", 3), *labelled("val", 1), *labelled("Train", 1),
                                         ("tset/a", "tset", 0, None), ("train/u", "train", -1, None)])
    assert main(["train", cache, "--out", str(tmp_path / "run"), *TINY, "--steps", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert (f"warning: {cache}: 4 of its 12 videos are left out: 3 in splits it does not use ('Train': 2, 'tset': 1; "
            "it trains on 'train' and validates on 'val'") in err and "; 1 unlabelled in 'train'" in err, err


def test_resume_takes_the_same_cache_by_another_spelling_of_its_path(tmp_path, capsys, monkeypatch):
    from vtn.temporal.checkpoint import read_inputs

    monkeypatch.chdir(tmp_path)
    small_cache(tmp_path / "c.zarr", [*labelled("train", 4), *labelled("val", 1)])
    assert main(["train", "c.zarr", "--out", "run", *TINY, "--epochs", "1", "--quiet"]) == 0
    assert read_inputs(tmp_path / "run" / "best")["cache"] == str(tmp_path / "c.zarr")  # absolute, resolved
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", "../c.zarr", "--out", "../run", "--resume", "--quiet"]) == 0, capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["train", "./c.zarr", "--out", "run", "--resume", "--quiet"]) == 0, capsys.readouterr().err


def test_a_size_brings_its_learning_rate_and_weight_decay_unless_given():
    from vtn.cli import build_parser
    from vtn.config import job_config
    from vtn.temporal.settings import CHOICES, FLAGS, RECIPES, TrainConfig

    def optim(*argv):
        args = build_parser().parse_args(["train", "CACHE", "--out", "RUN", *argv])
        o = job_config(TrainConfig, args, FLAGS, **CHOICES).optim
        return o.lr, o.weight_decay

    default = (TrainConfig().optim.lr, TrainConfig().optim.weight_decay)
    assert optim("--model", "tiny") == (1e-3, 0.5) and optim() == optim("--model", "base") == default == (3e-4, 0.05)
    assert optim("--model", "tiny", "--lr", "3e-4") == (3e-4, 0.5)
    assert optim("--model", "tiny", "--set", "optim.lr=5e-4", "--set", "optim.weight_decay=0.05") == (5e-4, 0.05)
    # they go with the default recipe's AdamW: the reference recipe's SGD keeps its own
    reference = RECIPES["reference"].optim
    assert optim("--model", "tiny", "--recipe", "reference") == (reference.lr, reference.weight_decay) == (1e-3, 1e-4)


def test_model_auto_trains_tiny_below_a_thousand_train_videos_and_base_from_there(tmp_path, capsys, monkeypatch):
    """--model auto, vtn train's and sweep's default: tiny with its size settings when the train split holds fewer
    than SMALL_CACHE videos, else base; a named size wins, --set and flags apply over the size chosen, a bare
    --resume keeps the run's saved config, and the first log line says which size and why."""
    from vtn.cli import build_parser
    from vtn.store import open_cache
    from vtn.temporal import settings

    cache = small_cache(tmp_path / "c", [*labelled("train", 4), *labelled("val", 1)])  # 8 train videos

    def config(*argv):
        return settings.train_config(build_parser().parse_args(["train", cache, "--out", "RUN", *argv]),
                                     settings.FLAGS, [open_cache(cache)])

    cfg, why = config()
    assert cfg.model == settings.SIZES["tiny"] and (cfg.optim.lr, cfg.optim.weight_decay) == (1e-3, 0.5)
    assert why.startswith("tiny (--model auto: 8 train videos, fewer than 1000,") and config("--model", "auto") == (
        cfg, why)
    cfg, _ = config("--set", "model.num_layers=1", "--lr", "3e-4")
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.optim.lr, cfg.optim.weight_decay) == (128, 1, 3e-4, 0.5)
    assert config("--model", "base") == (settings.TrainConfig(), "") and config("--resume") == (None, "")
    monkeypatch.setattr(settings, "SMALL_CACHE", 8)
    assert config() == (settings.TrainConfig(), "base (--model auto: 8 train videos, at least 8)")
    monkeypatch.undo()

    assert main(["train", cache, "--out", str(tmp_path / "run"), *TINY, "--steps", "1", "--quiet"]) == 0
    assert "\n  encoder: tiny (--model auto: 8 train videos, fewer than 1000" in capsys.readouterr().out
    assert main(["sweep", cache, "--out", str(tmp_path / "sweep"), "--grid", "optim.lr=1e-3", "--set",
                 "optim.steps=1", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("vtn sweep: encoder tiny (--model auto: 8 train videos")


def test_model_sizes_and_recipes_are_registered_once():
    """`--model` and `--recipe` of vtn train, vtn sweep and vtn ablate offer the registries' names; the sizes are VTNConfigs,
    the paper's preset is base with 768-D features and 400 classes, and a config left "from the cache" says so
    when a model is built from it."""
    import argparse

    from vtn.cli import build_parser
    from vtn.config import ConfigError
    from vtn.temporal.model import PRESETS, SIZES, VTNConfig
    from vtn.temporal.settings import RECIPES, TrainConfig

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, auto in (("train", ["auto"]), ("sweep", ["auto"]), ("ablate", [])):
        options = {a.dest: a.choices for a in sub.choices[command]._actions}
        assert list(options["model"]) == [*auto, *SIZES] and list(options["recipe"]) == list(RECIPES)
    assert TrainConfig().model == SIZES["base"] == VTNConfig()
    # The paper's model: vtn's defaults without what reads long videos (README, "Long videos read whole")
    assert PRESETS["vit_b_vtn"] == VTNConfig(feature_dim=768, num_classes=400, temporal_conv=0, positions="index",
                                             view_stride=1, head_dropout=0.5)
    assert SIZES["tiny"].head_dropout == 0.5  # measured so on long videos; base's default is 0
    with pytest.raises(ConfigError, match="feature_dim and num_classes"):
        VTNConfig().check()



@pytest.mark.slow  # two processes importing torch: 50-130 s on the 2 loaded cores
def test_a_rank_failing_mid_training_ends_both_ranks_within_seconds_with_its_message(cache, tmp_path):
    from fail_proc import check_failed_together, fail_together

    check_failed_together(*fail_together(["train", cache, "--out", str(tmp_path / "run"), *TINY,
                                         "--set", "optim.min_steps=6", "--epochs", "2", "--quiet"], tmp_path))


def test_auto_sampling_follows_how_much_of_the_long_train_videos_a_dense_clip_spans():
    from vtn.temporal.settings import DataSection
    from vtn.temporal.splits import choose_sampling

    d = DataSection()  # a dense clip of 16 frames at stride 8 spans 121 frames
    assert choose_sampling(d, np.full(50, 100))[0] == "dense"  # every video within one clip
    assert choose_sampling(d, np.r_[np.full(42, 100), np.full(8, 1500)])[0] == "uniform"  # the long tenth: 8 %
    mode, why = choose_sampling(d, np.full(50, 200))  # 121 / 200
    assert mode == "mixed" and "60%" in why and "90th percentile: 200" in why
    assert choose_sampling(DataSection(sampling="dense"), np.full(50, 1500))[0] == "dense"  # as set
    with pytest.raises(Exception, match="data.speed"):
        choose_sampling(DataSection(speed=(2.0, 0.5)), np.full(5, 10))


def test_whole_videos_are_read_as_far_apart_as_the_training_views_frames():
    from vtn.temporal.settings import DataSection
    from vtn.temporal.splits import view_stride

    d = DataSection()  # dense clips of 16 frames at stride 8; uniform views of 64 segments
    assert view_stride(d, "dense", np.full(9, 500)) == 8
    assert view_stride(d, "dense", np.full(9, 61)) == 4  # a clip of a 61-frame video: 16 frames 4 apart
    assert view_stride(d, "uniform", np.full(9, 640)) == 10 and view_stride(d, "uniform", np.full(9, 30)) == 1
    assert view_stride(d, "mixed", np.full(9, 640)) == 9  # half 8, half 10
    assert view_stride(d, "dense", np.r_[np.full(5, 500), np.full(4, 20)]) == 8  # the median video's
