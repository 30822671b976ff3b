"""What a `vtn finetune` run gives back: its backbone re-extracts a cache (trained and evaluated on like any
other), `vtn predict` and `vtn evaluate` take the run, and it runs as 2 processes under torchrun."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vtn.cli import main
from vtn import synth
from vtn.store import open_cache
from vtn.temporal.checkpoint import read_inputs
from vtn.temporal.e2e import BACKBONE_FILE, VideoVTN, reextract_command

EXTRACT = ["--backbone", "resnet18", "--image-size", "32", "--fps", "8", "--workers", "0", "--quiet"]
# No dropout anywhere (resnet18 has none; BatchNorm is frozen by default): a 2-process run can equal a 1-process one.
NO_DROPOUT = ["--set", "model.dropout=0", "--set", "model.attention_dropout=0", "--set", "model.head_dropout=0"]
FT = ["--steps", "2", "--batch-size", "2", "--lr", "0.01", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """Generated videos (2 classes: 4 train, 2 val), their resnet18 cache, a tiny stage-two run on it and a 2-step
    fine-tune of that run (a learning rate large enough to move the backbone visibly)."""
    root = tmp_path_factory.mktemp("finetune_out")
    videos = root / "videos"
    synth.make_dataset(videos, per_split={"train": 2, "val": 1}, classes=synth.CLASSES[:2], seconds=(1.0, 2.0), seed=5)
    cache, run, run2 = str(root / "cache"), root / "run", root / "run2"
    assert main(["extract", str(videos), "--out", cache, "--random-init", *EXTRACT]) == 0
    # Stage two at 3e-4: its weights, fine-tuned at --lr 0.01, keep the re-extracted features inside float16.
    assert main(["train", cache, "--out", str(run), "--model", "tiny", "--steps", "2", "--frames", "4",
                 "--stride", "2", "--lr", "3e-4", *NO_DROPOUT, "--quiet"]) == 0
    assert main(["finetune", str(run), "--out", str(run2), *FT]) == 0
    return videos, cache, run, run2


@pytest.fixture(scope="module")
def reextracted(tuned):
    """The videos re-extracted with the fine-tuned backbone, by the command a refused `vtn evaluate` names."""
    videos, cache, _, run2 = tuned
    new = str(run2.parent / "cache2")
    cmd = reextract_command(run2 / "best", read_inputs(run2 / "best"), str(videos)).replace("NEW_CACHE", new)
    assert main([*cmd.split()[1:], "--workers", "0", "--quiet"]) == 0
    return new, cmd


def test_the_finetuned_backbone_reextracts_a_cache_to_train_and_evaluate_on(tuned, reextracted, tmp_path):
    videos, cache_url, _, run2 = tuned
    new_url, cmd = reextracted
    assert f"--weights {run2 / 'best' / BACKBONE_FILE}" in cmd and "--backbone resnet18 --image-size 32 --fps 8" in cmd
    tuned_model = VideoVTN.from_pretrained(run2 / "best")
    # backbone.safetensors is the composed model's backbone under timm's own names.
    alone = load_file(str(run2 / "best" / BACKBONE_FILE))
    assert alone.keys() == tuned_model.backbone.state_dict().keys()
    assert all(torch.equal(v, tuned_model.backbone.state_dict()[k]) for k, v in alone.items())
    assert (run2 / "last" / BACKBONE_FILE).is_file()
    from vtn.extract.backbone import state_dict_sha256

    old, new = open_cache(cache_url), open_cache(new_url)
    recorded = read_inputs(run2 / "best")
    identity = new.attrs["backbone"]
    assert identity["weights"] == "file" and identity["weights_sha256"] == state_dict_sha256(tuned_model.backbone)
    assert identity["weights_sha256"] != old.attrs["backbone"]["weights_sha256"]  # the backbone did move
    for key in ("name", "weights_sha256", "weights_file_sha256", "preprocessing"):
        assert recorded["backbone"][key] == identity[key], key
    assert recorded["stage_two_backbone"] == old.attrs["backbone"]
    for vid in old.split_ids("val"):
        a, b = old.video(vid), new.video(vid)
        np.testing.assert_array_equal(a.frame_indices, b.frame_indices)  # the same frames, other features
        assert not np.allclose(a.features.astype(np.float32), b.features.astype(np.float32), atol=1e-3)

    run3 = tmp_path / "run3"
    assert main(["train", new_url, "--out", str(run3), "--model", "tiny", "--steps", "2", "--frames", "4",
                 "--stride", "2", "--quiet"]) == 0
    assert read_inputs(run3 / "best")["backbone"] == identity
    assert main(["evaluate", str(run3), "--cache", new_url, "--out", str(tmp_path / "e3")]) == 0
    assert json.loads((tmp_path / "e3" / "metrics.json").read_text())["videos"] == 2


def test_evaluate_takes_a_finetuned_run_on_its_own_features_and_refuses_the_old_cache(tuned, reextracted, tmp_path,
                                                                                       capsys):
    _, cache_url, _, run2 = tuned
    new_url, cmd = reextracted
    assert main(["evaluate", str(run2), "--cache", cache_url, "--out", str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err
    assert "weights_sha256" in err and "fine-tuned backbone" in err
    assert cmd.replace(f" --out {new_url}", " --out NEW_CACHE") in err  # the command that makes the right cache
    assert main(["evaluate", str(run2), "--cache", new_url, "--out", str(tmp_path / "new")]) == 0
    metrics = json.loads((tmp_path / "new" / "metrics.json").read_text())
    assert metrics["videos"] == 2 and metrics["checkpoint"] == str(run2 / "best")


def test_predict_on_a_finetuned_run_gives_its_evaluation_logits(tuned, tmp_path, monkeypatch):
    """`vtn predict --model RUN2` builds the fine-tuned backbone (not the stage-two one) with the run's
    preprocessing and sampling: its probabilities are those of `vtn finetune`'s own evaluation path."""
    from types import SimpleNamespace

    import vtn.temporal.finetune as finetune_job
    from vtn.extract.config import BackboneConfig, ExtractConfig, RuntimeConfig
    from vtn.runtime import Processes
    from vtn.temporal.e2e import sampling_of
    from vtn.temporal.data import whole_video_sampling
    from vtn.temporal.metrics import log_softmax

    videos, _, run, run2 = tuned
    assert main(["predict", str(videos / "val"), "--model", str(run2), "--json", str(tmp_path / "p.jsonl"),
                 "--workers", "0"]) == 0
    got = {g["id"]: np.array(list(g["probabilities"].values()))
           for g in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    assert main(["predict", str(videos / "val"), "--model", str(run), "--json", str(tmp_path / "s2.jsonl"),
                 "--workers", "0"]) == 0
    stage_two = {g["id"]: np.array(list(g["probabilities"].values()))
                 for g in map(json.loads, (tmp_path / "s2.jsonl").read_text().splitlines())}

    model = VideoVTN.from_pretrained(run2 / "best").eval()
    inputs = read_inputs(run / "best")
    cfg = ExtractConfig(whole_video_sampling(sampling_of(inputs), model.config),
                        BackboneConfig(**model.video["backbone_config"]), RuntimeConfig(device="cpu", workers=0))
    seen = []
    monkeypatch.setattr(finetune_job, "gathered_metrics", lambda logits, labels, procs: seen.append(logits) or {})
    failures = finetune_job.Failures(tmp_path, Processes())
    for vid in sorted(got):
        one = SimpleNamespace(ids=[vid], labels=np.array([0]))
        finetune_job.evaluate_videos(model, one, {vid: videos / "val" / vid}, cfg, torch.device("cpu"), Processes(),
                                     failures)
        expected = np.exp(log_softmax(seen[-1]))[0]
        np.testing.assert_allclose(got[vid], expected, rtol=1e-5, atol=1e-6)
        assert not np.allclose(stage_two[vid], expected, atol=1e-4)
    assert not failures.ids and len(got) == 2


@pytest.mark.slow
def test_two_process_finetune_under_torchrun_equals_one_process(tuned, tmp_path):
    _, _, run, _ = tuned
    one, two = tmp_path / "one", tmp_path / "two"
    # The same global batch of 2 clips: 2 in one process, 1 in each of two. BatchNorm frozen: on batch statistics
    # (the random-init default) each process normalises its own clips, which one process cannot equal.
    # The backbone and the encoder at optim.lr (not the random-init default's 10x), and dense clips of one length (the same batch shapes in one and two
    # processes), as the tolerance below assumes.
    frozen = [*FT, "--set", "finetune.freeze_bn=true", "--set", "finetune.backbone_lr=1", "--set", "finetune.encoder_lr=1",
              "--set", "data.speed=[1,1]",
              "--set", "data.sampling=dense"]
    assert main(["finetune", str(run), "--out", str(one), *frozen]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vtn",
           "finetune", str(run), "--out", str(two), *frozen]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ("vtn finetune: the backbone is", "vtn finetune: the first step took", " steps in "):
        assert done.stdout.count(line) == 1, line  # from rank 0 only
    assert set(load_file(str(two / "last" / "rng.safetensors"))) == {"cpu.0", "cpu.1"}
    recs = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 2 and recs[-1]["val_videos"] == 2  # both ranks' val videos gathered
    a, b = load_file(str(one / "last" / "model.safetensors")), load_file(str(two / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("backbone.") for k in a)
    # Equal up to float summation order (gradients summed in another order across processes), which Adam's
    # normalisation lifts to ~2e-5 where a gradient is near 0; one step moves a weight by ~lr (1e-3 to 1e-2).
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)
    inputs = read_inputs(two / "last")  # the backbone moved, and both runs' checkpoints record the same one
    assert inputs["backbone"]["weights_sha256"] != inputs["stage_two_backbone"]["weights_sha256"]
    one_recs = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["train_loss"] == pytest.approx(one_recs[-1]["train_loss"], rel=1e-4)
    assert recs[-1]["val_loss"] == pytest.approx(one_recs[-1]["val_loss"], rel=1e-4)
