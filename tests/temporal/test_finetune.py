"""`vtn finetune`: backbone + VTN as one model, trained end to end from raw video, starting from a stage-two run."""

import numpy as np
import pytest
import torch

from vtn.cli import main
from vtn import synth
from vtn.extract.decode import decode_video
from vtn.store import open_cache
from vtn.temporal.checkpoint import read_inputs
from vtn.temporal.data import model_inputs
from vtn.temporal.e2e import VideoVTN, rebuild_backbone, sampling_of
from vtn.temporal.model import VTN

EXTRACT = ["--backbone", "resnet18", "--image-size", "32", "--fps", "8", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def stage_two(tmp_path_factory):
    """Generated videos (2 classes, train and val), their resnet18 cache and a tiny stage-two run on it."""
    root = tmp_path_factory.mktemp("finetune")
    videos = root / "videos"
    synth.make_dataset(videos, per_split={"train": 2, "val": 1}, classes=synth.CLASSES[:2], seconds=(1.0, 2.0), seed=3)
    cache, run = str(root / "cache"), root / "run"
    assert main(["extract", str(videos), "--out", cache, "--weights", "random", *EXTRACT]) == 0
    assert main(["train", cache, "--out", str(run), "--model", "tiny", "--steps", "2", "--frames", "4",
                 "--stride", "2", "--quiet"]) == 0
    return videos, cache, run


def composed(run, device=torch.device("cpu")):
    inputs = read_inputs(run / "best")
    backbone, preprocess, bc, identity = rebuild_backbone(inputs, run / "best", device)
    vtn = VTN.from_pretrained(run / "best")
    video = {"backbone": identity, "backbone_config": {"name": bc.name, "weights": bc.weights,
                                                       "image_size": bc.image_size, "seed": bc.seed},
             "sampling": inputs["sampling"]}
    return VideoVTN.compose(vtn, backbone, preprocess, video).eval(), vtn.eval(), inputs


def test_composed_model_gives_the_cache_features_and_the_stage_two_logits(stage_two, tmp_path):
    videos, cache_url, run = stage_two
    model, vtn, inputs = composed(run)
    cache = open_cache(cache_url)
    for vid in cache.split_ids("val"):
        v = cache.video(vid)
        chunks = [c for c in decode_video(videos / vid, sampling_of(inputs)) if hasattr(c, "frames")]
        frames = torch.from_numpy(np.concatenate([c.frames for c in chunks]))  # [T, H, W, 3] uint8
        np.testing.assert_array_equal(np.concatenate([c.frame_indices for c in chunks]), v.frame_indices)
        with torch.no_grad():
            feats = model.frame_features(model.preprocess(frames))
        # The cache stores float16: equal within its rounding.
        np.testing.assert_allclose(feats.numpy(), v.features.astype(np.float32), rtol=2e-3, atol=2e-3)
        item = {"features": torch.from_numpy(v.features.astype(np.float32)), "positions": torch.from_numpy(v.frame_indices),
                "times": torch.from_numpy(v.timestamps).float(), "label": -1, "id": vid}
        from vtn.store import collate_clips

        batch = collate_clips([item])
        features, mask, positions = model_inputs(batch, vtn.config, torch.device("cpu"))
        with torch.no_grad():
            expected = vtn(features, mask, positions)
            got = model(frames[None], mask, positions)
            exact = vtn(feats[None], mask, positions)
        np.testing.assert_allclose(got.numpy(), exact.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-2, atol=1e-2)

    model.save_pretrained(tmp_path / "ckpt")
    back = VideoVTN.from_pretrained(tmp_path / "ckpt").eval()
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    assert any(k.startswith("backbone.") for k in back.state_dict()) and "cls_token" in back.state_dict()
    assert back.video["sampling"] == inputs["sampling"]


FT = ["--batch-size", "2", "--workers", "0", "--quiet"]


@pytest.mark.slow
def test_finetune_through_the_cli_records_and_skips_a_broken_video(stage_two, tmp_path, capsys, monkeypatch):
    import json
    import shutil

    videos, cache_url, run = stage_two
    mine = tmp_path / "videos"
    shutil.copytree(videos, mine)
    broken = sorted((mine / "train").rglob("*.mp4"))[0]
    broken.write_bytes(b"not a video at all" * 100)
    out = tmp_path / "ft"
    import vtn.temporal.finetune as finetune_job

    # Augmentation in training only: count its calls, and those made while evaluating.
    calls, evaluating = [], []
    real_augment, real_evaluate = finetune_job.augment_clip, finetune_job.evaluate_videos
    monkeypatch.setattr(finetune_job, "augment_clip", lambda *a: calls.append(bool(evaluating)) or real_augment(*a))

    def evaluate(*args):
        evaluating.append(1)
        try:
            return real_evaluate(*args)
        finally:
            evaluating.clear()

    monkeypatch.setattr(finetune_job, "evaluate_videos", evaluate)
    # The backbone frozen for all 4 steps: only encoder and head learn, and BatchNorm keeps its statistics.
    # With the memory bank: 2 of each clip's 4 frames decoded and run, the others' features from the bank.
    assert main(["finetune", str(run), "--out", str(out), "--videos", str(mine), "--epochs", "2",
                 "--set", "finetune.frozen_steps=4", "--set", "finetune.bank_frames=2",
                 "--set", "finetune.freeze_bn=true", *FT[:-1]]) == 3  # one failed
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    bad_id = str(broken.relative_to(mine))
    # Recorded once although the video is drawn in both epochs: known failures are not decoded again.
    captured = capsys.readouterr()
    assert [(f["id"], f["phase"]) for f in failures] == [(bad_id, "train")] and f"{bad_id} failed" in captured.out
    # The first line: what the provenance chose (freeze_bn was given); after the first step, the time it will take.
    assert captured.out.startswith("vtn finetune: the backbone is random-init, as the cache records: "
                                   "finetune.backbone_lr=10.0 (the backbone learns from scratch")
    assert "finetune.freeze_bn" not in captured.out.splitlines()[0]
    assert "the first step took" in captured.out and "min for the 4 steps, plus 2 evaluations" in captured.out
    assert (out / "curves.png").stat().st_size > 0 and "waiting for clips" in captured.out
    # Where the time went: the steps (counted by the clock as the loop ran them) apart from the rest.
    assert " s in 4 steps (" in captured.out and "checkpoints and the rest" in captured.out
    assert "peak=" in captured.err and "MiB" in captured.err  # the progress bar (not --quiet) shows peak memory
    assert calls == [False] * 6  # the 3 good train videos' clips in each of 2 epochs; none in the 2 evaluations
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["val_videos"] == 2 for r in records)
    # 4 train videos, 2 per step: 2 steps per epoch; the broken video's batch trained on its other clip.
    assert records[-1]["step"] == 4
    for name in ("best", "last"):
        assert {"config.json", "model.safetensors", "video.json", "inputs.json", "state.json"} <= {
            p.name for p in (out / name).iterdir()}
    tuned = VideoVTN.from_pretrained(out / "last")
    start, _, _ = composed(run)
    changed = [k for k, v in start.state_dict().items() if not torch.equal(v, tuned.state_dict()[k])]
    assert "cls_token" in changed and not any(k.startswith("backbone.") for k in changed)
    assert tuned.video["sampling"] == read_inputs(run / "best")["sampling"]


def test_defaults_follow_the_backbones_provenance(stage_two, tmp_path):
    from safetensors.torch import save_file

    from vtn.extract.backbone import create_backbone
    from vtn.temporal.finetune import FinetuneSection, provenance_defaults

    random = read_inputs(stage_two[2] / "best")["backbone"]  # what the cache recorded
    assert random["weights"] == "random-init"
    net, _, _ = create_backbone("resnet18", image_size=32, seed=5)
    save_file(net.state_dict(), str(tmp_path / "trained.safetensors"))
    trained = create_backbone("resnet18", weights=tmp_path / "trained.safetensors", image_size=32)[2]
    assert trained["weights"] == "file"
    ft, said = provenance_defaults(FinetuneSection(), random)
    assert (ft.backbone_lr, ft.encoder_lr, ft.freeze_bn) == (10.0, 10.0, False)
    assert "random-init" in said and "batch statistics" in said and "finetune.encoder_lr=10.0 (the encoder" in said
    ft, said = provenance_defaults(FinetuneSection(), trained)
    assert (ft.backbone_lr, ft.encoder_lr, ft.freeze_bn) == (0.1, 1.0, True) and "weights from a file" in said
    ft, said = provenance_defaults(FinetuneSection(), {"weights": "timm-pretrained"})
    assert (ft.backbone_lr, ft.encoder_lr, ft.freeze_bn) == (0.1, 1.0, True) and "pretrained" in said
    # What is given is kept, and only the rest is said to be chosen.
    ft, said = provenance_defaults(FinetuneSection(backbone_lr=0.5), random)
    assert (ft.backbone_lr, ft.encoder_lr, ft.freeze_bn) == (0.5, 10.0, False) and "backbone_lr" not in said
    ft, said = provenance_defaults(FinetuneSection(backbone_lr=0.5, encoder_lr=2.0, freeze_bn=True), random)
    assert (ft.backbone_lr, ft.encoder_lr, ft.freeze_bn) == (0.5, 2.0, True) and "as given" in said


def test_feature_std_floor_and_normalisation_following_the_features():
    from vtn.temporal.data import STD_FLOOR, normalising_scale

    std = torch.tensor([2e-4, 1.0, 1.0, 2.0, 0.0])
    scale = normalising_scale(std)
    # A dimension that barely varies is not blown up past 1 / STD_FLOOR of the median one; a constant one keeps 1.
    torch.testing.assert_close(scale, torch.tensor([STD_FLOOR, 1.0, 1.0, 2.0, 1.0]) * 5 ** 0.5)
    from vtn.runtime import Processes
    from vtn.temporal.finetune import track_features

    model = tiny_video_model(0.0)
    x = torch.randn(2, 3, 3, 32, 32)
    before = model.feature_mean.clone(), model.feature_scale.clone()
    model(x, None, torch.arange(3).expand(2, 3))
    feats = model.fresh_features  # [6, D]: the step's fresh features
    torch.testing.assert_close(feats, model.backbone(x.flatten(0, 1)).detach())
    track_features(model, feats, Processes())
    assert torch.equal(model.feature_mean, before[0])  # momentum 0: stage two's statistics, fixed
    model.feature_momentum = 0.5
    out = model(x, None, torch.arange(3).expand(2, 3))
    track_features(model, feats, Processes())  # between the forward and its backward, as in a step
    out.sum().backward()
    torch.testing.assert_close(model.feature_mean, 0.5 * before[0] + 0.5 * feats.mean(0))
    torch.testing.assert_close(model.feature_scale, 0.5 * before[1] + 0.5 * normalising_scale(feats.std(0)))
    kept = model.feature_mean.clone()
    model.backbone_frozen = True  # a frozen backbone's features do not move
    track_features(model, feats, Processes())
    track_features(model, None, Processes())
    assert torch.equal(model.feature_mean, kept)


def test_batchnorm_that_trains_sees_frames_of_many_clips_in_each_micro_batch(stage_two):
    model = composed(stage_two[2])[0]  # resnet18: BatchNorm
    model.set_memory(micro_batch=3, chunked=None)
    model.freeze_bn = False
    model.train()
    calls, received = [], []
    model.backbone.register_forward_hook(lambda m, args, out: calls.append((args[0][:, 0, 0, 0], out.detach())))
    model.input_proj.register_forward_pre_hook(lambda m, args: received.append(args[0].detach()))
    x = torch.arange(3 * 4, dtype=torch.float32).view(3, 4, 1, 1, 1).expand(3, 4, 3, 32, 32)  # frame k of clip b: 4b+k
    mask = torch.arange(4) < torch.tensor([[4], [2], [3]])
    model(x, mask, torch.arange(4).expand(3, 4))
    # In turn from each clip, not clip by clip (which would put one clip's frames in a micro-batch).
    assert [[int(v) // 4 for v in frames] for frames, _ in calls] == [[0, 1, 2], [0, 1, 2], [0, 2, 0]]
    by_frame = {int(v): f for frames, out in calls for v, f in zip(frames, out)}
    feats = received[0] * model.feature_scale + model.feature_mean  # [B, T, D]: what the encoder was given
    for b, k in mask.nonzero().tolist():  # each frame's feature in its own place
        torch.testing.assert_close(feats[b, k], by_frame[4 * b + k], rtol=1e-4, atol=1e-4)


def test_finetune_refuses_a_backbone_that_is_not_the_recorded_one(stage_two, tmp_path, capsys):
    import json
    import shutil

    _, _, run = stage_two
    fake = tmp_path / "run"
    shutil.copytree(run / "best", fake / "best")
    inputs = json.loads((fake / "best" / "inputs.json").read_text())
    recorded = inputs["backbone"]["weights_sha256"]
    inputs["backbone_config"]["seed"] += 1  # other random weights than the cache's
    (fake / "best" / "inputs.json").write_text(json.dumps(inputs))
    assert main(["finetune", str(fake), "--out", str(tmp_path / "ft"), *FT]) == 2
    err = capsys.readouterr().err
    built = err.split("weights_sha256 '")[1].split("'")[0]
    assert recorded in err and len(built) == 64 and built != recorded
    assert not (tmp_path / "ft").exists()


@pytest.mark.slow
def test_finetune_resumed_after_an_interruption_equals_an_uninterrupted_run(stage_two, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from test_train import interrupt_at

    _, _, run = stage_two
    # Step 0 with the backbone frozen, then all of it, BatchNorm updating its statistics.
    args = ["--steps", "3", "--set", "run.checkpoint_every=1", "--set", "finetune.freeze_bn=false",
            "--set", "finetune.frozen_steps=1", *FT]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["finetune", str(run), "--out", str(whole), *args]) == 0
    undo = interrupt_at(monkeypatch, 1)
    assert main(["finetune", str(run), "--out", str(parts), *args]) == 130
    assert "add --resume" in capsys.readouterr().err
    undo()
    assert main(["finetune", str(run), "--out", str(parts), *args]) == 2  # a run is there
    assert main(["finetune", str(run), "--out", str(parts), "--resume", "--quiet"]) == 0
    a, b = load_file(str(whole / "last" / "model.safetensors")), load_file(str(parts / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("backbone.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = composed(run)[0].state_dict()
    assert not torch.equal(start["backbone.conv1.weight"], a["backbone.conv1.weight"])
    assert not torch.equal(start["backbone.bn1.running_mean"], a["backbone.bn1.running_mean"])


def tiny_video_model(drop: float) -> VideoVTN:
    """A 2-block ViT at 32 px (dropout and drop-path `drop`) + a 2-layer VTN, all in train mode."""
    import timm

    from vtn.extract.backbone import Preprocess
    from vtn.temporal.model import VTNConfig

    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=2, drop_path_rate=drop,
                                 proj_drop_rate=drop)
    preprocess = Preprocess(timm.data.resolve_data_config({}, model=backbone))
    cfg = VTNConfig(feature_dim=192, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, attention_window=4,
                    max_positions=32, num_classes=3, dropout=drop, attention_dropout=drop, head_dropout=drop)
    return VideoVTN(cfg, backbone, preprocess, {}).train()


def loss_and_grads(model: VideoVTN, seed: int = 2, **controls):
    model.set_memory(**controls)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 3, 32, 32, generator=g)  # 3 clips of up to 7 preprocessed frames
    mask = torch.arange(7) < torch.tensor([[7], [5], [6]])
    positions = torch.where(mask, torch.arange(7) * 2, 0)
    torch.manual_seed(seed)  # the same dropout draws for every setting
    loss = torch.nn.functional.cross_entropy(model(x, mask, positions), torch.tensor([0, 2, 1]), reduction="sum")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_memory()
    return float(loss.detach()), grads


def assert_same(a, b, tol):
    assert a[0] == pytest.approx(b[0], rel=tol, abs=tol)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=tol, atol=tol, msg=k)


def test_memory_controls_give_plain_trainings_loss_and_gradients():
    # Without dropout (eval mode: the ViT has no BatchNorm), frames through the backbone in micro-batches (alone or
    # recomputed chunk by chunk) are plain training up to float summation order.
    model = tiny_video_model(0.2).eval()
    calls = []
    model.backbone.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    plain = loss_and_grads(model)
    assert_same(loss_and_grads(model, micro_batch=4), plain, 1e-5)
    assert calls == [18, 4, 4, 4, 4, 2]  # only the 18 real frames; then in micro-batches
    assert_same(loss_and_grads(model, micro_batch=4, chunked=True), plain, 1e-5)
    # With dropout and drop-path the recomputation replays the random state: the same masks as without it.
    model.train()
    plain, micro = loss_and_grads(model), loss_and_grads(model, micro_batch=4)
    assert_same(loss_and_grads(model, grad_checkpointing=True), plain, 1e-6)
    assert_same(loss_and_grads(model, micro_batch=4, chunked=True), micro, 1e-6)
    assert_same(loss_and_grads(model, micro_batch=4, chunked=True, grad_checkpointing=True), micro, 1e-6)
    with pytest.raises(AssertionError):  # the dropout is real: other draws give another loss
        assert_same(loss_and_grads(model, seed=3), plain, 1e-6)


def test_layer_decay_frozen_backbone_frozen_batchnorm_and_autocast(stage_two):
    import timm

    from vtn.temporal.finetune import backbone_groups

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=3)
    groups = backbone_groups(vit, 1.0, 0.5)
    assert [lr for _, lr in groups] == [0.125, 0.25, 0.5, 1.0]  # patch embedding, blocks 0, 1, 2 (+ final norm)
    names = {id(p): n for n, p in vit.named_parameters()}
    assert "patch_embed.proj.weight" in [names[id(p)] for p in groups[0][0]]
    assert {"blocks.2.attn.qkv.weight", "norm.weight"} <= {names[id(p)] for p in groups[-1][0]}
    assert sorted(names[id(p)] for ps, _ in groups for p in ps) == sorted(names.values())
    assert len(backbone_groups(vit, 1.0, 1.0)) == 1

    model = composed(stage_two[2])[0].train()  # resnet18: BatchNorm
    x = torch.randn(2, 3, 3, 32, 32)
    bn = model.backbone.bn1
    before = bn.running_mean.clone()
    positions = torch.arange(3).expand(2, 3)
    model.freeze_bn, model.backbone_frozen = True, True
    model.train()
    assert not bn.training and model.longformer.training
    model(x, None, positions).sum().backward()
    assert torch.equal(bn.running_mean, before)
    assert all(p.grad is None for p in model.backbone.parameters()) and model.cls_token.grad is not None
    model.freeze_bn, model.backbone_frozen = False, False
    model.train()
    model(x, None, positions).sum().backward()
    assert not torch.equal(bn.running_mean, before) and model.backbone.conv1.weight.grad is not None

    tiny = tiny_video_model(0.0).eval()
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        full = tiny(x, None, torch.arange(4).expand(2, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = tiny(x, None, torch.arange(4).expand(2, 4))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=0.05, rtol=0.05)


def test_memory_bank_fresh_frames_get_gradients_the_others_none():
    model = tiny_video_model(0.0).eval()
    calls = []
    model.backbone.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 3, 32, 32, generator=g).requires_grad_()  # every frame of 2 clips
    bank = torch.randn(2, 5, 192, generator=g).requires_grad_()  # stored features of every frame
    kept = bank.detach().clone()
    fresh = torch.zeros(2, 5, dtype=torch.bool)
    fresh[0, 1:3], fresh[1, 3:5] = True, True
    positions = torch.arange(5).expand(2, 5)
    model(x[fresh], None, positions, bank=bank, fresh=fresh).sum().backward()
    assert calls == [4]  # only the fresh frames went through the backbone
    per_frame = x.grad.flatten(2).abs().sum(-1)  # [2, 5]
    assert (per_frame[fresh] > 0).all() and (per_frame[~fresh] == 0).all()
    assert bank.grad is None and torch.equal(bank.detach(), kept)  # stored features: no gradient, not changed
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(model.fresh_features, model.backbone(x[fresh]))  # what goes back to the bank
        base = model(x[fresh], None, positions, bank=kept, fresh=fresh)
        stale = kept.clone()
        stale[fresh] += 1  # a fresh frame's stored feature is replaced by the new one
        torch.testing.assert_close(model(x[fresh], None, positions, bank=stale, fresh=fresh), base)
        stale = kept.clone()
        stale[~fresh] += 1  # the others' stored features are used
        assert not torch.allclose(model(x[fresh], None, positions, bank=stale, fresh=fresh), base)


def test_default_memory_controls_chunk_a_step_with_more_frames_than_one_micro_batch():
    from vtn.temporal.finetune import FinetuneSection, micro_batch_for

    ft = FinetuneSection()
    assert (ft.micro_batch, ft.chunked, ft.grad_checkpointing) == (None, None, False)
    assert micro_batch_for(ft, torch.device("cuda")) == 8 and micro_batch_for(ft, torch.device("cpu")) is None
    model = tiny_video_model(0.0).eval()
    calls = []
    # A pre-hook: the recomputation stops once it has what the backward pass needs, before forward hooks run.
    model.backbone.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    plain = loss_and_grads(model)
    calls.clear()
    # The default rule at micro_batch 4: the step's 18 real frames are 5 micro-batches, so each is run again in the
    # backward pass (chunked backprop), and the gradients are plain training's.
    auto = loss_and_grads(model, micro_batch=4, chunked=ft.chunked, grad_checkpointing=ft.grad_checkpointing)
    assert calls[:5] == [4, 4, 4, 4, 2] and sorted(calls[5:]) == [2, 4, 4, 4, 4]
    assert_same(auto, plain, 1e-5)
    calls.clear()
    loss_and_grads(model, micro_batch=18, chunked=None)  # one micro-batch: nothing to save, nothing run again
    assert calls == [18]


def test_finetune_progress_bar_shows_clips_per_second_and_peak_memory():
    import io
    import re

    from vtn.progress import progress_bar
    from vtn.temporal.finetune import memory_postfix
    from vtn.runtime import peak_memory

    cpu = torch.device("cpu")
    out = io.StringIO()
    low = peak_memory(cpu)
    bar = progress_bar(total=2, file=out, unit="step")
    bar.set_postfix(loss="0.693", clips_s="12", **memory_postfix(cpu), refresh=False)  # as loop.py's loop sets it
    bar.update()
    bar.close()
    high = peak_memory(cpu)
    text = out.getvalue()
    assert "loss=0.693" in text and "clips_s=12" in text
    shown = int(re.search(r"peak=(\d+)MiB", text).group(1))  # the process's resident-set high-water mark
    assert low >= 2**20 and round(low / 2**20) <= shown <= round(high / 2**20)


def test_augmentation_crops_all_frames_of_a_clip_alike_and_differs_between_items():
    from vtn.temporal.finetune import augment_clip

    # Frame k is a fixed random image plus k: the same crop of every frame differs only by k.
    image = np.random.default_rng(0).integers(0, 200, (1, 48, 64, 3), dtype=np.uint8)
    frames = image + np.arange(5, dtype=np.uint8)[:, None, None, None]  # [5, 48, 64, 3]
    crops = []
    for item in range(6):
        out = augment_clip(frames, np.random.default_rng((7, 0, item, 2)), (0.3, 0.8), flip=True)
        assert out.dtype == np.uint8 and len(out) == 5 and out.shape[1:3] != (48, 64)
        assert all(np.array_equal(out[k] - k, out[0]) for k in range(5))  # one crop (and flip) for the clip
        assert 0.3 * 48 * 64 * 0.9 <= out.shape[1] * out.shape[2] <= 0.8 * 48 * 64 * 1.1
        crops.append(out[0])
        # Reproducible from (seed, epoch, item): a resumed run draws the same crop.
        assert np.array_equal(augment_clip(frames, np.random.default_rng((7, 0, item, 2)), (0.3, 0.8), True), out)
    assert len({c.tobytes() for c in crops}) == 6  # other items, other crops
    # The flip is drawn after the crop: the same crop, mirrored half the time.
    same, mirrored = [], []
    for i in range(8):
        plain = augment_clip(frames, np.random.default_rng((7, 0, i, 2)), (0.3, 0.8), False)
        out = augment_clip(frames, np.random.default_rng((7, 0, i, 2)), (0.3, 0.8), True)
        same.append(np.array_equal(out, plain))
        mirrored.append(np.array_equal(out, plain[:, :, ::-1]))
    assert all(a or b for a, b in zip(same, mirrored)) and any(same) and any(mirrored)
    from vtn.temporal.finetune import FinetuneSection

    assert FinetuneSection().augment and not FinetuneSection().augment_flip


def test_compose_refuses_weights_that_do_not_fit_with_a_message():
    """Bad input to compose (a VTN's state dict with keys the composed model has not) is a UserError, not an
    assert that `python -O` would drop."""
    from vtn.errors import UserError

    model = tiny_video_model(0.0)
    vtn = VTN(model.config)
    vtn.register_buffer("stray", torch.zeros(1))
    with pytest.raises(UserError, match=r"unexpected \['stray'\]"):
        VideoVTN.compose(vtn, model.backbone, model.preprocess, {})
    assert VideoVTN.compose(VTN(model.config), model.backbone, model.preprocess, {}).video == {}


def test_finetune_finds_videos_by_the_recorded_root_takes_a_moved_cache_and_exits_3_on_missing_videos(
        stage_two, tmp_path, capsys, monkeypatch):
    """A cache made from a manifest with --root (its ids relative to the root, not to the manifest's folder), moved
    since the run was trained, fine-tuned from another folder with relative paths; one train video gone."""
    import json
    import shutil

    import zarr

    videos, cache_url, run = stage_two
    mine = tmp_path / "clips"
    shutil.copytree(videos, mine)
    gone = sorted((mine / "train").rglob("*.mp4"))[0]
    gone.unlink()
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "all.csv"  # the ids are not relative to its folder
    manifest.write_text("path,label\n")
    moved = tmp_path / "moved.zarr"
    shutil.copytree(cache_url, moved)
    zarr.open_group(str(moved), mode="r+").attrs.update(source=str(manifest), root=str(mine))
    lost = tmp_path / "lost_run"  # the run, recording a cache that is no longer there
    shutil.copytree(run, lost)
    inputs = json.loads((lost / "best" / "inputs.json").read_text())
    (lost / "best" / "inputs.json").write_text(json.dumps({**inputs, "cache": str(tmp_path / "gone.zarr")}))

    monkeypatch.chdir(tmp_path)
    args = ["--steps", "1", "--batch-size", "2", "--workers", "0", "--quiet"]
    assert main(["finetune", "lost_run", "--out", "a", *args]) == 2
    err = capsys.readouterr().err
    assert "gone.zarr" in err and "--cache" in err
    (tmp_path / "empty").mkdir()
    for wrong in ("empty", "nowhere"):  # a folder without the videos, a folder that does not exist
        assert main(["finetune", "lost_run", "--out", "a", "--cache", "moved.zarr", "--videos", wrong, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vtn finetune: error: {wrong}: ") and "--videos" in err, err
    zarr.open_group(str(moved), mode="r+").attrs.update(root=str(tmp_path / "empty"))
    assert main(["finetune", "lost_run", "--out", "a", "--cache", "moved.zarr", *args]) == 2
    err = capsys.readouterr().err
    assert "none of the 4 train videos" in err and str(manifest) in err  # names the folder the cache was made from
    assert not (tmp_path / "a").exists()

    zarr.open_group(str(moved), mode="r+").attrs.update(root=str(mine))
    assert main(["finetune", "lost_run", "--out", "a", "--cache", "moved.zarr", *args]) == 3  # as vtn extract
    failures = [json.loads(x) for x in (tmp_path / "a" / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == [gone.relative_to(mine).as_posix()]
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 1 and records[-1]["val_videos"] == 2
    assert json.loads((tmp_path / "a" / "best" / "inputs.json").read_text())["cache"] == str(moved)  # canonical


# Each rank of a 2-process run records the train videos it queues for decoding and, at the end, its weights.
TWO_RANK_HOOKS = """
import os, sys, torch
import vtn.temporal.finetune as ft
out, rank = os.environ["HOOK_DIR"], os.environ["RANK"]
real_pool, real_warning = ft.DecodePool, ft.diverged_warning
def pool(jobs, *args, **kwargs):
    with open(f"{out}/decoded{rank}.txt", "a") as f:
        f.write("".join(job[0] + "\\n" for job in jobs))
    return real_pool(jobs, *args, **kwargs)
def warning(loop):
    torch.save({k: v.detach().clone() for k, v in loop.model.state_dict().items()}, f"{out}/weights{rank}.pt")
    real_warning(loop)
ft.DecodePool, ft.diverged_warning = pool, warning
from vtn.cli import main
rc = main(sys.argv[1:])
with open(f"{out}/rc{rank}", "w") as f:
    f.write(str(rc))
sys.exit(0 if rc == 3 else rc)  # 3 (some videos failed) would make torchrun stop the other process
"""


@pytest.mark.slow
def test_finetune_on_two_processes_with_a_broken_video_on_one_of_them(stage_two, tmp_path):
    """2 processes, 1 clip each per step: in the broken video's steps its process has no clip. Every step still
    runs on both (no hang, the same weights), and the video is decoded once and recorded once."""
    import json
    import os
    import shutil
    import signal
    import subprocess
    import sys

    videos, cache_url, run = stage_two
    mine = tmp_path / "videos"
    shutil.copytree(videos, mine)
    broken = sorted((mine / "train").rglob("*.mp4"))[0]
    broken.write_bytes(b"not a video at all" * 100)
    bad_id = str(broken.relative_to(mine))
    hooks = tmp_path / "hooks.py"
    hooks.write_text(TWO_RANK_HOOKS)
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(hooks),
           "finetune", str(run), "--out", str(out), "--videos", str(mine), "--epochs", "4",
           "--set", "run.eval_every=4", "--set", "finetune.freeze_bn=true", *FT]  # BatchNorm on batch statistics
    # (the random-init default) would give each rank its own running statistics (only rank 0 saves them)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HOOK_DIR": str(tmp_path)})
    try:
        stdout, stderr = proc.communicate(timeout=150)  # the old code hung here
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert [(tmp_path / f"rc{r}").read_text() for r in range(2)] == ["3", "3"]  # both know a video failed
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 8  # 4 epochs of 2 steps
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["phase"]) for f in failures] == [(bad_id, "train")]
    decoded = [(tmp_path / f"decoded{r}.txt").read_text().split() for r in range(2)]
    assert sum(d.count(bad_id) for d in decoded) == 1  # one process tried it, once; the other never did
    assert all(len(d) > 0 for d in decoded)
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt") for r in range(2))
    start, _, _ = composed(run)
    assert any(not torch.equal(v, w0[k]) for k, v in start.state_dict().items())  # it trained
    for k, v in w0.items():
        assert torch.equal(v, w1[k]), k


@pytest.mark.slow  # two processes importing torch and decoding videos
def test_a_rank_failing_mid_finetuning_ends_both_ranks_within_seconds_with_its_message(stage_two, tmp_path):
    from fail_proc import check_failed_together, fail_together

    videos, _, run = stage_two
    check_failed_together(*fail_together(["finetune", str(run), "--out", str(tmp_path / "ft"), "--videos", str(videos),
                                         "--epochs", "4", "--set", "run.eval_every=4", *FT], tmp_path))


def test_frame_note_names_what_the_centre_crop_cuts_from_the_videos_frames():
    from vtn.extract.backbone import Preprocess, create_backbone
    from vtn.temporal.finetune import frame_note

    preprocess = Preprocess(create_backbone("resnet10t", image_size=64, seed=0)[1])
    kept = preprocess.attrs["crop_pct"] * 60 / 80
    # The video's size (a training crop of it may be square or not: what the run says is about the video).
    note = frame_note((60, 80), preprocess)
    assert "frames are 80x60" in note and f"middle {kept:.0%} of each frame's width" in note
    assert "height" in frame_note((80, 60), preprocess) and frame_note((72, 72), preprocess) is None


def test_a_backbone_whose_head_convolution_follows_the_pooling_composes_at_its_pooled_size():
    """MobileNetV3's pooled vector is 1024-D (head_hidden_size), not its num_features (288): extraction records
    1024 (extract/backbone.pooled_dim), so fine-tuning must take the same size."""
    import timm
    from vtn.extract.backbone import Preprocess
    from vtn.temporal.model import VTNConfig

    backbone = timm.create_model("mobilenetv3_small_050", num_classes=0)
    dim = backbone.eval()(torch.zeros(1, 3, 32, 32)).shape[1]
    cfg = VTNConfig(feature_dim=dim, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, num_classes=2)
    model = VideoVTN(cfg, backbone, Preprocess(timm.data.resolve_data_config({}, model=backbone)), {})
    assert model.backbone is backbone and dim != backbone.num_features


def test_a_backbone_of_several_blocks_composes_to_the_features_its_cache_holds(stage_two, tmp_path):
    """A cache extracted with `--layers` (blocks' pooled outputs concatenated) rebuilds that same backbone for
    fine-tuning: the composed model's frame features are the cached ones, of the blocks' summed width."""
    videos, _, _ = stage_two
    cache, run = str(tmp_path / "cache"), tmp_path / "run"
    assert main(["extract", str(videos), "--out", cache, "--weights", "random", "--layers", "-1,-2", *EXTRACT]) == 0
    assert main(["train", cache, "--out", str(run), "--model", "tiny", "--steps", "1", "--frames", "4", "--quiet"]) == 0
    model, _, inputs = composed(run)
    c = open_cache(cache)
    assert c.feature_dim == 512 + 256  # resnet18's last two stages
    v = c.video(c.split_ids("val")[0])
    chunks = [ch for ch in decode_video(videos / v.id, sampling_of(inputs)) if hasattr(ch, "frames")]
    with torch.no_grad():
        feats = model.frame_features(model.preprocess(torch.from_numpy(np.concatenate([ch.frames for ch in chunks]))))
    np.testing.assert_allclose(feats.numpy(), v.features.astype(np.float32), rtol=2e-3, atol=2e-3)
    # Its blocks recompute in the backward pass when asked (finetune.grad_checkpointing), to the same gradients.
    frames = model.preprocess(torch.from_numpy(chunks[0].frames[:2]))
    grads = []
    for on in (False, True):
        model.backbone.set_grad_checkpointing(on)
        model.zero_grad()
        model.frame_features(frames).square().sum().backward()
        grads.append([p.grad.clone() for p in model.backbone.parameters() if p.grad is not None])
    assert len(grads[1]) == len(grads[0]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # Fine-tuned, its backbone file rebuilds the same blocks for `vtn predict`.
    out = tmp_path / "ft"
    assert main(["finetune", str(run), "--out", str(out), "--videos", str(videos), "--steps", "1", *FT,
                 "--set", "finetune.grad_checkpointing=true"]) == 0
    assert read_inputs(out / "best")["backbone"]["layers"] == [-1, -2]
    assert main(["predict", str(videos / "val"), "--model", str(out), "--json", str(tmp_path / "p.jsonl"),
                 "--workers", "0"]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == len(c.split_ids("val"))
