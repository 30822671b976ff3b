"""`vtn bench long`: whole-video top-1 and [CLS]'s attention mass on the deciding events of each val video."""

import dataclasses
import json

import numpy as np
import pytest

from vtn.cli import main
from vtn.store import CacheWriter
from vtn.temporal.model import SIZES, VTN


def test_bench_long_prints_the_attention_mass_on_the_events_against_their_share(capsys, tmp_path):
    cache, run = str(tmp_path / "c.zarr"), tmp_path / "run"
    events = {}
    with CacheWriter(cache, feature_dim=16, class_names=["a", "b"]) as w:
        for v in range(4):  # 20 frames at 5 fps; events over frames [5, 10): a quarter of each video
            w.add(f"val/{v}.mp4", np.random.default_rng(v).standard_normal((20, 16)), np.arange(20) / 5,
                  np.arange(20), label=v % 2, split="val")
            events[f"val/{v}.mp4"] = [1.0, 2.0]
    (tmp_path / "events.json").write_text(json.dumps(events))
    VTN(dataclasses.replace(SIZES["tiny"], hidden_size=32, num_heads=2, feature_dim=16, num_classes=2)
        ).save_pretrained(run / "best")
    (run / "best" / "state.json").write_text("{}")  # what makes best/ a run's complete checkpoint
    assert main(["bench", "long", str(run), "--cache", cache, "--events", str(tmp_path / "events.json"),
                 "--checkpoints", "best"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[:2] == ["best", "4"] and float(row[2]) in (0.0, 0.25, 0.5, 0.75, 1.0)
    rollout, last, share = map(float, row[3:6])
    assert share == 0.25 and 0 < rollout < 1 and 0 < last < 1
    assert float(row[6]) == pytest.approx(rollout / share, abs=0.02)
    (tmp_path / "bad.json").write_text(json.dumps({"val/0.mp4": 1.0}))
    assert main(["bench", "long", str(run), "--cache", cache, "--events", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: not an events.json of make_order_dataset" in capsys.readouterr().err
    events.pop("val/3.mp4")
    (tmp_path / "events.json").write_text(json.dumps(events))
    assert main(["bench", "long", str(run), "--cache", cache, "--events", str(tmp_path / "events.json")]) == 2
    assert "no events for 1 of the val videos" in capsys.readouterr().err
