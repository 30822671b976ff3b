"""`vtn evaluate` and its metrics: hand-checked figures, the files it writes, every CLI option, refusals."""

import csv
import json
import warnings

import numpy as np
import pytest

from vtn.cli import main
from vtn.temporal.metrics import classification_metrics, confusion
from vtn.store import CacheWriter, open_cache


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
    # Videos of one class (a small val split): mean class accuracy is that class's recall, quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert classification_metrics(logits[1:3], labels[1:3])["mean_class_accuracy"] == 0.5


def test_the_metric_registry_drives_the_metrics_the_summary_the_best_epoch_and_the_tables(tmp_path, monkeypatch):
    from vtn.temporal.metrics import METRICS, Metric, rank, summary_line, top_k
    from vtn.temporal.results import write_results

    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]])
    labels = np.array([0, 1, 1, 2])
    m = classification_metrics(logits, labels)
    assert list(m) == ["videos", "top1", "top5", "mean_class_accuracy", "loss"] == ["videos", *METRICS]
    assert summary_line(m) == f"top-1 50.0%  top-5 100.0%  mean class accuracy 50.0%  loss {m['loss']:.4f}"
    # The best epoch: the highest top-1; of equal top-1, the lowest loss.
    a, b, c = {"val_top1": 0.5, "val_loss": 1.0}, {"val_top1": 0.5, "val_loss": 0.9}, {"val_top1": 0.6, "val_loss": 3.0}
    assert max([a, b, c], key=rank) is c and max([a, b], key=rank) is b
    assert rank(m, prefix="") == (0.5, -m["loss"])

    # A new metric is one entry: the metrics, the summary and the sweep/probe tables take it up.
    def top2(lg, lb):
        return float(np.mean((top_k(lg, 2) == lb[:, None]).any(axis=1)))

    monkeypatch.setitem(METRICS, "top2", Metric("top2", "top-2", "top-2 col", True, top2, ".1%"))
    m = classification_metrics(np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), np.array([2, 0]))
    assert m["top2"] == 0.0 and m["top5"] == 1.0 and summary_line(m).endswith("top-2 0.0%")
    row = {"run": "probe: x", "seeds": 1, "parameters": 7, "train_seconds": 1.0,
           **{f"val_{k}_{s}": 0.25 for k in ("top1", "top5", "mean_class_accuracy", "top2") for s in ("mean", "std")}}
    write_results([row], tmp_path, [], name="t")
    assert "val_top2_mean,val_top2_std" in (tmp_path / "t.csv").read_text().splitlines()[0]
    assert "| mean class | top-2 col |" in (tmp_path / "t.md").read_text()


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


def test_view_modes_pick_evenly_spaced_clips_of_the_training_length():
    from vtn.store.dataset import clip_rows

    # 100 cached frames, clips of 16 frames 2 apart (span 31): 4 clips start at 0, 23, 46 and 69.
    starts = [int(clip_rows(100, 16, 2, None, None, view=(k, 4))[0]) for k in range(4)]
    assert starts == [0, 23, 46, 69]
    assert list(clip_rows(100, 16, 2, None, None, view=(0, 1))) == list(range(34, 66, 2))  # one clip: centred
    assert list(clip_rows(10, 16, 2, None, None, view=(3, 4))) == list(range(10))  # shorter than a clip: all of it


def test_views_from_the_cache_average_clips_and_record_their_cost(trained, tmp_path, capsys):
    cache, run = trained
    assert main(["evaluate", str(run), "--cache", cache, "--views", "3x1", "--out", str(tmp_path), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    lengths = open_cache(cache).lengths[[v.startswith("val/") for v in open_cache(cache).ids]]
    assert m["views"] == {"mode": "3x1", "clips": 3, "crops": 1}
    assert m["frames_through_backbone"] == 3 * int(np.minimum(lengths, 16).sum()) and m["seconds"] > 0
    assert main(["evaluate", str(run), "--cache", cache, "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["views"]["mode"] == "full" and full["frames_through_backbone"] == int(lengths.sum())
    assert main(["evaluate", str(run), "--cache", cache, "--views", "10x3"]) == 2
    assert "S is 1" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--cache", cache, "--views", "ten"]) == 2
    assert "--views 'ten'" in capsys.readouterr().err


def test_settings_come_from_a_yaml_file_then_set_then_flags(trained, tmp_path, capsys):
    from vtn.cli import build_parser
    from vtn.config import ConfigError
    from vtn.config import job_config
    from vtn.evaluate.settings import FLAGS, EvaluateConfig, PredictConfig

    def settings(cls, args):
        return job_config(cls, args, FLAGS)

    yaml = tmp_path / "eval.yaml"
    yaml.write_text("views: 3x1\ncheckpoint: last\nbatch_size: 2\n")
    parse = build_parser().parse_args
    assert settings(EvaluateConfig, parse(["evaluate", "r", "--cache", "c"])) == EvaluateConfig()
    got = settings(EvaluateConfig, parse(["evaluate", "r", "--cache", "c", "--config", str(yaml), "--set", "split=train",
                                          "--set", "batch_size=4", "--batch-size", "8"]))
    assert got == EvaluateConfig(views="3x1", checkpoint="last", split="train", batch_size=8)  # flags win
    got = settings(PredictConfig, parse(["predict", "v", "--model", "r", "--set", "top=2", "--set", "amp=bf16",
                                         "--workers", "0"]))
    assert got == PredictConfig(top=2, amp="bf16", workers=0)
    with pytest.raises(ConfigError, match="batch_size"):
        settings(EvaluateConfig, parse(["evaluate", "r", "--cache", "c", "--set", "batch_size=0"]))
    with pytest.raises(ConfigError, match="'top'"):  # predict's settings only
        settings(EvaluateConfig, parse(["evaluate", "r", "--cache", "c", "--set", "top=2"]))

    # Through the command: the file's views and checkpoint are the ones evaluated.
    cache, run = trained
    assert main(["evaluate", str(run), "--cache", cache, "--config", str(yaml), "--out", str(tmp_path / "o"),
                 "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["views"]["mode"] == "3x1" and m["checkpoint"] == str(run / "last")
    assert main(["evaluate", str(run), "--cache", cache, "--config", str(yaml), "--set", "views=full",
                 "--out", str(tmp_path / "o"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["views"]["mode"] == "full"
    assert main(["evaluate", str(run), "--cache", cache, "--set", "viewz=full"]) == 2
    assert "viewz" in capsys.readouterr().err


def test_per_class_confusions_and_calibration_by_hand():
    from vtn.temporal.metrics import calibration, confused_pairs, per_class

    logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]))
    labels = np.array([0, 1, 1, 0])  # video 1 (class b) is taken for a
    pc = per_class(logits, labels, ["a", "b"])
    assert pc["a"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "videos": 2}
    assert pc["b"]["recall"] == 0.5 and pc["b"]["precision"] == 1.0
    assert confused_pairs(confusion(logits, labels), ["a", "b"]) == [{"true": "b", "predicted": "a", "videos": 1}]
    cal = calibration(np.exp(logits), labels, bins=10)
    # Bins: 0.9 (right), 0.6 (wrong), 0.7 (right), 0.8 (right): |conf - acc| weighted by share.
    assert cal["ece"] == pytest.approx((0.1 + 0.6 + 0.3 + 0.2) / 4)
    assert sum(b["videos"] for b in cal["bins"]) == 4


def test_evaluate_and_report_draw_figures_of_the_expected_size(trained, tmp_path, capsys):
    from PIL import Image

    cache, run = trained
    assert main(["evaluate", str(run), "--cache", cache, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "precision" in out and "ECE" in out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m["per_class"]) == {"a", "b", "c"} and 0 <= m["calibration"]["ece"] <= 1
    assert Image.open(tmp_path / "confusion.png").size == (407, 407)  # 3 classes of one-letter names
    assert Image.open(tmp_path / "reliability.png").size == (480, 520)
    assert Image.open(run / "curves.png").size == (1300, 360)  # drawn by vtn train at the end
    (run / "curves.png").unlink()
    assert main(["report", str(run)]) == 0
    assert "best val top-1" in capsys.readouterr().out and Image.open(run / "curves.png").size == (1300, 360)
    assert main(["report", str(tmp_path)]) == 2


@pytest.mark.slow
def test_attention_of_real_videos_sums_to_one_and_equals_the_model(tmp_path, capsys):
    import torch
    from PIL import Image

    from vtn import synth
    from vtn.store import ClipDataset, collate_clips
    from vtn.temporal import VTN
    from vtn.temporal.data import model_inputs

    videos = tmp_path / "videos"
    synth.make_dataset(videos, per_split={"train": 2, "val": 1}, classes=synth.CLASSES[:2], seconds=(1.0, 1.5))
    cache, run = str(tmp_path / "cache"), tmp_path / "run"
    assert main(["extract", str(videos), "--out", cache, "--backbone", "resnet18", "--random-init", "--image-size",
                 "32", "--fps", "8", "--workers", "0", "--quiet"]) == 0
    assert main(["train", cache, "--out", str(run), "--model", "tiny", "--steps", "2", "--quiet"]) == 0
    assert main(["evaluate", str(run), "--cache", cache, "--attention", "2", "--out", str(tmp_path / "e")]) == 0
    records = json.loads((tmp_path / "e" / "attention" / "attention.json").read_text())
    model = VTN.from_pretrained(run / "best").eval()
    data = ClipDataset(open_cache(cache), "val", max_frames=288, train=False)
    assert [r["id"] for r in records] == data.ids[:2]
    for i, rec in enumerate(records):
        layers = np.array([f["layers"] for f in rec["frames"]])  # [T, layers]
        assert np.allclose(layers.sum(0), 1, atol=1e-4) and sum(f["rollout"] for f in rec["frames"]) == pytest.approx(1, abs=1e-4)
        item = data[i]
        assert [f["frame_index"] for f in rec["frames"]] == item["positions"].tolist()
        with torch.no_grad():
            _, att = model(*model_inputs(collate_clips([item]), model.config, torch.device("cpu")), return_attention=True)
        for k, a in enumerate(att):
            expect = a[0].mean(0)[1:] / a[0].mean(0)[1:].sum()
            assert np.allclose(layers[:, k], expect.numpy(), atol=1e-5)
        png = Image.open(tmp_path / "e" / "attention" / (rec["id"].replace("/", "_") + ".png"))
        assert png.size[0] == 1200  # 12 inches at 100 dpi; the height follows the thumbnails' aspect
        pixels = np.asarray(png.convert("RGB"))
        assert pixels.std() > 10  # real thumbnails and bars, not a blank image


def test_report_counts_the_epochs_trained_not_the_metric_records(trained, tmp_path, capsys):
    import shutil

    _, run = trained
    sparse = tmp_path / "sparse"  # a run that recorded only some of its epochs (a long run evaluates every few)
    sparse.mkdir()
    shutil.copy(run / "config.yaml", sparse)
    records = (run / "metrics.jsonl").read_text().splitlines()
    last = json.loads(records[-1])
    assert len(records) == last["epoch"] == 2
    (sparse / "metrics.jsonl").write_text(records[-1] + "\n")
    assert main(["report", str(sparse)]) == 0
    assert f"{sparse}: 2 epochs, {last['step']} steps;" in capsys.readouterr().out
