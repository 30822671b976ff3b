"""`vtn extract` with several --backbone: one decode pass, one ordinary cache per backbone (each with its own
preprocessing), each bitwise the cache that backbone alone writes; a pass interrupted midway resumes into the same,
running and writing each backbone only where its cache lacks the video."""

import numpy as np
import pytest

import vtn.extract.pipeline as pipeline
from tests.cli_runner import run_vtn
from tests.extract.test_resume import assert_same_contents
from vtn.store import CacheWriter, open_cache

# Two tiny timm models whose preprocessing differs in every way: 160 px bilinear, mean 0.5 / 224 px bicubic, ImageNet.
BACKBONES = ["test_resnet", "mobilenetv3_small_050"]
ARGS = ["--random-init", "--num-frames", "3", "--batch-size", "4", "--workers", "1", "--quiet",
        "--set", "runtime.commit_every=0"]
SEVERAL = [arg for name in BACKBONES for arg in ("--backbone", name)]


@pytest.fixture(scope="module")
def alone(videos, tmp_path_factory):
    """Each backbone's cache of the val videos, extracted alone."""
    root = tmp_path_factory.mktemp("alone")
    for name in BACKBONES:
        run_vtn("extract", videos / "val", "--out", root / name, "--backbone", name, *ARGS, check_rc=0)
    return root


def assert_same_cache(a, b):
    """Same videos, bitwise the same features, and the same attributes but the creation time."""
    assert_same_contents(a, b)
    attrs_a, attrs_b = open_cache(str(a)).attrs, open_cache(str(b)).attrs
    assert {k: v for k, v in attrs_a.items() if k != "created_at"} == {k: v for k, v in attrs_b.items() if k != "created_at"}


def test_several_backbones_decode_once_into_caches_equal_to_each_alone(videos, alone, tmp_path, vtn, monkeypatch):
    decoded = []

    class CountingPool(pipeline.DecodePool):
        def __init__(self, jobs, *args, **kwargs):
            decoded.extend(vid for vid, _ in jobs)
            super().__init__(jobs, *args, **kwargs)

    monkeypatch.setattr(pipeline, "DecodePool", CountingPool)
    out = tmp_path / "multi"
    proc = vtn("extract", videos / "val", "--out", out, *SEVERAL, *ARGS, check_rc=0)
    assert "extracted 4 videos, 12 frames" in proc.stderr and f"into 2 caches in {out}" in proc.stderr
    assert sorted(decoded) == sorted(open_cache(str(alone / BACKBONES[0])).ids)  # each video decoded once
    for name in BACKBONES:
        assert_same_cache(alone / name, out / f"{name}.zarr")
    a, b = (open_cache(str(out / f"{name}.zarr")).attrs["backbone"]["preprocessing"] for name in BACKBONES)
    assert (a["input_size"], a["interpolation"], a["mean"][0]) == ([160, 160], "bilinear", 0.5)
    assert (b["input_size"], b["interpolation"], b["mean"][0]) == ([224, 224], "bicubic", 0.485)
    # Each cache is an ordinary one: `vtn extract --backbone NAME` alone resumes it with nothing to do.
    proc = vtn("extract", videos / "val", "--out", out / f"{BACKBONES[1]}.zarr", "--backbone", BACKBONES[1], *ARGS,
               check_rc=0)
    assert "extracted 0 videos" in proc.stderr and "4 already in the cache" in proc.stderr


def test_an_interrupted_pass_resumes_into_the_caches_of_each_alone(videos, alone, tmp_path, vtn, monkeypatch):
    adds, real_add = [], CacheWriter.add

    def add(self, vid, *args, **kwargs):
        if stop_at is not None and len(adds) == stop_at:
            raise KeyboardInterrupt  # Ctrl-C after 3 of the 8 (video, cache) writes
        adds.append((self.url, vid))
        return real_add(self, vid, *args, **kwargs)

    monkeypatch.setattr(CacheWriter, "add", add)
    out = tmp_path / "multi"
    stop_at = 3
    vtn("extract", videos / "val", "--out", out, *SEVERAL, *ARGS, check_rc=130)
    before = {name: set(open_cache(str(out / f"{name}.zarr")).ids) for name in BACKBONES}
    assert sum(map(len, before.values())) == 3
    in_both = len(before[BACKBONES[0]] & before[BACKBONES[1]])
    stop_at, first = None, list(adds)
    proc = vtn("extract", videos / "val", "--out", out, *SEVERAL, *ARGS, check_rc=0)
    assert f"{4 - in_both} videos" in proc.stderr and f"{in_both} already in every cache" in proc.stderr
    # The re-run wrote only the 5 (video, cache) pairs the caches lacked, none twice.
    assert len(adds) == 8 and len(set(adds)) == 8 and set(first) <= set(adds)
    for name in BACKBONES:
        assert_same_cache(alone / name, out / f"{name}.zarr")


def test_several_backbones_refuse_one_weights_file_and_a_cache_as_the_folder(videos, alone, tmp_path, vtn):
    proc = vtn("extract", videos / "val", "--out", tmp_path / "m", *SEVERAL, "--weights", tmp_path / "w.safetensors",
               check_rc=2)
    assert "--weights" in proc.stderr and "one weights file fits one backbone" in proc.stderr
    proc = vtn("extract", videos / "val", "--out", alone / BACKBONES[0], *SEVERAL, *ARGS, check_rc=2)
    assert "is a feature cache" in proc.stderr and str(alone / BACKBONES[0]) in proc.stderr
    proc = vtn("extract", videos / "val", "--out", tmp_path / "m", *SEVERAL, "--backbone", BACKBONES[0], *ARGS,
               check_rc=2)
    assert f"--backbone {BACKBONES[0]}: given twice" in proc.stderr
    assert not np.any([p.exists() for p in (tmp_path / "m").glob("*")])


@pytest.mark.slow
def test_bench_extract_backbones_prints_each_run_and_the_pass(tmp_path, vtn):
    """`vtn bench extract --backbones`: one row per separate run and one for the pass, every time positive, decoding's
    share of each a fraction, and the ratio it is judged by."""
    import re

    proc = vtn("bench", "extract", "--backbones", ",".join(BACKBONES), "--videos", "2", "--image-size", "32",
               "--batch-size", "8", "--workers", "1", "--workdir", tmp_path, check_rc=0)
    out = proc.stdout
    decode = float(re.search(r"^decode only\s+([0-9.]+) s\s+(\d+) frames", out, re.M).group(1))
    separate = {n: float(re.search(rf"^separate {n}\s+([0-9.]+) s\s+peak\s+(\d+) MiB", out, re.M).group(1))
                for n in BACKBONES}
    total, share = re.search(r"^separate runs\s+([0-9.]+) s\s+in all; decoding (\d+)% of it", out, re.M).groups()
    together, ratio, goal, pass_share = re.search(
        r"^one pass\s+([0-9.]+) s\s+([0-9.]+)x the separate runs \(goal <= ([0-9.]+)x.*decoding (\d+)% of it",
        out, re.M).groups()
    assert decode > 0 and all(s > 0 for s in separate.values()) and float(together) > 0
    assert float(total) == pytest.approx(sum(separate.values()), abs=0.2)
    assert float(ratio) == pytest.approx(float(together) / float(total), abs=0.01)
    assert 0 <= int(share) <= 100 and 0 <= int(pass_share) <= 100 and 0 < float(goal) <= 1.1  # whole percents
    assert re.search(r"^peak memory\s+\d+ MiB one pass, [0-9.]+x the largest separate", out, re.M)
    assert sorted(p.name for p in (tmp_path / "together").iterdir()) == [f"{n}.zarr" for n in sorted(BACKBONES)]


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_layers_cache_the_chosen_blocks_and_the_last_is_the_ordinary_cache(videos, tmp_path, vtn, name):
    """`--layers`: the pooled output of chosen blocks, concatenated; the last block alone is bitwise the model's own
    output ([CLS] after the final norm for a ViT, the average-pooled last stage for a ResNet)."""
    args = [videos / "val", "--backbone", name, "--random-init", "--image-size", "32", "--num-frames", "2",
            "--workers", "0", "--quiet"]
    vtn("extract", *args, "--out", tmp_path / "plain", check_rc=0)
    vtn("extract", *args, "--out", tmp_path / "last", "--layers", "-1", check_rc=0)
    vtn("extract", *args, "--out", tmp_path / "two", "--layers", "-1,-2", check_rc=0)
    plain, last, two = (open_cache(str(tmp_path / n)) for n in ("plain", "last", "two"))
    d = plain.feature_dim
    assert last.feature_dim == d and two.feature_dim > d and two.attrs["backbone"]["layers"] == [-1, -2]
    for vid in plain.ids:
        features = plain.features(vid)
        assert np.array_equal(last.features(vid), features)
        assert np.array_equal(two.features(vid)[:, :d], features)  # the blocks in the order given
        assert not np.array_equal(two.features(vid)[:, d:2 * d], features)
    proc = vtn("extract", *args, "--out", tmp_path / "bad", "--layers", "-1,99", check_rc=2)
    assert "--layers -1,99" in proc.stderr and "give distinct indices" in proc.stderr
