"""`vtn evaluate` and its metrics: hand-checked figures, the files it writes, every CLI option, refusals."""

import csv
import json

import numpy as np
import pytest

from vtn.cli import main
from vtn.temporal.metrics import classification_metrics, confusion
from vtn.store import CacheWriter


def test_metrics_by_hand():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    labels = np.array([0, 1, 1, 2, -1])  # the last video is unlabelled: it does not count
    m = classification_metrics(logits, labels)
    assert m["videos"] == 4 and m["top1"] == 0.5  # right: videos 0 and 1
    assert m["top5"] == 1.0  # 3 classes: top-5 holds every class
    assert m["mean_class_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    logp = logits[:4] - np.log(np.exp(logits[:4]).sum(1, keepdims=True))
    assert m["loss"] == pytest.approx(-np.mean(logp[np.arange(4), labels[:4]]))
    assert confusion(logits, labels).tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    assert classification_metrics(logits[4:], labels[4:]) == {"videos": 0}


def make_cache(path, dim=4, names=("a", "b", "c"), splits=("train", "val")):
    rng = np.random.default_rng(0)
    w = CacheWriter(str(path), feature_dim=dim, class_names=list(names), overwrite=True)
    for split in splits:
        for i in range(9):
            x = rng.normal(size=(int(rng.integers(3, 9)), dim)) + i % len(names)
            w.add(f"{split}/{i}", x, np.arange(len(x)) / 10.0, np.arange(len(x)), label=i % len(names), split=split)
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cache = make_cache(root / "cache")
    run = root / "run"
    assert main(["train", cache, "--out", str(run), "--quiet", "--set", "model.hidden_size=8",
                 "--set", "model.num_layers=1", "--set", "model.num_heads=2", "--set", "model.intermediate_size=16",
                 "--set", "model.attention_window=2", "--set", "optim.min_steps=2", "--epochs", "2",
                 "--batch-size", "4"]) == 0
    return cache, run


def test_evaluate_writes_predictions_confusion_and_metrics(trained, capsys):
    cache, run = trained
    assert main(["evaluate", str(run), "--cache", cache]) == 0
    line = capsys.readouterr().out
    assert line.startswith("val: 9 videos") and "top-1" in line and "mean class accuracy" in line
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    assert [r["id"] for r in rows] == [f"val/{i}" for i in range(9)]  # the cache's order
    assert [r["label"] for r in rows] == ["a", "b", "c"] * 3
    for r in rows:
        probs = [float(p) for p in r["probabilities"].split()]
        top = r["top5"].split(";")
        assert len(probs) == 3 and sum(probs) == pytest.approx(1, abs=1e-5) and len(top) == 3
        assert top[0] == r["prediction"] == "abc"[int(np.argmax(probs))]
    table = list(csv.reader(open(run / "confusion.csv")))
    assert table[0][1:] == ["a", "b", "c"] and sum(int(x) for row in table[1:] for x in row[1:]) == 9
    assert json.loads((run / "metrics.json").read_text())["videos"] == 9


def test_evaluate_options(trained, tmp_path, capsys):
    cache, run = trained
    out = tmp_path / "elsewhere"
    assert main(["evaluate", str(run / "last"), "--cache", cache, "--split", "train", "--out", str(out),
                 "--batch-size", "2", "--device", "cpu", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["split"] == "train" and m["videos"] == 9 and m["checkpoint"] == str(run / "last")
    assert (out / "predictions.csv").is_file() and (out / "confusion.csv").is_file()
    assert main(["evaluate", str(run), "--cache", cache, "--checkpoint", "last", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(run / "last")


def test_unlabelled_split_gets_predictions_only(trained, tmp_path, capsys):
    _, run = trained
    cache = str(tmp_path / "unlabelled")
    w = CacheWriter(cache, feature_dim=4, class_names=["a", "b", "c"])
    w.add("x", np.ones((3, 4)), np.arange(3) / 10.0, np.arange(3), split="test")
    w.close()
    assert main(["evaluate", str(run), "--cache", cache, "--split", "test", "--out", str(tmp_path / "o")]) == 0
    assert "no labelled videos" in capsys.readouterr().out
    assert list(csv.DictReader(open(tmp_path / "o" / "predictions.csv")))[0]["label"] == ""


@pytest.mark.parametrize("kind, words", [
    ("dim", ["5 dimensions", "feature_dim=4"]),
    ("names", ["['a', 'b', 'x']"]),
    ("split", ["'test'"]),
    ("run", ["neither a training run", "best/"]),
])
def test_mismatches_are_refused_clearly(trained, tmp_path, capsys, kind, words):
    cache, run = trained
    if kind == "dim":
        cache = make_cache(tmp_path / "c", dim=5)
    elif kind == "names":
        cache = make_cache(tmp_path / "c", names=("a", "b", "x"))
    args = ["evaluate", str(tmp_path if kind == "run" else run), "--cache", cache]
    assert main(args + (["--split", "test"] if kind == "split" else [])) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
