"""TensorBoard: a run's event files (RUN/tb/) hold metrics.jsonl's values, the end-of-run figures and the HParams
view; `--no-tb` writes none; a sweep writes one event run per member."""

import json
from dataclasses import replace

import pytest

from test_train import TINY, make_cache
from vtn.cli import main

pytestmark = pytest.mark.tensorboard
event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the tb extra (pip install 'vtn[tb]') is not installed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("tb") / "cache", per_class={"train": 8, "val": 4})


def events(folder):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.IMAGES: 0})
    return acc.Reload()


def test_event_files_hold_the_values_of_metrics_jsonl(cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", cache, "--out", str(run), *TINY, "--epochs", "3", "--set", "run.eval_every=1",
                 "--quiet"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    acc = events(run / "tb")
    numeric = {k for k, v in records[0].items() if isinstance(v, (int, float)) and k != "step"}
    assert {"train_loss", "lr", "val_top1", "val_top5", "val_mean_class_accuracy", "val_loss"} <= numeric
    assert numeric <= set(acc.Tags()["scalars"])
    # Beyond metrics.jsonl: every group's learning rate, clips/s between records, the peak memory.
    assert [e.value for e in acc.Scalars("lr/group0")] == pytest.approx([r["lr"] for r in records])
    speeds = [(e.step, e.value) for e in acc.Scalars("clips_per_s")]
    assert [s for s, _ in speeds] == [r["step"] for r in records[1:]] and all(v > 0 for _, v in speeds)
    assert len(acc.Scalars("peak_memory_mib")) == len(records) and acc.Scalars("peak_memory_mib")[0].value > 10
    for key in numeric:
        logged = [(e.step, e.value) for e in acc.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-6)) for r in records], key
    assert {"curves", "confusion"} <= set(acc.Tags()["images"])
    hparams = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams  # the HParams view: the config with the best epoch's metrics
    assert b"optim.lr" in hparams["_hparams_/session_start_info"]


def test_no_tb_turns_the_events_off_in_train_sweep_and_finetune():
    from vtn.cli import build_parser
    from vtn.config import job_config
    from vtn.temporal.settings import FLAGS, TrainConfig

    for argv in (["train", "C", "--out", "R"], ["sweep", "C", "--out", "D"], ["finetune", "R", "--out", "R2"]):
        on, off = (build_parser().parse_args(argv + extra) for extra in ([], ["--no-tb"]))
        assert job_config(TrainConfig, on, FLAGS).run.tensorboard and not job_config(TrainConfig, off, FLAGS).run.tensorboard


def test_a_sweep_writes_one_event_run_per_member(cache, tmp_path, capsys):
    out = tmp_path / "sweep"
    sets = ["model.hidden_size=16", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=32",
            "model.attention_window=4", "data.clip_frames=8", "data.stride=2", "optim.steps=2", "model.dropout=0",
            "model.attention_dropout=0", "model.head_dropout=0"]  # no dropout: the members train batched
    assert main(["sweep", cache, "--out", str(out), *[x for s in sets for x in ("--set", s)],
                 "--grid", "optim.lr=1e-3,3e-3", "--quiet"]) == 0
    members = {p.parent.parent for p in out.glob("*/tb/events.*")}
    assert len(members) == 2
    for member in members:
        records = [json.loads(x) for x in (member / "metrics.jsonl").read_text().splitlines()]
        acc = events(member / "tb")
        assert [e.value for e in acc.Scalars("val_top1")] == [pytest.approx(r["val_top1"]) for r in records]
        assert "confusion" in acc.Tags()["images"]


def test_a_run_without_a_val_dataset_closes_with_curves_and_hparams(tmp_path):
    """As `vtn finetune` closes its events (its val videos are raw video, not a cache's split)."""
    from vtn.temporal.settings import RunSection, TrainConfig
    from vtn.temporal.tensorboard import open_board

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 4, "val_top1": 0.5}) + "\n")
    board = open_board(tmp_path, TrainConfig())
    import torch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    board.record({"epoch": 1, "step": 4, "val_top1": 0.5, "elapsed": 1.0, "note": "text is not a scalar"}, opt,
                 torch.device("cpu"))
    board.close({"epoch": 1, "val_top1": 0.5})
    acc = events(tmp_path / "tb")
    assert "note" not in acc.Tags()["scalars"] and [(e.step, e.value) for e in acc.Scalars("val_top1")] == [(4, 0.5)]
    assert "curves" not in acc.Tags()["images"]  # no curves.png in this folder to show
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert open_board(tmp_path, TrainConfig(run=RunSection(tensorboard=False))) is None


def test_resume_may_switch_tensorboard_but_no_setting_that_decides_the_steps(tmp_path):
    from vtn.errors import UserError
    from vtn.temporal.loop import resume_config, start_run_dir
    from vtn.temporal.settings import TrainConfig

    start_run_dir(tmp_path, TrainConfig(), 0)
    given = replace(TrainConfig(), run=replace(TrainConfig().run, tensorboard=False))
    assert resume_config(TrainConfig, tmp_path, given).run.tensorboard is False
    with pytest.raises(UserError, match="optim.lr"):
        resume_config(TrainConfig, tmp_path, replace(given, optim=replace(given.optim, lr=1.0)))
