import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from vtn.cli import main
from vtn.config import ConfigError, resolve, to_dict


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    name: Literal["adamw", "sgd"] = "adamw"


@dataclass(frozen=True)
class Job:
    windows: int | tuple[int, ...] = 18
    steps: int = 100
    out: str | None = None
    amp: bool = False
    optim: Optim = field(default_factory=Optim)


def test_yaml_then_sets_override_in_order(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 5\noptim:\n  lr: 0.1\n")
    cfg = resolve(Job, cfg_file, ["optim.name=sgd", "windows=[8, 16]", "optim.lr=2", "amp=true"])
    assert cfg == Job(windows=(8, 16), steps=5, amp=True, optim=Optim(lr=2.0, name="sgd"))
    assert to_dict(cfg)["windows"] == [8, 16]
    assert resolve(Job, None, ["windows=32"]).windows == 32
    assert resolve(Job, None, ["optim.lr=1e-3"]).optim.lr == 0.001  # YAML 1.1 alone would read a string


@pytest.mark.parametrize("item, match", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("stepz=1", "unknown config key 'stepz'"),
    ("steps=1.5", "steps: expected an integer, got 1.5"),
    ("optim.name=adam", r"optim.name: 'adam' is not one of \['adamw', 'sgd'\]"),
    ("amp=maybe", "amp: expected true/false"),
    ("windows=[1, x]", "windows"),
    ("steps", "--set expects key=value"),
])
def test_bad_overrides_name_the_key(item, match):
    with pytest.raises(ConfigError, match=match):
        resolve(Job, None, [item])


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        resolve(Job, tmp_path / "none.yaml")
    (tmp_path / "l.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        resolve(Job, tmp_path / "l.yaml")


def test_cli_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("store", "extract", "train", "evaluate", "demo", "bench"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    for what in ("store", "extract", "temporal"):
        assert what in out


def test_help_imports_no_heavy_library():
    # `vtn --help` must stay instant: stage CLIs import torch, timm, zarr only inside the command that runs.
    code = "import sys; from vtn.cli import build_parser; build_parser(); print(sorted({'torch', 'timm', 'zarr', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ranged_fields_are_checked_wherever_a_value_is_set(tmp_path):
    from vtn.config import merge, ranged

    @dataclass(frozen=True)
    class Section:
        rate: float = ranged(0.5, ge=0, lt=1)
        sizes: tuple[int, ...] = ranged((1, 2), ge=1)
        limit: int | None = ranged(None, gt=0)

    @dataclass(frozen=True)
    class Cfg:
        s: Section = field(default_factory=Section)

    assert resolve(Cfg, None, ["s.rate=0", "s.sizes=[3,4]", "s.limit=null"]) == Cfg(Section(0.0, (3, 4), None))
    for item, text in (("s.rate=1", "s.rate: 1.0 is out of range; it must be [0, 1)"),
                       ("s.sizes=[2,0]", "s.sizes: (2, 0) is out of range; it must be >= 1"),
                       ("s.limit=0", "s.limit: 0 is out of range; it must be > 0")):
        with pytest.raises(ConfigError, match=re.escape(text)):
            resolve(Cfg, None, [item])
    (tmp_path / "c.yaml").write_text("s:\n  rate: -0.5\n")
    with pytest.raises(ConfigError, match=re.escape("s.rate: -0.5 is out of range")):
        resolve(Cfg, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="s.limit"):
        merge(Cfg(), {"s": {"limit": -1}})


def test_job_config_applies_recipe_size_file_sets_then_flags_by_one_table(tmp_path):
    from argparse import Namespace

    from vtn.config import VALUE, job_config

    recipes = {"default": Job(), "long": Job(steps=1000)}
    sizes = {"wide": Optim(lr=0.5)}  # "model" here is the optim section: any section can be sized
    flags = {"lr": "optim.lr", "fast": {"steps": 1, "optim.name": "sgd"}, "windows": {"windows": VALUE}}
    (tmp_path / "c.yaml").write_text("steps: 7\n")

    def args(**kw):
        return Namespace(**{"recipe": None, "model": None, "config": None, "sets": [], "lr": None, "fast": False,
                            "windows": None, **kw})

    @dataclass(frozen=True)
    class Sized:
        steps: int = 100
        model: Optim = field(default_factory=Optim)

    assert job_config(Job, args(), flags, recipes=recipes) == Job()
    assert job_config(Job, args(recipe="long"), flags, recipes=recipes).steps == 1000
    assert job_config(Sized, args(model="wide"), {}, sizes=sizes).model == Optim(lr=0.5)
    got = job_config(Job, args(recipe="long", config=str(tmp_path / "c.yaml"), sets=["steps=9", "optim.lr=2"],
                               lr=3.0, windows=[4, 8]), flags, recipes=recipes)
    assert got == Job(windows=(4, 8), steps=9, optim=Optim(lr=3.0))  # the file, then --set, then the flags
    assert job_config(Job, args(fast=True), flags) == Job(steps=1, optim=Optim(name="sgd"))  # a flag, two keys
    # --resume with no settings: None (the run's saved config); with any, the resolved config.
    assert job_config(Job, args(resume=True), flags) is None
    assert job_config(Job, args(resume=True, lr=1.0), flags) == Job(optim=Optim(lr=1.0))
    assert job_config(Job, args(), flags, base=Job(steps=3)).steps == 3


def test_fields_checked_together_may_change_in_separate_sets():
    """--set model.hidden_size=64 --set model.num_heads=4: each alone would not divide; together they do."""
    from vtn.temporal.settings import TrainConfig

    cfg = resolve(TrainConfig, None, ["model.hidden_size=64", "model.num_heads=4", "model.attention_window=[4, 8]",
                                      "model.num_layers=2"])
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.windows) == (64, 4, (4, 8))
    with pytest.raises(ConfigError, match="model.dropout"):
        resolve(TrainConfig, None, ["model.dropout=1.5"])
