"""Stage two on the caches users really have: long videos, no val split, other backbones, explicit lengths,
named model sizes, unlabelled videos to score, several processes."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import TINY, make_cache, records

from vtn.cli import main
from vtn.config import merge
from vtn.runtime import Processes
from vtn.store import CacheWriter, collate_clips, open_cache
from vtn.temporal.data import model_inputs
from vtn.temporal.model import VTN, VTNConfig, frame_positions
from vtn.temporal.settings import TrainConfig, model_config
from vtn.temporal.splits import load_data

BACKBONE = {"name": "vit_tiny_patch16_224", "weights_sha256": "aa11", "preprocessing": {"input_size": [64, 64]}}
SAMPLING = {"mode": "every", "every": 1, "max_seconds": None}


def long_cache(path, lengths=(20, 3000), backbone=BACKBONE):
    """Both classes in train and val, a video of each length; every source frame at 25 fps."""
    rng = np.random.default_rng(0)
    with CacheWriter(str(path), feature_dim=4, class_names=["a", "b"], attrs={"backbone": backbone, "sampling": SAMPLING}) as w:
        for split in ("train", "val"):
            for c in range(2):
                for n in lengths:
                    idx = np.arange(n)
                    w.add(f"{split}/{c}/{n}.mp4", rng.normal(size=(n, 4)), idx / 25, idx, label=c, split=split, fps=25.0)
    return str(path)


def test_positions_count_from_the_view_and_spread_a_long_view_over_the_table():
    cfg = VTNConfig(feature_dim=4, num_classes=1, positions="index")  # max_positions 288
    assert frame_positions(cfg, torch.tensor([[1200, 1208, 1216]])).tolist() == [[0, 8, 16]]  # late clip: rows 0..
    long = torch.arange(0, 3000, 15)[None]  # 200 frames over 2985 source frames: more than 288 positions
    p = frame_positions(cfg, long)[0]
    assert p[0] == 0 and p[-1] == 287 and bool((p.diff() >= 1).all())
    # Distinct even where the spacing is irregular; padding gets 0; "time" counts seconds x rate.
    mask = torch.tensor([[True] * 4 + [False]])
    dense = torch.tensor([[0, 5000, 5001, 9000, 0]])
    assert frame_positions(cfg, dense, mask=mask).tolist() == [[0, 159, 160, 287, 0]]  # 5001 also rounds to 159: moved on
    timed = VTNConfig(feature_dim=4, num_classes=1, positions="time", position_rate=2.0)
    assert frame_positions(timed, timestamps=torch.tensor([[60.0, 60.5, 61.0]])).tolist() == [[0, 1, 2]]


def test_videos_of_20_and_3000_frames_train_on_full_clips_and_evaluate_over_their_whole_length(tmp_path, capsys):
    cache = long_cache(tmp_path / "cache")
    # The paper's clips, as they are, and its evaluation: every frame of a whole video, up to the table.
    cfg = merge(TrainConfig(), {"data": {"sampling": "dense", "speed": [1.0, 1.0]},
                                "model": {"view_stride": 1, "positions": "index"}})
    model_cfg = model_config(cfg, open_cache(cache))
    data = load_data(open_cache(cache), cfg, model_cfg, Processes())
    for epoch in range(5):  # training clips from anywhere in the long video: every frame real, inside the table
        data.train.set_epoch(epoch)
        batch = collate_clips([data.train[i] for i in range(len(data.train))])
        _, mask, positions = model_inputs(batch, model_cfg, torch.device("cpu"))
        assert mask.sum(1).tolist() == [min(n, 16) for n in data.train.lengths]
        assert int(positions.max()) < model_cfg.max_positions
    for i in range(len(data.val)):  # whole videos: thinned to the table, first to last frame
        item, n = data.val[i], int(data.val.lengths[i])
        assert item["positions"][0] == 0 and item["positions"][-1] == n - 1 and len(item["positions"]) == min(n, 288)
        _, mask, positions = model_inputs(collate_clips([item]), model_cfg, torch.device("cpu"))
        assert bool(mask.all()) and positions[0, -1] == min(n, 288) - 1 and bool((positions.diff() >= 1).all())
    # A position means the same in training and evaluation: a training clip of the 3000-frame video (16 frames
    # 8 apart) is scaled as the whole video is (287 / 2999 positions per source frame), so its frames are
    # 8 x 287 / 2999 < 1, so 1, position apart: as in the whole-video view, not 8 apart.
    clip = next(data.train[i] for i in range(len(data.train)) if data.train.lengths[i] == 3000)
    _, _, positions = model_inputs(collate_clips([clip]), model_cfg, torch.device("cpu"))
    assert positions[0].tolist() == list(range(16))

    run = tmp_path / "run"
    assert main(["train", cache, "--out", str(run), "--model", "tiny", "--steps", "2", "--batch-size", "4", "--quiet"]) == 0
    assert main(["evaluate", str(run), "--cache", cache, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["videos"] == 4



def test_stage_two_reads_whole_videos_at_its_views_spacing_and_saves_it(tmp_path, capsys):
    # Stage two sets it (and says so), validates with it, and saves it for evaluation and prediction; a value set
    # with --set is kept.
    url = long_cache(tmp_path / "cache", lengths=(200, 240))
    run = tmp_path / "run"
    assert main(["train", url, "--out", str(run), "--model", "tiny", "--steps", "2", "--batch-size", "4",
                 "--set", "data.sampling=dense"]) == 0
    assert "whole videos read one cached frame in 8" in capsys.readouterr().out
    assert VTN.from_pretrained(run / "best").config.view_stride == 8
    assert main(["evaluate", str(run), "--cache", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["frames_through_backbone"] == 2 * (25 + 30)
    assert main(["train", url, "--out", str(tmp_path / "run2"), "--model", "tiny", "--steps", "2", "--batch-size",
                 "4", "--quiet", "--set", "data.sampling=dense", "--set", "model.view_stride=1"]) == 0
    assert VTN.from_pretrained(tmp_path / "run2" / "best").config.view_stride == 1


def test_checkpoints_record_their_inputs_and_refuse_other_features(tmp_path, capsys):
    cache = long_cache(tmp_path / "cache", lengths=(20, 30))
    run = tmp_path / "run"
    assert main(["train", cache, "--out", str(run), *TINY, "--steps", "2", "--quiet"]) == 0
    inputs = json.loads((run / "best" / "inputs.json").read_text())
    assert inputs["backbone"] == BACKBONE and inputs["sampling"] == SAMPLING and inputs["cache"] == cache

    # The same 4-D features, from other weights: refused by evaluate, naming both hashes.
    other = long_cache(tmp_path / "other", lengths=(20, 30), backbone={**BACKBONE, "weights_sha256": "bb22"})
    assert main(["evaluate", str(run), "--cache", other]) == 2
    err = capsys.readouterr().err
    assert other in err and "'aa11' in the checkpoint" in err and "'bb22' in the cache" in err

    # New videos to score: no labels, no class names. Predictions, no accuracy.
    new = tmp_path / "new"
    with CacheWriter(str(new), feature_dim=4, attrs={"backbone": BACKBONE, "sampling": SAMPLING}) as w:
        w.add("x.mp4", np.ones((12, 4)), np.arange(12) / 25, np.arange(12), split="test")
    assert main(["evaluate", str(run), "--cache", str(new), "--split", "test", "--out", str(tmp_path / "scores")]) == 0
    assert "no labelled videos; predictions written" in capsys.readouterr().out
    rows = (tmp_path / "scores" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[2] in ("a", "b")

    # --resume refuses a cache whose training videos changed (the schedule would differ).
    with CacheWriter(cache, feature_dim=4, class_names=["a", "b"], attrs={"backbone": BACKBONE, "sampling": SAMPLING},
                     identity=("backbone", "sampling")) as w:
        w.add("train/0/extra.mp4", np.ones((25, 4)), np.arange(25) / 25, np.arange(25), label=0, split="train")
    assert main(["train", cache, "--out", str(run), "--resume"]) == 2
    assert "data.train_videos: 4 then, 5 now" in capsys.readouterr().err


def test_a_cache_without_val_split_holds_out_a_share_of_each_class(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache", per_class={"train": 24})
    run = tmp_path / "run"
    assert main(["train", cache, "--out", str(run), *TINY, "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "42 train videos and 6 val videos held out of 'train'" in out and "holdout.json" in out
    held = json.loads((run / "holdout.json").read_text())
    assert len(held["ids"]) == 6 and sum("/c0/" in v for v in held["ids"]) == 3  # 10 % of each class, rounded up
    again = tmp_path / "again"  # deterministic: the same ids on another run
    assert main(["train", cache, "--out", str(again), *TINY, "--steps", "1", "--quiet"]) == 0
    assert json.loads((again / "holdout.json").read_text())["ids"] == held["ids"]
    assert main(["evaluate", str(run), "--cache", cache, "--json"]) == 0
    m = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert m["videos"] == 6 and m["split"] == "train" and m["held_out_of_train"]
    assert main(["evaluate", str(run), "--cache", cache, "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("held out of train: 6 videos")  # not "train: 6 videos"


def test_explicit_epochs_and_steps_are_obeyed_and_the_log_says_what_decided(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache")  # 48 train clips, batches of 16: 3 steps per epoch
    assert main(["train", cache, "--out", str(tmp_path / "e"), *TINY, "--epochs", "5", "--quiet"]) == 0
    assert "15 steps (5 epochs x 3 steps of 16 clips), set by optim.epochs=5" in capsys.readouterr().out
    assert [r["step"] for r in records(tmp_path / "e")] == [3, 6, 9, 12, 15]
    assert main(["train", cache, "--out", str(tmp_path / "s"), *TINY, "--steps", "4", "--quiet"]) == 0
    assert [r["step"] for r in records(tmp_path / "s")] == [3, 4]  # the last epoch is cut at the step count
    assert main(["train", cache, "--out", str(tmp_path / "d"), *TINY, "--set", "optim.min_steps=7", "--quiet"]) == 0
    assert "75 steps (25 epochs x 3 steps of 16 clips), set by the default 25 epochs" in capsys.readouterr().out

    one = tmp_path / "one"
    with CacheWriter(str(one), feature_dim=4, class_names=["only"]) as w:
        for split in ("train", "val"):
            w.add(f"{split}/x.mp4", np.ones((8, 4)), np.arange(8) / 25, np.arange(8), label=0, split=split)
    assert main(["train", str(one), "--out", str(tmp_path / "o"), *TINY, "--steps", "1", "--quiet"]) == 0
    assert "single class (only)" in capsys.readouterr().out


def test_named_model_sizes_and_a_saved_config_serves_another_cache(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache")
    run = tmp_path / "tiny"
    assert main(["train", cache, "--out", str(run), "--model", "tiny", "--steps", "1", "--quiet"]) == 0
    assert "0.55 M parameters" in capsys.readouterr().out  # trains in seconds on a CPU
    assert json.loads((run / "best" / "config.json").read_text())["hidden_size"] == 128
    other = make_cache(tmp_path / "other", dim=5, classes=4)  # another D and class count: taken from the cache
    assert main(["train", other, "--out", str(tmp_path / "reuse"), "--config", str(run / "config.yaml"),
                 "--steps", "2", "--quiet"]) == 0
    cfg = json.loads((tmp_path / "reuse" / "best" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["feature_dim"], cfg["num_classes"]) == (128, 5, 4)


def _torchrun(args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vtn", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True, **kw)


def _failure(proc) -> str:
    """The end of each rank's stderr: the rank that failed first is often not the last one to write."""
    lines = proc.stderr.read().splitlines()
    return "\n".join("\n".join([x for x in lines if x.startswith(f"[rank{r}]")][-15:]) for r in (0, 1)) + "\n" + \
        "\n".join(x for x in lines if not x.startswith("[rank"))[-2000:]


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_exactly(tmp_path):
    cache = make_cache(tmp_path / "cache", per_class={"train": 21, "val": 4})  # 42 clips: a short last batch of 10
    args = [*TINY, "--set", "model.dropout=0", "--set", "model.attention_dropout=0", "--set", "model.head_dropout=0",
            "--batch-size", "16", "--steps", "20", "--set", "run.checkpoint_every=2", "--quiet"]
    assert main(["train", cache, "--out", str(tmp_path / "one"), *args]) == 0
    two = _torchrun(["train", cache, "--out", str(tmp_path / "two"), *args])
    assert two.wait(timeout=300) == 0, _failure(two)
    a = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    for k in a:  # the same steps: equal up to the order of float sums
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)

    # Killed (SIGKILL, the whole process group) after a mid-run checkpoint, then resumed: bitwise the same.
    cut = _torchrun(["train", cache, "--out", str(tmp_path / "cut"), *args])
    state = tmp_path / "cut" / "last" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (state.is_file() and json.loads(state.read_text())["step"] >= 4):
        time.sleep(0.02)
    os.killpg(cut.pid, signal.SIGKILL)
    cut.wait()
    assert json.loads(state.read_text())["step"] < 20
    again = _torchrun(["train", cache, "--out", str(tmp_path / "cut"), "--resume", "--quiet"])
    assert again.wait(timeout=300) == 0, _failure(again)
    c = load_file(str(tmp_path / "cut" / "last" / "model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)
    strip = lambda run: [{k: v for k, v in r.items() if k != "elapsed"} for r in records(run)]  # noqa: E731
    assert strip(tmp_path / "two") == strip(tmp_path / "cut")
