"""`vtn extract` end to end: features equal the backbone run directly on decord frames; labels, manifests, weights."""

import decord
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vtn import synth
from vtn.extract.backbone import Preprocess, create_backbone
from vtn.extract.sampling import SamplingConfig, sample
from vtn.store import open_cache

BACKBONE = ["--backbone", "resnet18", "--image-size", "64"]


def _direct(path, model, preprocess, cfg):
    """The reference: decord frames at the sampled indices, preprocessed, through the model in one batch."""
    vr = decord.VideoReader(str(path))
    ts = vr.get_frame_timestamp(np.arange(len(vr)))[:, 0].astype(np.float64)
    idx = sample(np.round(ts - ts[0], 6), cfg)
    frames = torch.from_numpy(vr.get_batch(idx.tolist()).asnumpy())
    with torch.inference_mode():
        return idx, model(preprocess(frames)).numpy()


def test_features_equal_the_backbone_on_decord_frames(videos, tmp_path, vtn):
    out = tmp_path / "cache"
    proc = vtn("extract", videos, "--out", out, *BACKBONE, "--random-init", "--fps", "6", "--batch-size", "8",
               "--workers", "2", check_rc=0)
    assert "extracted 12 videos" in proc.stderr and "0 failed" in proc.stderr
    # stderr is a pipe, as in a cluster job's log: the bar is drawn at start and end, not once per video.
    bar_lines = [line for line in proc.stderr.splitlines() if line.startswith("extract:")]
    assert 2 <= len(bar_lines) <= 3 and "12.0/12 videos" in bar_lines[-1] and "12 stored" in bar_lines[-1]
    cache = open_cache(str(out))
    assert cache.class_names == sorted(synth.CLASSES)
    assert sorted(cache.ids) == sorted(p.relative_to(videos).as_posix() for p in videos.rglob("*.mp4"))
    model, data_config, identity = create_backbone("resnet18", image_size=64)
    preprocess = Preprocess(data_config)
    attrs = cache.attrs
    assert attrs["backbone"]["weights_sha256"] == identity["weights_sha256"]
    assert attrs["backbone"]["preprocessing"]["input_size"] == [64, 64]
    assert set(attrs["versions"]) >= {"torch", "timm", "decord", "av", "zarr", "vtn"}
    assert attrs["config"]["sampling"]["fps"] == 6.0
    for vid in cache.ids:
        v = cache.video(vid)
        split, cls = vid.split("/")[:2]
        assert v.split == split and cache.class_names[v.label] == cls
        idx, feats = _direct(videos / vid, model, preprocess, SamplingConfig(mode="fps", fps=6))
        np.testing.assert_array_equal(v.frame_indices, idx)
        np.testing.assert_allclose(v.features.astype(np.float32), feats, rtol=2e-3, atol=2e-3)  # float16 storage


def test_preprocessing_matches_timm_eval_transform(videos):
    import timm
    from PIL import Image

    _, data_config, _ = create_backbone("mobilenetv3_small_050")
    frames = decord.VideoReader(str(next(videos.rglob("*.mp4")))).get_batch([0, 5]).asnumpy()
    ours = Preprocess(data_config)(torch.from_numpy(frames))
    transform = timm.data.create_transform(**data_config)
    theirs = torch.stack([transform(Image.fromarray(f)) for f in frames])
    assert ours.shape == theirs.shape == (2, 3, 224, 224)
    # On the CPU both resample uint8 in fixed point: equal up to rare one-grey-level roundings (1/255/std ~ 0.02).
    assert (ours - theirs).abs().mean() < 1e-3 and (ours - theirs).abs().max() < 0.02


def test_manifest_weights_file_and_unlabelled_rows(videos, tmp_path, vtn):
    model, _, _ = create_backbone("resnet18", seed=7)
    weights = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    rows = ["path,label,split", f"{videos}/train/left_to_right_red_first/0000.mp4,ltr,train",
            "../videos_link/val/right_to_left_green_first/0000.mp4,,val"]
    (tmp_path / "videos_link").symlink_to(videos)
    sub = tmp_path / "m"
    sub.mkdir()
    # The absolute path lies outside --root: refused, naming the row.
    (sub / "list.csv").write_text("\n".join(rows) + "\n")
    proc = vtn("extract", sub / "list.csv", "--out", tmp_path / "c0", "--root", sub, *BACKBONE, "--weights", weights,
               check_rc=2)
    assert "list.csv:2" in proc.stderr and "outside --root" in proc.stderr
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label,split\nvideos_link/train/left_to_right_red_first/0000.mp4,ltr,train\n"
                        "videos_link/val/right_to_left_green_first/0000.mp4,,val\n")
    out = tmp_path / "cache"
    vtn("extract", manifest, "--out", out, *BACKBONE, "--weights", weights, "--num-frames", "4", "--quiet", check_rc=0)
    cache = open_cache(str(out))
    assert cache.class_names == ["ltr"]
    a, b = cache.video("videos_link/train/left_to_right_red_first/0000.mp4"), cache.video("videos_link/val/right_to_left_green_first/0000.mp4")
    assert (a.label, a.split, b.label, b.split) == (0, "train", -1, "val")
    assert cache.attrs["backbone"]["weights"] == "file"
    loaded, data_config, identity = create_backbone("resnet18", weights=weights, image_size=64)
    assert cache.attrs["backbone"]["weights_sha256"] == identity["weights_sha256"]
    _, feats = _direct(videos / "train/left_to_right_red_first/0000.mp4", loaded, Preprocess(data_config),
                       SamplingConfig(mode="num_frames", num_frames=4))
    np.testing.assert_allclose(a.features.astype(np.float32), feats, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_other_sampling_on_existing_cache_is_refused_unless_overwrite(videos, tmp_path, vtn):
    out = tmp_path / "cache"
    src = videos / "val"
    vtn("extract", src, "--out", out, *BACKBONE, "--random-init", "--num-frames", "2", "--workers", "0", "--quiet", check_rc=0)
    proc = vtn("extract", src, "--out", out, *BACKBONE, "--random-init", "--num-frames", "3", "--quiet", check_rc=2)
    assert "sampling" in proc.stderr
    proc = vtn("extract", src, "--out", out, "--backbone", "resnet18", "--image-size", "32", "--random-init",
               "--num-frames", "2", "--quiet", check_rc=2)
    assert "backbone" in proc.stderr and "--overwrite" in proc.stderr
    proc = vtn("extract", src, "--out", out, *BACKBONE, "--random-init", "--num-frames", "2", "--quiet", check_rc=0)
    assert "4 already in the cache" in proc.stderr
    vtn("extract", src, "--out", out, *BACKBONE, "--random-init", "--num-frames", "3", "--overwrite", "--quiet",
        "--set", "runtime.batch_size=4", check_rc=0)
    assert open_cache(str(out)).lengths.tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("args,needle", [
    (["--backbone", "no_such_model_xyz", "--random-init"], "no_such_model_xyz"),
    (["--set", "sampling.evry=2"], "sampling.evry"),
    (["--every", "0", "--random-init"], "sampling.every"),
    (["--weights", "/nonexistent.safetensors"], "/nonexistent.safetensors"),
])
def test_usage_errors_exit_2_naming_the_culprit(videos, tmp_path, vtn, args, needle):
    proc = vtn("extract", videos / "val", "--out", tmp_path / "c", *args, check_rc=2)
    assert needle in proc.stderr


def test_missing_input_exits_2(tmp_path, vtn):
    proc = vtn("extract", tmp_path / "nope", "--out", tmp_path / "c", check_rc=2)
    assert "nope" in proc.stderr


@pytest.mark.slow
def test_compiled_backbone_gives_the_eager_features(videos, tmp_path, vtn):
    out = tmp_path / "cache"
    vtn("extract", videos / "val", "--out", out, *BACKBONE, "--random-init", "--num-frames", "5", "--compile",
        "--batch-size", "8", "--quiet", check_rc=0)
    cache = open_cache(str(out))
    assert cache.attrs["config"]["runtime"]["compile"] is True
    model, data_config, _ = create_backbone("resnet18", image_size=64)
    for vid in cache.ids:
        _, feats = _direct(videos / "val" / vid, model, Preprocess(data_config), SamplingConfig(mode="num_frames", num_frames=5))
        np.testing.assert_allclose(cache.video(vid).features.astype(np.float32), feats, rtol=2e-3, atol=2e-3)


def test_a_backbone_that_cannot_compile_is_a_clear_error():
    from vtn.extract.backbone import BackboneError, compile_backbone

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise ValueError("shape trouble")

    with pytest.raises(BackboneError, match="--compile failed.*shape trouble.*without --compile"):
        compile_backbone(Broken(), torch.zeros(2, 3, 8, 8), torch.autocast("cpu", enabled=False))


def _hub_cache(root, model_name: str, seed: int):
    """A local Hugging Face hub cache holding `model_name`'s default pretrained file (seeded random weights, with
    the classifier, as timm publishes them), laid out as huggingface_hub stores downloads; returns the model."""
    import timm

    torch.manual_seed(seed)
    published = timm.create_model(model_name)
    repo = root / f"models--{published.pretrained_cfg['hf_hub_id'].replace('/', '--')}"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in published.state_dict().items()},
              str(repo / "snapshots" / commit / "model.safetensors"))
    return published


def test_pretrained_weights_load_offline_from_the_local_hub_cache(videos, tmp_path, vtn):
    import os

    published = _hub_cache(tmp_path / "hub", "resnet18", seed=5)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "cache"
    vtn("extract", videos / "val", "--out", out, *BACKBONE, "--pretrained", "--num-frames", "3", "--quiet",
        env=env, check_rc=0)
    cache = open_cache(str(out))
    assert cache.attrs["backbone"]["weights"] == "timm-pretrained"
    model, data_config, _ = create_backbone("resnet18", image_size=64)
    model.load_state_dict({k: v for k, v in published.state_dict().items() if not k.startswith("fc.")})
    vid = cache.ids[0]
    _, feats = _direct(videos / "val" / vid, model, Preprocess(data_config), SamplingConfig(mode="num_frames", num_frames=3))
    np.testing.assert_allclose(cache.video(vid).features.astype(np.float32), feats, rtol=2e-3, atol=2e-3)

    # Weights that are not in the cache, offline: a usage error that says where they must be.
    proc = vtn("extract", videos / "val", "--out", tmp_path / "c2", "--backbone", "resnet34", "--pretrained",
               "--quiet", env=env, check_rc=2)
    assert "resnet34" in proc.stderr and "local Hugging Face hub cache" in proc.stderr


def test_manifest_from_a_spreadsheet_and_one_that_is_not_utf8(videos, tmp_path, vtn):
    src = "val/left_to_right_red_first/0000.mp4"
    (tmp_path / "videos").symlink_to(videos)
    # Excel's "CSV UTF-8": a byte-order mark and CRLF line ends.
    (tmp_path / "excel.csv").write_bytes(f"\ufeffpath,label,split\r\nvideos/{src},ltr,val\r\n".encode("utf-8"))
    vtn("extract", tmp_path / "excel.csv", "--out", tmp_path / "c", *BACKBONE, "--random-init", "--num-frames", "2",
        "--quiet", check_rc=0)
    cache = open_cache(str(tmp_path / "c"))
    assert cache.ids == [f"videos/{src}"] and cache.class_names == ["ltr"] and cache.video(cache.ids[0]).split == "val"
    (tmp_path / "latin1.csv").write_bytes("path,label\nvidéo.mp4,a\n".encode("latin-1"))
    proc = vtn("extract", tmp_path / "latin1.csv", "--out", tmp_path / "c2", *BACKBONE, "--random-init", check_rc=2)
    assert "latin1.csv" in proc.stderr and "UTF-8" in proc.stderr and "Traceback" not in proc.stderr
