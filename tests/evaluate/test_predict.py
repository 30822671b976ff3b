"""`vtn predict`: raw videos through the backbone the model's features came from, the encoder and the head."""

import csv
import json

import numpy as np
import pytest
import torch

from vtn.cli import main
from vtn.evaluate.predict import Predictor
from vtn import synth
from vtn.extract.backbone import Preprocess
from vtn.extract.sampling import SamplingConfig, sample

EXTRACT = ["--backbone", "resnet18", "--image-size", "32", "--fps", "8", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    videos = root / "videos"
    synth.make_dataset(videos, per_split={"train": 2, "val": 1}, classes=synth.CLASSES[:2], seconds=(1.0, 2.5), seed=4)
    weights = root / "resnet18.safetensors"  # the backbone's weights in a file, as users have them
    from safetensors.torch import save_file
    from vtn.extract.backbone import create_backbone

    model, _, _ = create_backbone("resnet18", seed=7)
    save_file(model.state_dict(), str(weights))
    cache, run = str(root / "cache"), root / "run"
    assert main(["extract", str(videos), "--out", cache, "--weights", str(weights), *EXTRACT]) == 0
    assert main(["train", cache, "--out", str(run), "--model", "tiny", "--steps", "3", "--quiet"]) == 0
    return videos, cache, run, weights


def test_predict_on_raw_videos_equals_extract_then_evaluate(trained, tmp_path, capsys):
    videos, cache, run, _ = trained
    assert main(["evaluate", str(run), "--cache", cache, "--out", str(tmp_path / "e")]) == 0
    expected = {r["id"].removeprefix("val/"): np.array([float(x) for x in r["probabilities"].split()])
                for r in csv.DictReader(open(tmp_path / "e" / "predictions.csv"))}
    capsys.readouterr()
    assert main(["predict", str(videos / "val"), "--model", str(run), "--json", str(tmp_path / "p.jsonl"),
                 "--workers", "0", "--top", "2"]) == 0
    out = capsys.readouterr().out
    got = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert sorted(g["id"] for g in got) == sorted(expected) and len(out.splitlines()) == 2
    for g in got:
        probs = np.array(list(g["probabilities"].values()))
        # The cache holds float16 features; predict keeps float32: equal up to that rounding.
        np.testing.assert_allclose(probs, expected[g["id"]], atol=2e-3)
        assert g["label"] == g["id"].split("/")[0] and len(g["top"]) == 2 and g["views"] == {"mode": "full", "count": 1}
        assert f"{g['id']}: {g['top'][0]['class']}" in out


def test_predict_takes_its_settings_from_a_yaml_file_and_set(trained, tmp_path, capsys):
    videos, _, run, _ = trained
    (tmp_path / "p.yaml").write_text("views: 2x1\ntop: 5\nworkers: 0\n")
    assert main(["predict", str(videos / "val"), "--model", str(run), "--json", str(tmp_path / "p.jsonl"),
                 "--config", str(tmp_path / "p.yaml"), "--set", "top=1"]) == 0
    got = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(got) == 2 and all(g["views"] == {"mode": "2x1", "count": 2} and len(g["top"]) == 1 for g in got)
    assert "(2x1:" in capsys.readouterr().err
    assert main(["predict", str(videos / "val"), "--model", str(run), "--set", "split=val"]) == 2
    assert "split" in capsys.readouterr().err


def test_predict_writes_attention_figures(trained, tmp_path, capsys):
    from PIL import Image

    videos, _, run, _ = trained
    assert main(["predict", str(videos / "val"), "--model", str(run), "--workers", "0", "--attention", "1",
                 "--json", str(tmp_path / "p.jsonl")]) == 0
    records = json.loads((tmp_path / "attention" / "attention.json").read_text())
    assert len(records) == 1 and len(list((tmp_path / "attention").glob("*.png"))) == 1
    layers = np.array([f["layers"] for f in records[0]["frames"]])
    assert np.allclose(layers.sum(0), 1, atol=1e-4)
    assert Image.open(next((tmp_path / "attention").glob("*.png"))).size[0] >= 600
    assert main(["predict", str(videos / "val"), "--model", str(run), "--views", "2x1", "--attention", "1"]) == 2
    assert "--views full" in capsys.readouterr().err


def test_views_decode_only_their_frames_and_crops_cover_the_long_side(trained, tmp_path):
    times = np.arange(100) / 25.0  # 4 s at 25 fps; sampled at 8 fps: 32 frames
    every = sample(times, SamplingConfig(mode="fps", fps=8))
    assert len(every) == 32
    full = sample(times, SamplingConfig(mode="fps", fps=8, view_frames=10))
    np.testing.assert_array_equal(full, every[np.linspace(0, 31, 10).round().astype(int)])
    clips = sample(times, SamplingConfig(mode="fps", fps=8, view_clips=(3, 8, 2)))  # 3 clips of 8 frames, 2 apart
    np.testing.assert_array_equal(clips, every[sorted({*range(0, 15, 2), *range(8, 23, 2), *range(17, 32, 2)})])

    frame = np.zeros((1, 40, 120, 3), np.uint8)  # landscape: left third dark, centre mid, right third bright
    frame[:, :, 40:80], frame[:, :, 80:] = 128, 255
    pre = Preprocess({"input_size": (3, 40, 40), "crop_pct": 1.0, "interpolation": "bilinear",
                      "mean": (0, 0, 0), "std": (1, 1, 1)}, crops=3)
    x = pre(torch.from_numpy(frame))
    assert x.shape == (3, 3, 40, 40)
    assert [round(float(c.mean()) * 255) for c in x] == [0, 128, 255]  # left, centre, right

    videos, _, run, _ = trained
    predictor = Predictor.from_run(run, views="3x3")
    results = predictor(sorted((videos / "val").rglob("*.mp4")))
    for r in results:  # each decoded frame in 3 crops; the views: 3 clips x 3 crops
        assert r["views"] == 9 and r["frames_through_backbone"] % 3 == 0
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5


def test_a_broken_video_is_reported_and_the_rest_predicted(trained, tmp_path, bad_video, capsys):
    videos, _, run, _ = trained
    folder = tmp_path / "in"
    folder.mkdir()
    for p in (videos / "val").rglob("*.mp4"):
        (folder / p.name.replace(".mp4", f"_{p.parent.name}.mp4")).symlink_to(p)
    (folder / "broken.mp4").write_bytes(bad_video.read_bytes())
    assert main(["predict", str(folder), "--model", str(run), "--workers", "1"]) == 3
    out = capsys.readouterr().out
    assert "broken.mp4: failed: NotAVideo" in out and out.count("%") >= 2 * 2


def test_predict_refuses_a_model_whose_backbone_weights_are_not_there(trained, tmp_path, capsys):
    videos, _, run, weights = trained
    moved = tmp_path / "elsewhere.safetensors"
    moved.write_bytes(weights.read_bytes())
    weights.rename(tmp_path / "gone")
    try:
        assert main(["predict", str(videos / "val"), "--model", str(run)]) == 2
        err = capsys.readouterr().err
        assert str(weights) in err and "--weights" in err
        assert main(["predict", str(videos / "val"), "--model", str(run), "--weights", str(moved), "--workers", "0"]) == 0
        from safetensors.torch import save_file
        from vtn.extract.backbone import create_backbone

        other, _, _ = create_backbone("resnet18", seed=8)
        save_file(other.state_dict(), str(moved))  # other weights under the same name: refused, naming both hashes
        assert main(["predict", str(videos / "val"), "--model", str(run), "--weights", str(moved)]) == 2
        assert "weights_sha256" in capsys.readouterr().err
    finally:
        (tmp_path / "gone").rename(weights)


def test_predict_with_a_truncated_checkpoint_names_the_file(trained, tmp_path, capsys):
    import shutil

    videos, _, run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    capsys.readouterr()
    assert main(["predict", str(videos / "val"), "--model", str(copy), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: cannot read this checkpoint file, it is damaged or incomplete" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def bad_video(tmp_path_factory):
    return synth.make_bad_files(tmp_path_factory.mktemp("bad"))["not_video"]


@pytest.mark.slow
def test_bench_inference_prints_both_modes(tmp_path, vtn_cli):
    proc = vtn_cli("bench", "inference", "--videos", "1", "--train-videos", "2", "--steps", "2", "--views", "full",
                   "10x3", "--workdir", str(tmp_path), "--latency-backbone", "resnet18")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "  full:" in proc.stdout and "10x3:" in proc.stdout and "of the speed-up" in proc.stdout
    assert "one 2 s clip (320x240), resnet18 (random init)" in proc.stdout and "x the backbone, goal <= 1.5x" in proc.stdout


@pytest.fixture
def vtn_cli():
    import subprocess
    import sys

    return lambda *args: subprocess.run([sys.executable, "-m", "vtn", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_finetune_checkpoint_predicts_with_its_own_backbone_file(trained, tmp_path, capsys):
    """A checkpoint as `vtn finetune` writes it (backbone + VTN, backbone.safetensors, inputs.json naming that
    file), here with the backbone unchanged: the same predictions as the stage-two run, in multi-crop views too.
    One without backbone.safetensors (an older vtn's) is refused: its inputs.json names the stage-two backbone."""
    import shutil

    from vtn.temporal.checkpoint import read_inputs, write_model
    from vtn.temporal.e2e import BACKBONE_FILE, VideoVTN, rebuild_backbone
    from vtn.temporal.model import VTN

    videos, _, run, weights = trained
    inputs = read_inputs(run / "best")
    backbone, preprocess, bc, identity = rebuild_backbone(inputs, run / "best", torch.device("cpu"))
    video = {"backbone": identity, "backbone_config": {"name": bc.name, "weights": bc.weights,
                                                       "image_size": bc.image_size, "seed": bc.seed},
             "sampling": inputs["sampling"]}
    model = VideoVTN.compose(VTN.from_pretrained(run / "best"), backbone, preprocess, video)
    ckpt = tmp_path / "ft" / "best"
    ckpt.mkdir(parents=True)
    write_model(ckpt, model, {}, inputs)
    recorded = read_inputs(ckpt)
    assert recorded["backbone_config"]["weights"] == BACKBONE_FILE
    assert recorded["backbone"]["weights_sha256"] == identity["weights_sha256"]  # the same weights, now in the run
    shutil.copy(weights, tmp_path / "w.safetensors")
    weights.unlink()  # the stage-two weights file is not needed: the run holds its backbone
    try:
        for views in ("full", "2x3"):
            a = {r["id"]: r["logits"] for r in Predictor.from_run(run, views=views, weights=str(tmp_path / "w.safetensors"))(
                sorted((videos / "val").rglob("*.mp4")))}
            b = {r["id"]: r["logits"] for r in Predictor.from_run(ckpt, views=views)(sorted((videos / "val").rglob("*.mp4")))}
            assert a.keys() == b.keys() and len(a) == 2
            for k in a:
                np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5)
    finally:
        shutil.copy(tmp_path / "w.safetensors", weights)
    (ckpt / BACKBONE_FILE).unlink()
    (ckpt / "inputs.json").write_text(json.dumps(inputs))
    assert main(["predict", str(videos / "val"), "--model", str(ckpt)]) == 2
    assert "older vtn" in capsys.readouterr().err
