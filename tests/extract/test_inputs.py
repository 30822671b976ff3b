"""Inputs as people give them: CSV manifests (absolute paths from a work directory, with and without --root; columns
by header name; split names) and folders (layouts, stray videos, symlink loops, unreadable folders); setting ranges."""

import os

import pytest

from vtn.cli import main
from vtn.extract.inputs import InputError, discover
from vtn.store import open_cache

BACKBONE = ["--backbone", "resnet18", "--image-size", "32", "--random-init", "--num-frames", "2", "--workers", "0",
            "--no-progress"]  # the older spelling of --quiet: scripts that use it keep working
A = "train/left_to_right_red_first/0000.mp4"
B = "val/right_to_left_green_first/0000.mp4"


def test_absolute_paths_from_a_work_dir_with_and_without_root(videos, tmp_path, vtn):
    work = tmp_path / "work"
    work.mkdir()
    (work / "list.csv").write_text(f"path,label,split\n{videos / A},ltr,train\n{videos / B},rtl,val\n")
    vtn("extract", work / "list.csv", "--out", tmp_path / "c1", *BACKBONE, check_rc=0)
    cache = open_cache(str(tmp_path / "c1"))
    # No --root: ids are relative to the deepest folder the videos share, which is recorded with the cache.
    assert sorted(cache.ids) == [A, B] and cache.attrs["root"] == str(videos)
    assert (cache.video(A).split, cache.video(B).split) == ("train", "val")

    vtn("extract", work / "list.csv", "--out", tmp_path / "c2", "--root", videos.parent, *BACKBONE, check_rc=0)
    cache = open_cache(str(tmp_path / "c2"))
    assert sorted(cache.ids) == [f"{videos.name}/{A}", f"{videos.name}/{B}"]
    assert cache.attrs["root"] == str(videos.parent)


def test_a_folder_keeps_its_own_ids_and_refuses_root(videos):
    entries, _, root = discover(videos / "val")
    assert root == (videos / "val").resolve() and B.removeprefix("val/") in [e.id for e in entries]
    with pytest.raises(InputError, match="--root applies to a .csv manifest"):
        discover(videos / "val", root=videos)


def test_a_manifest_next_to_its_videos_keeps_ids_relative_to_its_folder(videos, tmp_path):
    # Relative paths, and absolute ones under the CSV's folder: the ids existing caches were made with.
    (tmp_path / "videos").symlink_to(videos)
    (tmp_path / "list.csv").write_text(f"videos/{A},ltr\n{tmp_path / 'videos' / B},rtl\n")
    entries, _, root = discover(tmp_path / "list.csv")
    assert [e.id for e in entries] == [f"videos/{A}", f"videos/{B}"] and root == tmp_path.resolve()


def test_a_path_outside_root_is_refused_naming_the_line_and_both_paths(videos, tmp_path, vtn):
    (tmp_path / "list.csv").write_text(f"{videos / A},ltr\n{videos / B},rtl\n")
    proc = vtn("extract", tmp_path / "list.csv", "--out", tmp_path / "c", "--root", videos / "train", *BACKBONE,
               check_rc=2)
    assert f"list.csv:2: {videos / B} is outside --root {videos / 'train'}" in proc.stderr


def test_two_videos_with_one_id_are_refused_naming_both(videos, tmp_path, vtn):
    # The same file twice: once through a symlinked folder, once by its real path. Under --root (the link) both
    # become the same id.
    (tmp_path / "link").symlink_to(videos)
    (tmp_path / "list.csv").write_text(f"{tmp_path / 'link' / A},ltr\n{videos / A},ltr\n")
    proc = vtn("extract", tmp_path / "list.csv", "--out", tmp_path / "c", "--root", tmp_path / "link", *BACKBONE,
               check_rc=2)
    assert (f"list.csv:2: '{videos / A}' and '{tmp_path / 'link' / A}' (line 1) would both have the video id '{A}'"
            in proc.stderr)
    # Two spellings of one relative path.
    (tmp_path / "rel.csv").write_text(f"link/{A},ltr\n./link/{A},ltr\n")
    proc = vtn("extract", tmp_path / "rel.csv", "--out", tmp_path / "c", *BACKBONE, check_rc=2)
    assert f"rel.csv:2: './link/{A}' and 'link/{A}' (line 1) would both have the video id 'link/{A}'" in proc.stderr


def _tree(videos, root, rels):
    """A folder holding links to one real video at each relative path."""
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(videos / A)
    return root


def test_a_folder_symlink_loop_is_refused_naming_the_link(videos, tmp_path, vtn):
    src = _tree(videos, tmp_path / "src", ["c1/a.mp4", "c2/b.mp4"])
    (src / "c1" / "up").symlink_to("..")  # os.walk(followlinks=True) went round it: 2 videos became 82
    proc = vtn("extract", src, "--out", tmp_path / "c", *BACKBONE, check_rc=2)
    assert f"{src / 'c1' / 'up'}: a symbolic link leads to {src}, which is already read" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "c").exists()
    # Two links to one folder would list its videos twice, under two ids and two labels.
    (src / "c1" / "up").unlink()
    (src / "c3").symlink_to(src / "c1")
    with pytest.raises(InputError, match=f"{src / 'c3'}: a symbolic link leads to {src / 'c1'}"):
        discover(src)
    (src / "c3").unlink()
    assert [e.id for e in discover(src)[0]] == ["c1/a.mp4", "c2/b.mp4"]


def test_a_stray_video_that_breaks_the_folder_layout_is_refused_naming_it(videos, tmp_path, vtn):
    # Class folders plus one top-level video: every video became unlabelled.
    src = _tree(videos, tmp_path / "src", ["jump/a.mp4", "run/b.mp4", "stray.mp4"])
    proc = vtn("extract", src, "--out", tmp_path / "c", *BACKBONE, check_rc=2)
    assert f"{src}: refused: stray.mp4 lies outside the folder's layout class/video" in proc.stderr
    assert not (tmp_path / "c").exists()
    # train/ and val/ plus extra/x.mp4: the classes became extra, train, val.
    src = _tree(videos, tmp_path / "split", ["train/jump/a.mp4", "val/run/b.mp4", "extra/x.mp4", "val/y.mp4"])
    with pytest.raises(InputError, match=r"refused: extra/x.mp4, val/y.mp4 lie outside the folder's layout "
                                         r"split/class/video"):
        discover(src)


def test_an_unreadable_class_folder_is_refused_naming_it(videos, tmp_path, vtn, monkeypatch):
    src = _tree(videos, tmp_path / "src", ["jump/a.mp4", "run/b.mp4"])
    locked = str(src / "run")
    os.chmod(locked, 0)
    try:
        if not os.access(locked, os.R_OK):
            message = vtn("extract", src, "--out", tmp_path / "c", *BACKBONE, check_rc=2).stderr
        else:  # root reads it anyway: refuse the listing as the kernel does for everyone else
            real = os.scandir

            def scandir(path="."):
                if os.fspath(path) == locked:
                    raise PermissionError(13, "Permission denied", locked)
                return real(path)

            monkeypatch.setattr(os, "scandir", scandir)
            with pytest.raises(InputError) as refused:
                discover(src)
            message = str(refused.value)
    finally:
        os.chmod(locked, 0o755)
    assert f"{locked}: cannot read this folder (Permission denied)" in message
    assert not (tmp_path / "c").exists()


def test_a_relative_path_leaving_the_manifests_folder_is_refused_not_re_rooted(videos, tmp_path, vtn):
    (tmp_path / "videos").symlink_to(videos)
    (tmp_path / "list.csv").write_text(f"videos/{A},ltr\n../../../../etc/passwd,x\n")
    proc = vtn("extract", tmp_path / "list.csv", "--out", tmp_path / "c", *BACKBONE, check_rc=2)
    assert "list.csv:2: '../../../../etc/passwd' leads outside the manifest's folder" in proc.stderr
    assert not (tmp_path / "c").exists()
    # An absolute path outside beside relative ones would move the ids of the relative ones.
    (tmp_path / "mixed.csv").write_text(f"videos/{A},ltr\n{videos / B},rtl\n")
    with pytest.raises(InputError, match=f"mixed.csv:2: {videos / B} lies outside the manifest's folder .* while "
                                         f"line 1 lists 'videos/{A}'"):
        discover(tmp_path / "mixed.csv")
    # Absolute paths that share no folder but / are refused rather than given ids relative to /.
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "abs.csv").write_text(f"{videos / A},ltr\n/etc/passwd,x\n")
    with pytest.raises(InputError, match="share no folder but / .*line 2: /etc/passwd"):
        discover(tmp_path / "work" / "abs.csv")


def test_manifest_columns_are_read_by_their_header_names(videos, tmp_path, vtn):
    (tmp_path / "videos").symlink_to(videos)
    (tmp_path / "lp.csv").write_text(f"label,path\nltr,videos/{A}\nrtl,videos/{B}\n")
    entries, classes, _ = discover(tmp_path / "lp.csv")
    assert classes == ["ltr", "rtl"] and [(e.label, e.split) for e in entries] == [(0, "train"), (1, "train")]
    (tmp_path / "ps.csv").write_text(f"path,split\nvideos/{A},val\n")  # the split column became the labels
    entries, classes, _ = discover(tmp_path / "ps.csv")
    assert classes == [] and [(e.label, e.split) for e in entries] == [(-1, "val")]
    (tmp_path / "kind.csv").write_text(f"path,label,kind\nvideos/{A},ltr,x\n")
    with pytest.raises(InputError, match="kind.csv:1: the header names the columns path, label, kind"):
        discover(tmp_path / "kind.csv")
    (tmp_path / "semi.csv").write_text(f"path;label;split\nvideos/{A};ltr;train\n")
    proc = vtn("extract", tmp_path / "semi.csv", "--out", tmp_path / "c", *BACKBONE, check_rc=2)
    assert "semi.csv:1: one column holding 'path;label;split': manifest columns are separated by ','" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_split_names_are_known_or_mapped_and_empty_labels_are_unlabelled(videos, tmp_path, vtn):
    (tmp_path / "videos").symlink_to(videos)
    (tmp_path / "list.csv").write_text(f"videos/{A},ltr,Train\nvideos/{B},,validation\n")
    entries, classes, _ = discover(tmp_path / "list.csv")
    assert classes == ["ltr"] and [(e.label, e.split) for e in entries] == [(0, "train"), (-1, "val")]
    src = _tree(videos, tmp_path / "src", ["Training/jump/a.mp4", "VALID/run/b.mp4", "test/run/c.mp4"])
    assert [e.split for e in discover(src)[0]] == ["train", "val", "test"]
    (tmp_path / "tset.csv").write_text(f"videos/{A},ltr,train\nvideos/{B},rtl,tset\n")
    proc = vtn("extract", tmp_path / "tset.csv", "--out", tmp_path / "c", *BACKBONE, check_rc=2)
    assert "tset.csv:2: unknown split 'tset'; split names are train, val, test" in proc.stderr
    assert not (tmp_path / "c").exists()
    (src / "test").rename(src / "tset")
    with pytest.raises(InputError, match="'tset' is not a split name"):
        discover(src)


def test_image_size_out_of_range_is_refused_before_anything_is_written(videos, tmp_path, vtn):
    proc = vtn("extract", videos / "val", "--out", tmp_path / "c", *BACKBONE, "--image-size", "0", check_rc=2)
    assert "backbone.image_size (--image-size): 0 is out of range; it must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "runtime.batch_size (--batch-size): 0 is out of range; it must be >= 1"),
    (["--timeout", "0"], "runtime.timeout (--timeout): 0.0 is out of range; it must be > 0"),
    (["--image-size", "-5"], "backbone.image_size (--image-size): -5 is out of range; it must be >= 1"),
    (["--set", "runtime.timeout=-1"], "runtime.timeout (--timeout): -1.0 is out of range; it must be > 0"),
    (["--set", "runtime.chunk_mb=0"], "runtime.chunk_mb: 0 is out of range; it must be >= 1"),
])
def test_extraction_settings_out_of_range_are_refused_naming_the_option(videos, tmp_path, capsys, flags, message):
    assert main(["extract", str(videos / "val"), "--out", str(tmp_path / "c"), *BACKBONE, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
