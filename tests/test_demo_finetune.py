"""`vtn demo --finetune`: the layout videos it generates, and the stage itself on a very reduced setting."""

import re

import numpy as np
import pytest

from vtn import demo
from vtn.cli import main
from vtn import synth


def test_layout_classes_show_the_same_pixels_in_different_places():
    # A flat background (a video's texture is the same for every class; here it would only move with the squares).
    background = np.full((72, 72, 3), (40, 60, 30), np.uint8)
    colour = np.array([200.0, 220.0, 160.0], np.float32)
    frames = {cls: synth.render_layout_frame(cls, 0.5, 1.0, background, colour, 1, (36.0, 36.0), (2.0, -1.0))
              for cls in synth.LAYOUT_CLASSES}
    first = frames[synth.LAYOUT_CLASSES[0]]
    for cls, frame in frames.items():
        # The same multiset of pixel values: equal colour statistics, so only the layout tells the classes apart.
        np.testing.assert_array_equal(np.sort(frame.reshape(-1, 3), axis=0), np.sort(first.reshape(-1, 3), axis=0))
        assert cls == synth.LAYOUT_CLASSES[0] or not np.array_equal(frame, first), cls
    # The squares are apart by more than a random-init ResNet stem sees (15 px): no local feature spans both.
    assert synth.LAYOUT_DISTANCE - synth.LAYOUT_PATCH >= 14


@pytest.mark.slow
def test_demo_finetune_prints_the_table_and_keeps_both_runs(tmp_path, capsys, monkeypatch):
    # A few videos and 1-2 steps everywhere: this checks the stage runs end to end through the real jobs, not the
    # accuracy (the README gives that, from the full-size run).
    monkeypatch.setattr(demo, "VIDEOS", {"train": 1, "val": 1})
    monkeypatch.setattr(demo, "TRAIN_SETS", [*demo.TRAIN_SETS, "optim.steps=2"])
    monkeypatch.setattr(demo, "FT_VIDEOS", {"train": 2, "val": 1})
    monkeypatch.setattr(demo, "FT_TRAIN_SETS", [*demo.FT_TRAIN_SETS, "optim.steps=2"])
    monkeypatch.setattr(demo, "FINETUNE_SETS", [*demo.FINETUNE_SETS, "optim.epochs=1", "run.eval_every=1",
                                                          "optim.batch_size=4"])
    assert main(["demo", "--out", str(tmp_path), "--quiet", "--finetune"]) == 0
    out = capsys.readouterr().out
    assert "VTN (order-aware)" in out  # the normal demo ran first
    frozen = re.search(r"stage two, frozen backbone\s+([\d.]+)%\s+(\d+)", out)
    tuned = re.search(r"vtn finetune, end to end\s+([\d.]+)%\s+(\d+)", out)
    assert frozen and tuned, out
    assert all(0.0 <= float(m.group(1)) <= 100.0 for m in (frozen, tuned))
    assert "val top-1 on 4 whole videos, chance 25%" in out
    ft = tmp_path / "finetune"
    assert (ft / "cache" / "zarr.json").is_file() and (ft / "run" / "predictions.csv").is_file()
    for name in ("best", "last"):
        assert (ft / "run" / name / "model.safetensors").is_file()
        assert (ft / "finetuned" / name / "model.safetensors").is_file() and (ft / "finetuned" / name / "video.json").is_file()
    assert len((ft / "finetuned" / "metrics.jsonl").read_text().splitlines()) == 1
    # The demo leaves the backbone's settings to `vtn finetune`'s defaults, chosen from the cache's random-init
    # backbone; the run draws its curves and keeps an empty failures.jsonl.
    assert "the backbone is random-init, as the cache records: finetune.backbone_lr=10.0" in out
    chosen = ("finetune.backbone_lr", "finetune.encoder_lr", "finetune.freeze_bn", "optim.lr")
    assert not any(s.startswith(chosen) for s in demo.FINETUNE_SETS)
    assert (ft / "finetuned" / "curves.png").is_file() and (ft / "finetuned" / "failures.jsonl").read_text() == ""



@pytest.mark.slow
def test_demo_finetune_stage_with_defaults_beats_frozen_by_the_margin(tmp_path, capsys):
    # The stage exactly as `vtn demo --finetune` runs it (its seeded 232 videos, `vtn finetune`'s defaults chosen
    # from the random-init cache): the frozen features stay near chance (25 %), the fine-tuned run learns the layout.
    result = demo.finetune_stage(tmp_path, progress=False)
    assert result["frozen_top1"] <= 0.40, result
    assert result["finetuned_top1"] >= 0.90, result
    out = capsys.readouterr().out
    assert f"{result['finetuned_top1']:9.1%}" in out and f"{result['frozen_top1']:9.1%}" in out
