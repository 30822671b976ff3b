"""What users see must not change when the code behind it is reorganised: the `--help` of every command and the
files (and the keys inside them) that extract, train, evaluate, finetune and sweep write. Both are compared
with tests/golden/; after a deliberate change, VTN_GOLDEN=write pytest tests/test_contract.py rewrites them
(and the diff shows in review)."""

import argparse
import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from vtn.cli import build_parser, main

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("VTN_GOLDEN") == "write":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} is missing; VTN_GOLDEN=write writes it"
    assert text == path.read_text(), f"{name} differs from {path}; if the change is deliberate, VTN_GOLDEN=write"


def helps(parser: argparse.ArgumentParser, name: str = "vtn"):
    """(command, --help text) of the parser and of every subcommand under it."""
    yield name, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from helps(p, f"{name} {sub}")


def test_help_of_every_command_is_unchanged(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal's width
    text = "".join(f"==== {name}\n{h}\n" for name, h in helps(build_parser()))
    check_golden("help.txt", text)


def keys(path: Path) -> str:
    """The shape of a file a job writes, without its values (times and losses vary)."""
    def flat(d, prefix=""):
        return [k for key, v in d.items() for k in (flat(v, f"{prefix}{key}.") if isinstance(v, dict) and v
                                                     else [prefix + str(key)])]

    if path.suffix == ".yaml":
        return " ".join(sorted(flat(yaml.safe_load(path.read_text()))))
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return " ".join(sorted(data)) if isinstance(data, dict) else type(data).__name__
    if path.suffix == ".jsonl":
        first = path.read_text().splitlines()[:1]
        return " ".join(sorted(json.loads(first[0]))) if first else ""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return " ".join(next(csv.reader(f), []))
    return ""


def listing(root: Path) -> str:
    return "".join(f"  {p.relative_to(root)} {keys(p)}".rstrip() + "\n"
                   for p in sorted(root.rglob("*")) if p.is_file())


@pytest.mark.slow
def test_files_each_job_writes_are_unchanged(tmp_path):
    from vtn import synth

    videos = tmp_path / "videos"
    synth.make_dataset(videos, per_split={"train": 2, "val": 1}, classes=synth.CLASSES[:2], seconds=(1.0, 2.0), seed=3)
    cache, run, ft, sweep = (str(tmp_path / n) for n in ("cache", "run", "ft", "sweep"))
    clips = ["--frames", "4", "--stride", "2", "--quiet"]
    out = []
    assert main(["extract", str(videos), "--out", cache, "--backbone", "resnet18", "--weights", "random",
                 "--image-size", "32", "--fps", "8", "--workers", "0", "--quiet"]) == 0
    out.append("extract: " + " ".join(sorted(p.name for p in Path(cache).iterdir())) + "\n")
    assert main(["train", cache, "--out", run, "--model", "tiny", "--steps", "2", *clips]) == 0
    out.append("train:\n" + listing(Path(run)))
    assert main(["evaluate", run, "--cache", cache]) == 0
    out.append("train + evaluate:\n" + listing(Path(run)))
    assert main(["finetune", run, "--out", ft, "--videos", str(videos), "--epochs", "1", "--batch-size", "2",
                 "--workers", "0", *clips]) == 0
    out.append("finetune:\n" + listing(Path(ft)))
    assert main(["sweep", cache, "--out", sweep, "--model", "tiny", "--grid", "optim.lr=1e-3,3e-4", "--set",
                 "optim.steps=2", "--set", "data.clip_frames=4", "--set", "data.stride=2", "--quiet"]) == 0
    out.append("sweep:\n" + listing(Path(sweep)))
    check_golden("files.txt", "".join(out))
