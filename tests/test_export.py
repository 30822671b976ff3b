"""`vtn export`: a run as a Hugging Face model folder that `vtn predict --model DIR` takes, and its encoder + head
as ONNX, checked with onnxruntime against the PyTorch model of the run."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vtn import synth
from vtn.cli import main
from vtn.extract.backbone import create_backbone
from vtn.temporal.e2e import load_temporal
from vtn.temporal.export import example_inputs
from vtn.temporal.model import VTN

EXTRACT = ["--backbone", "resnet18", "--image-size", "32", "--fps", "8", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Small runs shared by the tests: a random-init resnet18 from a weights file (as users have them), a tiny
    encoder trained a few steps, its features normalised (so the export must carry the normalisation); `run` has the
    default table of positions, `run-none` none (its graph takes features alone)."""
    root = tmp_path_factory.mktemp("export")
    videos = root / "videos"
    synth.make_dataset(videos, per_split={"train": 2, "val": 1}, classes=synth.CLASSES[:2], seconds=(1.0, 2.0), seed=5)
    weights = root / "resnet18.safetensors"
    save_file(create_backbone("resnet18", seed=3)[0].state_dict(), str(weights))
    cache, run = str(root / "cache"), root / "run"
    assert main(["extract", str(videos), "--out", cache, "--weights", str(weights), *EXTRACT]) == 0
    for name, sets in (("run", []), ("run-none", ["--set", "model.positions=none"])):
        assert main(["train", cache, "--out", str(root / name), "--model", "tiny", "--steps", "2", *sets,
                     "--quiet"]) == 0
    return videos, run, weights


def graph_inputs(model, frames: int, batch: int) -> dict[str, torch.Tensor]:
    """The graph's inputs, features scaled and shifted so the normalisation matters."""
    inputs = example_inputs(model, frames, batch)
    return {**inputs, "features": inputs["features"] * 3 + 1}


@pytest.mark.parametrize("name", ["run", "run-none"])
def test_onnx_equals_pytorch_at_16_97_and_288_frames(trained, tmp_path, capsys, name):
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'vtn[onnx]') is not installed")
    pytest.importorskip("onnx", reason="the onnx extra (pip install 'vtn[onnx]') is not installed")
    run = trained[1].parent / name
    assert main(["export", str(run), "--onnx", str(tmp_path / "vtn.onnx")]) == 0
    assert "vtn.onnx" in capsys.readouterr().out
    model = load_temporal(run / "best").eval()
    assert not torch.equal(model.feature_mean, torch.zeros_like(model.feature_mean))  # normalisation is in play
    session = ort.InferenceSession(str(tmp_path / "vtn.onnx"), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["vtn_config"])
    assert meta["class_names"] == list(model.config.class_names)
    assert [i.name for i in session.get_inputs()] == ["features", "positions"][:2 if name == "run" else 1]
    torch.manual_seed(0)
    for frames, batch in ((16, 2), (97, 1), (288, 1)):  # 97 and 288 run blocked attention in PyTorch
        inputs = graph_inputs(model, frames, batch)
        with torch.no_grad():
            expected = model(inputs["features"], None, inputs.get("positions")).numpy()
        got = session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
        assert got.shape == (batch, model.config.num_classes)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["run", "run-none"])
def test_torchscript_equals_pytorch_at_16_97_and_288_frames(trained, tmp_path, capsys, name):
    run = trained[1].parent / name
    assert main(["export", str(run), "--torchscript", str(tmp_path / "vtn.pt")]) == 0
    assert "vtn.pt (TorchScript" in capsys.readouterr().out
    model = load_temporal(run / "best").eval()
    extra = {"vtn_config.json": ""}
    scripted = torch.jit.load(str(tmp_path / "vtn.pt"), _extra_files=extra)
    assert json.loads(extra["vtn_config.json"])["class_names"] == list(model.config.class_names)
    torch.manual_seed(0)
    for frames, batch in ((16, 2), (97, 1), (288, 1)):
        inputs = graph_inputs(model, frames, batch)
        with torch.no_grad():
            torch.testing.assert_close(scripted(*inputs.values()),
                                       model(inputs["features"], None, inputs.get("positions")), atol=1e-4, rtol=0)


def test_export_folder_predicts_as_the_run(trained, tmp_path, capsys):
    videos, run, weights = trained
    out = tmp_path / "model"
    assert main(["export", str(run), "--out", str(out), "--with-backbone"]) == 0
    assert "backbone.safetensors" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "backbone.safetensors", "config.json", "inputs.json", "model.safetensors"]
    assert json.loads((out / "inputs.json").read_text())["backbone_config"]["weights"] == "backbone.safetensors"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vtn\n") and "resnet18" in card and "val_top1" in card
    loaded, original = VTN.from_pretrained(out), load_temporal(run / "best")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), original.state_dict().values()))

    weights.rename(weights.with_suffix(".moved"))  # the folder carries its backbone: the run's file is not needed
    try:
        assert main(["predict", str(videos / "val"), "--model", str(out), "--json", str(tmp_path / "f.jsonl"),
                     "--workers", "0", "--quiet"]) == 0
    finally:
        weights.with_suffix(".moved").rename(weights)
    assert main(["predict", str(videos / "val"), "--model", str(run), "--json", str(tmp_path / "r.jsonl"),
                 "--workers", "0", "--quiet"]) == 0
    folder, direct = ([json.loads(x) for x in (tmp_path / n).read_text().splitlines()] for n in ("f.jsonl", "r.jsonl"))
    assert len(folder) == 2 and sorted(folder, key=lambda r: r["id"]) == sorted(direct, key=lambda r: r["id"])


def test_a_fine_tuned_checkpoint_exports_with_its_own_backbone(trained, tmp_path, capsys):
    """A checkpoint as `vtn finetune` writes it (backbone + VTN, backbone.safetensors, video.json), its backbone's
    weights moved away from the extracted ones: the folder carries them, and predicts as the checkpoint does."""
    from vtn.temporal.checkpoint import read_inputs, write_model
    from vtn.temporal.e2e import VideoVTN, rebuild_backbone

    videos, run, _ = trained
    inputs = read_inputs(run / "best")
    backbone, preprocess, _, _ = rebuild_backbone(inputs, run / "best", torch.device("cpu"))
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    video = {k: inputs[k] for k in ("backbone", "backbone_config", "sampling")}
    write_model(tmp_path / "ft", VideoVTN.compose(load_temporal(run / "best"), backbone, preprocess, video), {}, inputs)

    assert main(["export", str(tmp_path / "ft"), "--out", str(tmp_path / "bare")]) == 0
    assert main(["predict", str(videos / "val"), "--model", str(tmp_path / "bare"), "--workers", "0", "--quiet"]) == 2
    assert "backbone.safetensors" in capsys.readouterr().err  # without --with-backbone: named, not guessed
    assert main(["export", str(tmp_path / "ft"), "--out", str(tmp_path / "full"), "--with-backbone"]) == 0
    results = {}
    for name in ("ft", "full"):
        assert main(["predict", str(videos / "val"), "--model", str(tmp_path / name), "--json",
                     str(tmp_path / f"{name}.jsonl"), "--workers", "0", "--quiet"]) == 0
        results[name] = sorted((json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()),
                               key=lambda r: r["id"])
    assert len(results["full"]) == 2 and results["full"] == results["ft"]


def test_export_refuses_what_it_would_clobber_or_cannot_do(trained, tmp_path, capsys):
    _, run, _ = trained
    assert main(["export", str(run)]) == 2
    assert "nothing to write" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(tmp_path)]) == 2
    assert "other files" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"
    assert main(["export", str(run), "--out", str(tmp_path / "m")]) == 0  # without the backbone: the path recorded
    assert "not copied" in capsys.readouterr().out and not (tmp_path / "m" / "backbone.safetensors").exists()
    assert main(["export", str(run), "--out", str(tmp_path / "m"), "--with-backbone"]) == 0  # over its own export
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "m")]) == 2  # a folder onto itself
    assert "the checkpoint being exported" in capsys.readouterr().err



@pytest.mark.tensorboard
def test_bench_export_prints_tensorboards_cost_and_onnx_latency(capsys):
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'vtn[onnx]') is not installed")
    pytest.importorskip("tensorboard", reason="the tb extra (pip install 'vtn[tb]') is not installed")
    assert main(["bench", "export", "--steps", "2", "--repeats", "1", "--model", "tiny"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "with TensorBoard" in out[0] and "--no-tb" in out[0]
    assert [line.split(" frames")[0].split()[-1] for line in out[1:]] == ["16", "288"]
    assert all("PyTorch" in line and "ONNX Runtime" in line for line in out[1:])
