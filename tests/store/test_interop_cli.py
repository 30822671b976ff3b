import csv
import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import zarr
from store_helpers import CLASSES, D, feats

from vtn.cli import main
from vtn.store import CacheWriter, StoreError, open_cache
from vtn.store.interop import export_h5, import_features


def test_export_then_import_h5_round_trip(make_cache, tmp_path):
    url, videos = make_cache(12)
    h5 = tmp_path / "f.h5"
    assert main(["store", "export", url, "--out", str(h5)]) == 0
    with h5py.File(h5) as f:
        vid, length = videos[0][0], videos[0][1]
        assert np.array_equal(f[vid][()], feats(vid, length))
        assert np.array_equal(f[vid].attrs["timestamps"], np.arange(length) / 12.5)
        assert json.loads(f.attrs["vtn_cache_attrs"])["backbone"] == {"name": "test"}
    back = str(tmp_path / "back.zarr")
    assert main(["store", "import", str(h5), "--out", back]) == 0
    a, b = open_cache(url), open_cache(back)
    assert sorted(a.ids) == sorted(b.ids) and b.class_names == CLASSES and b.attrs["backbone"] == {"name": "test"}
    for vid in a.ids:
        va, vb = a.video(vid), b.video(vid)
        assert np.array_equal(va.features.view(np.uint16), vb.features.view(np.uint16))
        assert np.array_equal(va.timestamps, vb.timestamps) and np.array_equal(va.frame_indices, vb.frame_indices)
        assert (va.label, va.split, va.num_frames) == (vb.label, vb.split, vb.num_frames)


def _npy_folder(tmp_path, n=6):
    root = tmp_path / "npy"
    rows = []
    for i in range(n):
        vid = f"{'ab'[i % 2]}/sub dir/v{i}"
        (root / vid).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / f"{vid}.npy", feats(vid, 5 + i).astype(np.float32))
        rows.append((vid, ["jump", "walk"][i % 2], "val" if i == 0 else "train"))
    return root, rows


def test_import_npy_folder_with_labels(tmp_path):
    root, rows = _npy_folder(tmp_path)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="", encoding="utf-8-sig") as f:  # with a BOM, as spreadsheets save it
        csv.writer(f).writerows([("id", "label", "split"), *rows])
    url = str(tmp_path / "c.zarr")
    assert import_features(root, url, str(labels), fps=2.0, progress=False) == 6
    c = open_cache(url)
    assert c.class_names == ["jump", "walk"]
    v = c.video("a/sub dir/v0")
    assert np.array_equal(v.features, feats("a/sub dir/v0", 5)) and v.split == "val" and v.label == 0
    assert np.array_equal(v.timestamps, np.arange(5) / 2.0)
    assert import_features(root, url, str(labels), progress=False) == 0  # re-run: everything already there


def test_import_refuses_bad_arrays_and_keeps_what_it_wrote(tmp_path):
    root, _ = _npy_folder(tmp_path)
    np.save(root / "b" / "zz_bad.npy", np.full((4, D), np.nan, np.float32))
    url = str(tmp_path / "c.zarr")
    with pytest.raises(StoreError, match="'b/zz_bad'.*NaN"):
        import_features(root, url, progress=False)
    assert len(open_cache(url)) == 6  # the good ones before it are committed
    np.save(root / "b" / "zz_bad.npy", np.zeros((4, 3, 2), np.float32))
    with pytest.raises(StoreError, match=r"'b/zz_bad' has shape \[4, 3, 2\]"):
        import_features(root, url, progress=False)


def test_import_labels_errors(tmp_path):
    root, rows = _npy_folder(tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(f"{vid},{lab}" for vid, lab, _ in rows[1:]))
    with pytest.raises(StoreError, match="no row for id 'a/sub dir/v0'"):
        import_features(root, str(tmp_path / "c.zarr"), str(labels), progress=False)
    labels.write_text("x,1\nx,2\n")
    with pytest.raises(StoreError, match="labels.csv:2: duplicate id 'x'"):
        import_features(root, str(tmp_path / "d.zarr"), str(labels), progress=False)
    labels.write_bytes("id,label\nvidéo,1\n".encode("latin-1"))
    with pytest.raises(StoreError, match="labels.csv: not UTF-8 text"):
        import_features(root, str(tmp_path / "e.zarr"), str(labels), progress=False)


def test_import_unknown_label_from_h5_classes(make_cache, tmp_path):
    url, videos = make_cache(3)
    h5 = tmp_path / "f.h5"
    export_h5(url, h5, progress=False)
    labels = tmp_path / "l.csv"
    labels.write_text("\n".join(f"{v[0]},{'dance' if i == 1 else 'left'}" for i, v in enumerate(videos)))
    with pytest.raises(StoreError, match=f"id '{videos[1][0]}' has unknown label 'dance'"):
        import_features(h5, str(tmp_path / "x.zarr"), str(labels), progress=False)


def test_info_and_verify_cli(make_cache, capsys, tmp_path):
    url, videos = make_cache(8)
    assert main(["store", "info", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["videos"] == 8 and info["feature_dim"] == D and info["dtype"] == "float16"
    assert info["splits"]["val"]["videos"] == sum(v[3] == "val" for v in videos)
    assert info["frames"] == sum(v[1] for v in videos) and info["files"] > 0
    assert main(["store", "info", url]) == 0
    assert "backbone" in capsys.readouterr().out
    assert main(["store", "verify", url, "--quiet"]) == 0
    assert "clean" in capsys.readouterr().out
    assert main(["store", "verify", str(tmp_path)]) == 2
    assert "not a vtn cache" in capsys.readouterr().err
    assert main(["store", "import", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "z.zarr")]) == 2


def test_info_prints_the_class_names(tmp_path, capsys):
    url = str(tmp_path / "c.zarr")
    names = [f"class_{i:03d}" for i in range(120)]
    CacheWriter(url, feature_dim=D, class_names=names).close()
    assert main(["store", "info", url]) == 0
    out = capsys.readouterr().out
    assert '"class_000", "class_001"' in out and '"class_049"' in out and "class_050" not in out
    assert "... and 70 more" in out
    assert max(len(line) for line in out.splitlines() if "class_0" in line) <= 110  # wrapped, not one long line
    assert main(["store", "info", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"] == names


def test_info_into_a_closed_pipe_ends_quietly(make_cache):
    # `vtn store info CACHE | head -1` with head already gone: no BrokenPipeError traceback or message.
    url, _ = make_cache(3)
    proc = subprocess.Popen([sys.executable, "-m", "vtn", "store", "info", url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes anything (its imports take far longer)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("kind, match", [
    ("object", r"bad\.npy: not a numeric array in \.npy format \(Object arrays cannot be loaded when allow_pickle=False\)"),
    ("text", r"bad\.npy: not a numeric array in \.npy format"),
    ("empty", r"bad\.npy: not a numeric array in \.npy format"),
    ("npz", r"bad\.npy: an \.npz archive, not an \.npy array"),
    ("strings", r"'a/bad' holds <U5 values, expected numbers"),
])
def test_import_refuses_a_npy_that_is_not_numbers_naming_it(tmp_path, capsys, kind, match):
    # Before: a ValueError or TypeError traceback (an object array, a pickle or text file named .npy, strings).
    root = tmp_path / "npy"
    (root / "a").mkdir(parents=True)
    np.save(root / "a" / "good.npy", np.ones((3, D), np.float32))
    bad = root / "a" / "bad.npy"
    if kind == "object":
        np.save(bad, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    elif kind == "text":
        bad.write_text("these are not features\n")
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "npz":
        with bad.open("wb") as f:
            np.savez(f, x=np.ones((3, D)))
    else:
        np.save(bad, np.array([["hello"] * D] * 3))
    assert main(["store", "import", str(root), "--out", str(tmp_path / "c.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vtn store: error: ") and re.search(match, err), err


def test_info_shows_labels_without_a_class_name(make_cache, capsys):
    # A label beyond class_names (written behind vtn's back): `vtn store info` failed with an IndexError.
    url, videos = make_cache(4)
    g = zarr.open_group(url, mode="r+")
    for table in [*(p for _, p in g["parts"].groups()), *(i for _, i in g["index"].groups())]:
        table["label"][0] = 7
    assert main(["store", "info", url]) == 0
    assert "without a class name: label 7 (1 video(s))" in capsys.readouterr().out
    assert main(["store", "info", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["videos_per_class"]["label 7 (no class name)"] == 1 and info["unnamed_labels"] == {"7": 1}


def test_import_is_refused_while_another_import_writes_the_same_cache(tmp_path):
    root, _ = _npy_folder(tmp_path)
    url = str(tmp_path / "c.zarr")
    import_features(root, url, progress=False)
    live = CacheWriter(url, feature_dim=D, share=(0, 1))  # the same import, still running
    with pytest.raises(StoreError, match="another writer is writing the same videos"):
        import_features(root, url, progress=False)
    live.close()
    assert import_features(root, url, progress=False) == 0
