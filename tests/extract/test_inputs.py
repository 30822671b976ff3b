"""CSV manifests as people write them: absolute paths listed from a work directory, with and without --root."""

import pytest

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
