"""The output-path rule (vtn/paths.py): --overwrite replaces only vtn's own output, never the input or anything else.

Every refusal goes through the CLI and checks that the message names the path and that every file is still
there, byte for byte.
"""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from vtn.cli import main
from vtn.errors import UserError
from vtn.paths import check_cache_out, check_run_dir
from vtn.store import CacheWriter, open_cache

FAST = ["--backbone", "resnet18", "--image-size", "32", "--random-init", "--num-frames", "2", "--workers", "0",
        "--device", "cpu", "--quiet"]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (or `root` itself) with its bytes."""
    root = Path(root)
    if root.is_file():
        return {".": root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, argv, path) -> str:
    """Run the CLI; it must exit 2 with a message naming `path`. Returns the message."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert str(path) in err, err
    return err


@pytest.fixture
def fake_videos(tmp_path):
    """A folder of files that look like videos by name (the refusals happen before any decode)."""
    root = tmp_path / "videos"
    for i, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        (root / cls / f"{i}.mp4").write_bytes(bytes(range(256)) * (i + 1))
    return root


def make_cache(url: str) -> None:
    with CacheWriter(url, feature_dim=4, class_names=["x"]) as w:
        w.add("v.mp4", np.ones((3, 4)), np.arange(3) / 2, np.arange(3), label=0)


# -- vtn extract -----------------------------------------------------------------------------------------

def test_extract_out_is_the_input_folder(fake_videos, tmp_path, capsys):
    before = snapshot(fake_videos)
    err = refused(capsys, ["extract", fake_videos, "--out", fake_videos, "--overwrite", *FAST], fake_videos)
    assert "is the input" in err
    assert snapshot(fake_videos) == before


def test_extract_out_contains_the_input(fake_videos, tmp_path, capsys):
    before = snapshot(tmp_path)
    err = refused(capsys, ["extract", fake_videos / "a", "--out", tmp_path, "--overwrite", *FAST], tmp_path)
    assert "contains the input" in err
    assert snapshot(tmp_path) == before


def test_extract_out_is_an_unrelated_folder(fake_videos, tmp_path, capsys):
    other = tmp_path / "some_folder"
    other.mkdir()
    (other / "thesis.txt").write_text("years of work")
    for flags in (["--overwrite"], []):
        err = refused(capsys, ["extract", fake_videos, "--out", other, *flags, *FAST], other)
        assert "not a vtn cache" in err
        assert snapshot(other) == {"thesis.txt": b"years of work"}


def test_extract_out_is_a_file(fake_videos, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for flags in (["--overwrite"], []):
        err = refused(capsys, ["extract", fake_videos, "--out", target, *flags, *FAST], target)
        assert "is a file" in err and "Traceback" not in err
        assert target.read_text() == "keep me"


def test_extract_csv_out_holds_listed_videos_or_the_manifest(fake_videos, tmp_path, capsys):
    manifest = tmp_path / "train.csv"
    manifest.write_text("path,label\nvideos/a/0.mp4,a\nvideos/b/1.mp4,b\n")
    before = snapshot(tmp_path)
    err = refused(capsys, ["extract", manifest, "--out", fake_videos / "b", "--overwrite", *FAST], fake_videos / "b")
    assert "contains the input" in err and "1.mp4" in err
    err = refused(capsys, ["extract", manifest, "--out", tmp_path, "--overwrite", *FAST], tmp_path)
    assert "contains the input" in err
    assert snapshot(tmp_path) == before


def test_extract_never_replaces_a_cache_inside_the_input_folder(fake_videos, capsys):
    inside = fake_videos / "cache.zarr"
    make_cache(str(inside))
    before = snapshot(fake_videos)
    err = refused(capsys, ["extract", fake_videos, "--out", inside, "--overwrite", *FAST], inside)
    assert "lies inside the input folder" in err
    assert snapshot(fake_videos) == before


# -- vtn store import / export -----------------------------------------------------------------------------

@pytest.fixture
def npy_folder(tmp_path):
    src = tmp_path / "npy"
    (src / "a").mkdir(parents=True)
    np.save(src / "a" / "x.npy", np.ones((3, 4), dtype=np.float32))
    return src


def test_import_out_is_the_source(npy_folder, capsys):
    before = snapshot(npy_folder)
    err = refused(capsys, ["store", "import", npy_folder, "--out", npy_folder, "--overwrite"], npy_folder)
    assert "is the input" in err
    assert snapshot(npy_folder) == before


def test_import_overwrite_refuses_a_folder_that_is_not_a_cache(npy_folder, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_bytes(b"\x00\x01")
    err = refused(capsys, ["store", "import", npy_folder, "--out", other, "--overwrite"], other)
    assert "--overwrite replaces only a vtn cache" in err
    assert snapshot(other) == {"data.bin": b"\x00\x01"}


def test_import_overwrite_replaces_a_cache(npy_folder, tmp_path, capsys):
    out = tmp_path / "c.zarr"
    make_cache(str(out))
    assert main(["store", "import", str(npy_folder), "--out", str(out), "--overwrite"]) == 0
    assert open_cache(str(out)).ids == ["a/x"]


def test_export_refuses_an_existing_file_unless_it_is_a_vtn_export(tmp_path, capsys):
    cache = tmp_path / "c.zarr"
    make_cache(str(cache))
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(5)
    before = snapshot(foreign)
    err = refused(capsys, ["store", "export", cache, "--out", foreign], foreign)
    assert "already exists" in err and "--overwrite" in err
    err = refused(capsys, ["store", "export", cache, "--out", foreign, "--overwrite"], foreign)
    assert "not an HDF5 file written by vtn store export" in err
    assert snapshot(foreign) == before
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    refused(capsys, ["store", "export", cache, "--out", text, "--overwrite"], text)
    assert text.read_text() == "not hdf5"
    refused(capsys, ["store", "export", cache, "--out", tmp_path], tmp_path)  # a folder
    mine = tmp_path / "mine.h5"
    assert main(["store", "export", str(cache), "--out", str(mine)]) == 0
    refused(capsys, ["store", "export", cache, "--out", mine], mine)
    assert main(["store", "export", str(cache), "--out", str(mine), "--overwrite"]) == 0
    with h5py.File(mine) as f:
        assert "vtn_cache_attrs" in f.attrs and list(f) == ["v.mp4"]


# -- remote URLs -----------------------------------------------------------------------------------------------

def test_remote_overwrite_replaces_only_a_vtn_cache(npy_folder):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/vtn-paths-test/other/report.csv", b"a,b\n")
    with pytest.raises(UserError, match=r"memory://vtn-paths-test/other: not a vtn cache"):
        check_cache_out("memory://vtn-paths-test/other", overwrite=True)
    with pytest.raises(UserError, match=r"memory://vtn-paths-test/other: not a vtn cache"):
        CacheWriter("memory://vtn-paths-test/other", feature_dim=4, overwrite=True)
    assert fs.cat("/vtn-paths-test/other/report.csv") == b"a,b\n"
    make_cache("memory://vtn-paths-test/cache")
    check_cache_out("memory://vtn-paths-test/cache", overwrite=True)
    check_cache_out("memory://vtn-paths-test/nothing-here", overwrite=True)


# -- run directories (vtn train / finetune call check_run_dir) ---------------------------------------------

def test_run_dir_rule(tmp_path):
    assert check_run_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_run_dir(tmp_path / "empty")
    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    (run / "config.yaml").write_text("x: 1\n")
    with pytest.raises(UserError, match=r"run: exists and is not a vtn run"):
        check_run_dir(run)  # a config.yaml that is not vtn's
    (run / "config.yaml").write_text("optim:\n  lr: 0.1\nrun:\n  seed: 0\n")
    check_run_dir(run)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"file: is a file"):
        check_run_dir(tmp_path / "file")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "config.yaml").write_text("not ours")  # a config.yaml alone does not make a vtn run
    with pytest.raises(UserError, match=r"photos: exists and is not a vtn run"):
        check_run_dir(other)


# -- every command that writes an output folder, through the CLI ------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small feature cache (2 classes, train and val) and a 1-step tiny stage-two run on it."""
    root = tmp_path_factory.mktemp("outputs")
    cache, run = root / "cache", root / "run"
    rng = np.random.default_rng(0)
    with CacheWriter(str(cache), feature_dim=4, class_names=["a", "b"]) as w:
        for split, n in (("train", 4), ("val", 2)):
            for c in range(2):
                for i in range(n):
                    w.add(f"{split}/{c}/{i}", rng.normal(size=(6, 4)) + c, np.arange(6) / 2, np.arange(6), label=c,
                          split=split)
    assert main(["train", str(cache), "--out", str(run), "--model", "tiny", "--steps", "1", "--frames", "4",
                 "--quiet"]) == 0
    return cache, run


def users_folders(tmp_path: Path) -> list[Path]:
    """Folders a user might give as --out by mistake: notes and a thesis in best/ (the names of a run's checkpoint),
    and an unrelated metrics.jsonl beside a config.yaml that is not vtn's."""
    notes = tmp_path / "notes"
    (notes / "best").mkdir(parents=True)
    (notes / "notes.txt").write_text("my notes")
    (notes / "best" / "thesis.txt").write_text("years of work")
    other = tmp_path / "metrics"
    other.mkdir()
    (other / "metrics.jsonl").write_text("loss 0.3 at step 10\n")
    (other / "config.yaml").write_text("optim: adam\nrun: 3\n")
    return [notes, other]


@pytest.mark.parametrize("command", ["train", "finetune", "sweep", "evaluate", "probe", "report"])
def test_every_command_that_writes_a_folder_refuses_a_users_folder(trained, tmp_path, command):
    cache, run = trained
    argv = {
        "train": lambda out: ["train", cache, "--out", out, "--model", "tiny", "--steps", "1", "--quiet"],
        "finetune": lambda out: ["finetune", run, "--out", out, "--steps", "1", "--workers", "0", "--quiet"],
        "sweep": lambda out: ["sweep", cache, "--out", out, "--grid", "optim.lr=1e-3,1e-2", "--model", "tiny",
                              "--set", "optim.steps=1", "--quiet"],
        "evaluate": lambda out: ["evaluate", run, "--cache", cache, "--out", out],
        "probe": lambda out: ["probe", cache, "--out", out],
        "report": lambda out: ["report", out],
    }[command]
    for folder in users_folders(tmp_path):
        before, entries = snapshot(folder), sorted(folder.rglob("*"))
        done = subprocess.run([sys.executable, "-m", "vtn", *map(str, argv(folder))], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"vtn {command}: error: {folder}: "), done.stderr
        assert "not" in lines[0] and "Traceback" not in done.stderr
        assert snapshot(folder) == before and sorted(folder.rglob("*")) == entries  # nothing changed, nothing added


def test_the_jobs_called_from_python_check_too(trained, tmp_path):
    """The CLI checks --out before torch loads; the jobs themselves (called from Python, or by vtn sweep) too."""
    from vtn.evaluate.run import evaluate
    from vtn.temporal.finetune import finetune
    from vtn.temporal.sweep import expand, sweep
    from vtn.temporal.settings import TrainConfig
    from vtn.temporal.loop import fit

    cache, run = trained
    notes, _ = users_folders(tmp_path)
    before = snapshot(notes)
    for job in (lambda: fit(str(cache), notes), lambda: finetune(run, notes),
                lambda: sweep(str(cache), notes, expand(TrainConfig(), [{}], 1)),
                lambda: evaluate(run, str(cache), out=notes)):
        with pytest.raises(UserError, match=f"{notes}: exists and is not"):
            job()
    assert snapshot(notes) == before


def test_each_command_writes_again_into_its_own_output(trained, tmp_path):
    """The rule recognises what each command wrote: a re-run (or an evaluation into a run) is not refused."""
    cache, run = trained
    check_run_dir(run)
    check_run_dir(run, "evaluation")  # vtn evaluate writes into the run by default
    check_run_dir(run, existing=True)  # vtn report
    with pytest.raises(UserError, match=r"new: does not exist"):
        check_run_dir(tmp_path / "new", existing=True)
    sweep = tmp_path / "sweep"
    (sweep / "empty").mkdir(parents=True)  # a run killed before its config
    (sweep / "results.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"sweep: exists and is not a vtn sweep"):
        check_run_dir(sweep, "sweep")  # result files alone, no run: not a sweep's
    import shutil

    shutil.copytree(run, sweep / "lr-0.001_seed-0")
    check_run_dir(sweep, "sweep")
    (sweep / "thesis.txt").write_text("x")
    with pytest.raises(UserError, match=r"sweep: exists and is not a vtn sweep"):
        check_run_dir(sweep, "sweep")
    ev = tmp_path / "ev"
    assert main(["evaluate", str(run), "--cache", str(cache), "--out", str(ev)]) == 0
    check_run_dir(ev, "evaluation")
    pr = tmp_path / "pr"
    assert main(["probe", str(cache), "--out", str(pr)]) == 0
    check_run_dir(pr, "probes")
    with pytest.raises(UserError, match=r"pr: exists and is not a vtn run"):
        check_run_dir(pr)


# -- the rule module stays light ---------------------------------------------------------------------------

def test_paths_imports_only_the_standard_library():
    code = "import sys, vtn.paths; print(sorted(m for m in ('torch', 'zarr', 'numpy', 'h5py') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_linked_video_is_compared_by_its_target(tmp_path):
    # The input folder holds a link to a video stored in `elsewhere`: replacing `elsewhere` would delete it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "real.mp4").write_bytes(b"video")
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "link.mp4").symlink_to(elsewhere / "real.mp4")
    with pytest.raises(UserError, match=r"elsewhere: contains the input .*link.mp4"):
        check_cache_out(str(elsewhere), inputs=[tmp_path / "videos", tmp_path / "videos" / "link.mp4"], overwrite=True)
    assert (elsewhere / "real.mp4").read_bytes() == b"video"
