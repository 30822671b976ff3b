"""The command line as a user meets it: no abbreviated flags, unknown flags named by their subcommand with the
closest flags, --quiet on every long job, and messages and listings that say what they are."""

import argparse

import numpy as np
import pytest

from vtn.cli import build_parser, main
from vtn.errors import UserError


def _parsers(parser):
    """Every parser under `vtn`: the top level, each subcommand and each of theirs."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_no_parser_takes_abbreviations():
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 15 and all(not p.allow_abbrev for p in parsers)


def test_an_abbreviated_flag_is_refused_with_the_subcommands_usage_and_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "cache", "--out", "run", "--epoch", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("usage: vtn train ") and "vtn train: error: unrecognized arguments: --epoch 3" in err
    assert "--epoch: did you mean --epochs?" in err


def test_a_misspelt_flag_of_a_nested_command_names_that_command(capsys):
    with pytest.raises(SystemExit):
        main(["store", "info", "cache", "--jsn"])
    err = capsys.readouterr().err
    assert err.startswith("usage: vtn store info ") and "--jsn: did you mean --json?" in err


@pytest.mark.parametrize("command", [["predict", "v.mp4", "--model", "run"], ["evaluate", "run", "--cache", "c"],
                                     ["probe", "cache"]])
def test_every_long_job_takes_quiet(command):
    assert build_parser().parse_args([*command, "--quiet"]).quiet


def test_a_still_image_given_to_predict_is_refused_unless_asked_for(tmp_path):
    from PIL import Image

    from vtn.evaluate.predict import entries_of

    png = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(png)
    renamed = tmp_path / "clip.mp4"  # a JPEG under a video's name
    Image.new("RGB", (8, 8)).save(renamed, format="JPEG")
    for path, kind in ((png, "PNG"), (renamed, "JPEG")):
        with pytest.raises(UserError, match=f"{path.name}: a {kind} image, not a video.*--images"):
            entries_of(path)
    assert [e.path for e in entries_of(png, images=True)[0]] == [png]


def test_a_cache_given_where_a_run_is_expected_suggests_a_run_folder(tmp_path):
    from vtn.temporal.checkpoint import locate

    cache = tmp_path / "clips.zarr"
    cache.mkdir()
    (cache / "zarr.json").write_text("{}")
    with pytest.raises(UserError) as e:
        locate(cache)
    message = str(e.value)
    assert "a feature cache, not a training run" in message
    assert f"vtn train {cache} --out {tmp_path / 'clips-run'}" in message and f"--out {cache})" not in message


def test_store_info_quotes_class_names_so_spaces_do_not_make_more_classes():
    from vtn.store.cli import _wrap_names

    names = ["playing guitar", "riding a bike", "cooking, outdoors", "swimming"]
    lines = _wrap_names(names, width=40)
    assert lines == ['"playing guitar", "riding a bike",', '"cooking, outdoors", "swimming"']


def test_sweep_says_why_no_run_is_batched():
    from vtn.temporal.batched import unbatchable
    from vtn.temporal.settings import TrainConfig

    cfg = TrainConfig()
    assert cfg.model.dropout and unbatchable(cfg).startswith("dropout is on (model.dropout=")
    from vtn.config import merge

    off = merge(cfg, {"model": {"dropout": 0.0, "attention_dropout": 0.0, "head_dropout": 0.0}})
    assert unbatchable(off).startswith("the default length")  # each run may stop early on its own val
    assert unbatchable(merge(off, {"optim": {"steps": 10}})) is None


def test_training_on_a_cache_still_being_written_says_so(tmp_path):
    from vtn.store import CacheWriter, open_cache
    from vtn.temporal.splits import still_writing

    url = str(tmp_path / "cache.zarr")
    with CacheWriter(url, feature_dim=4, class_names=["a"], commit_every=0) as w:
        for i in range(3):
            w.add(f"v{i}.mp4", np.ones((5, 4)), np.arange(5) / 5, np.arange(5), label=0, split="train")
        note = still_writing(open_cache(url))
        assert "a writer is still adding videos" in note and "uses the 3 videos committed" in note
    assert still_writing(open_cache(url)) is None
