"""`vtn demo --finetune`: the layout videos it generates, and the stage itself on a very reduced setting."""

import re

import numpy as np
import pytest

from vtn import demo
from vtn import synth

SMALL_VIDEOS = {"train": 16, "val": 5}  # per class
SMALL_RUN = ["optim.epochs=15", "run.eval_every=15"]
MARGIN = 0.4


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
def test_demo_finetune_stage_with_defaults_beats_frozen_features(tmp_path, capsys, monkeypatch):
    # The demo's stage on a smaller seeded set and a shorter run (the README gives the full-size figure): fine-tuning
    # with `vtn finetune`'s defaults (the demo sets only the run's size) must beat the frozen cache by a wide margin.
    monkeypatch.setattr(demo, "FT_VIDEOS", SMALL_VIDEOS)
    monkeypatch.setattr(demo, "FINETUNE_SETS", [*demo.FINETUNE_SETS, *SMALL_RUN])
    result = demo.finetune_stage(tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "the backbone is random-init, as the cache records: finetune.backbone_lr=1.0" in out
    assert result["frozen_top1"] <= 0.4 and result["finetuned_top1"] >= result["frozen_top1"] + MARGIN, result
    frozen = re.search(r"stage two, frozen backbone\s+([\d.]+)%\s+(\d+)", out)
    tuned = re.search(r"vtn finetune, end to end\s+([\d.]+)%\s+(\d+)", out)
    assert frozen and tuned and float(tuned.group(1)) == pytest.approx(100 * result["finetuned_top1"], abs=0.06)
    assert f"val top-1 on {SMALL_VIDEOS['val'] * 4} whole videos, chance 25%" in out
    for name in ("best", "last"):
        assert (tmp_path / "run" / name / "model.safetensors").is_file()
        assert (tmp_path / "finetuned" / name / "video.json").is_file()
    assert (tmp_path / "finetuned" / "curves.png").is_file() and (tmp_path / "finetuned" / "failures.jsonl").read_text() == ""
