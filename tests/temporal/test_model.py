"""VTN: every attention backend equals transformers' Longformer (outputs and gradients), checkpoints, errors,
export."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from vtn.config import ConfigError
from vtn.errors import UserError
from vtn.temporal import VTN, VTNConfig, frame_positions, preset
from vtn.temporal.attention import BACKENDS

D = 24  # feature dim != hidden size, so the input projection is exercised


def tiny(**kw) -> VTNConfig:
    base = dict(feature_dim=D, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                attention_window=16, max_positions=2048, num_classes=5)
    return VTNConfig(**{**base, **kw})


# The backends held to the reference `hf`: every registered one, so a new backend is tested by registering it.
BACKENDS_UNDER_TEST = [b for b in BACKENDS if b != "hf"]


def pair(config: VTNConfig, backend: str = "fast") -> tuple[VTN, VTN]:
    """(backend, hf) models with the same weights, perturbed away from the init so no term is trivially 0 or 1."""
    torch.manual_seed(0)
    fast = VTN(dataclasses.replace(config, backend=backend))
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf = VTN(dataclasses.replace(config, backend="hf"))
    hf.load_state_dict(fast.state_dict())
    return fast, hf


def batch(T: int):
    """Features, a ragged mask (full, about half, all but the last 3) and sparse frame-index positions."""
    B, g = 3, torch.Generator().manual_seed(T)
    features = torch.randn(B, T, D, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, T // 2 + 1:] = False
    mask[2, max(1, T - 3):] = False
    positions = (torch.arange(T) * 2).expand(B, T)  # every second frame of the source
    return features, mask, positions


def run(model: VTN, features, mask, positions):
    """Logits, [CLS] attentions and the gradients of a fixed random function of the logits."""
    model.zero_grad()
    x = features.clone().requires_grad_()
    logits, attentions = model(x, mask, positions, return_attention=True)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(logits.device)
    (logits * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logits.detach(), [a.detach() for a in attentions], x.grad, grads


def assert_same(fast: VTN, hf: VTN, features, mask, positions, atol=1e-4):
    lf, af, xf, gf = run(fast.eval(), features, mask, positions)
    lh, ah, xh, gh = run(hf.eval(), features, mask, positions)
    torch.testing.assert_close(lf, lh, atol=atol, rtol=0)
    for a, b in zip(af, ah, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    torch.testing.assert_close(xf, xh, atol=atol, rtol=0)
    assert gf.keys() == gh.keys()
    for name in gf:
        torch.testing.assert_close(gf[name], gh[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


W = 16
LENGTHS = [1, 2, W // 2 - 1, W // 2 + 1, W - 1, W + 1, 100, 1000]


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("windows", [(W, W), (4, W, 8)], ids=["equal", "unequal"])
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_fast_equals_hf(T, windows, backend):
    fast, hf = pair(tiny(num_layers=len(windows), attention_window=windows), backend)
    assert_same(fast, hf, *batch(T))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_checkpointing_gives_the_same_gradients(backend):
    """Every backend's `set_grad_checkpointing` recomputes its layers in the backward pass, changing nothing."""
    model = VTN(tiny(dropout=0.0, attention_dropout=0.0, head_dropout=0.0, backend=backend)).train()
    features, mask, positions = batch(40)
    plain = run(model, features, mask, positions)
    model.longformer.set_grad_checkpointing(True)
    again = run(model, features, mask, positions)
    torch.testing.assert_close(again[2], plain[2])
    for name in plain[3]:
        torch.testing.assert_close(again[3][name], plain[3][name], msg=lambda m: f"{name}: {m}")


def test_fast_equals_hf_in_train_mode_without_dropout():
    """The training-mode code paths (dropout calls with p = 0) compute the same function."""
    fast, hf = pair(tiny(dropout=0.0, attention_dropout=0.0, head_dropout=0.0))
    features, mask, positions = batch(40)
    torch.testing.assert_close(fast.train()(features, mask, positions), hf.train()(features, mask, positions),
                               atol=1e-4, rtol=0)


def test_large_window_short_clip_and_blocked_long_clip():
    """Dense (T fits one block) and blocked (many blocks of >= w/2 queries) paths at a large window."""
    fast, hf = pair(tiny(num_layers=1, attention_window=256))
    for T in (16, 300):
        assert_same(fast, hf, *batch(T))


def test_padding_frames_are_ignored():
    fast, _ = pair(tiny())
    features, mask, positions = batch(30)
    logits = fast.eval()(features, mask, positions)
    features2, positions2 = features.clone(), positions.clone()
    features2[~mask] = 1e3
    positions2 = positions2.masked_fill(~mask, -1)  # padding may carry any position
    torch.testing.assert_close(fast(features2, mask, positions2), logits, atol=1e-5, rtol=0)


def test_save_load_round_trip_across_backends(tmp_path):
    fast, _ = pair(tiny(attention_window=(4, 8), class_names=tuple("abcde")))
    fast.save_pretrained(tmp_path / "ckpt")
    features, mask, positions = batch(20)
    expected = fast.eval()(features, mask, positions)
    for backend in ("hf", "fast", None):
        loaded = VTN.from_pretrained(tmp_path / "ckpt", backend=backend).eval()
        assert loaded.config == dataclasses.replace(fast.config, backend=backend or "fast")
        torch.testing.assert_close(loaded(features, mask, positions), expected, atol=1e-4, rtol=0)
    # and back: an hf-built model's checkpoint loads into fast
    VTN.from_pretrained(tmp_path / "ckpt", backend="hf").save_pretrained(tmp_path / "ckpt2")
    torch.testing.assert_close(VTN.from_pretrained(tmp_path / "ckpt2").eval()(features, mask, positions), expected,
                               atol=1e-4, rtol=0)


def test_from_pretrained_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a VTN checkpoint"):
        VTN.from_pretrained(tmp_path)
    VTN(tiny()).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 32, "num_layerz": 2}')
    with pytest.raises(ConfigError, match="num_layerz"):
        VTN.from_pretrained(tmp_path)


def test_one_rule_finds_the_checkpoint_of_a_run(tmp_path):
    from vtn.temporal import checkpoint

    run = tmp_path / "run"
    with pytest.raises(UserError, match="neither a training run with a best/ checkpoint"):
        checkpoint.locate(run)
    checkpoint.write_model(run / "best.old", VTN(tiny()), {"epoch": 1}, {})  # a swap cut short: the previous copy
    assert checkpoint.locate(run) == run / "best.old"
    checkpoint.write_model(run / "best", VTN(tiny()), {"epoch": 2}, {})
    assert checkpoint.locate(run) == run / "best" and checkpoint.locate(run / "best") == run / "best"
    with pytest.raises(UserError, match="last/"):
        checkpoint.locate(run, "last")
    (run / "last").mkdir()  # no state.json: not a complete checkpoint
    with pytest.raises(UserError, match="last/"):
        checkpoint.locate(run, "last")


def test_load_model_checks_every_weight(tmp_path):
    from vtn.temporal.checkpoint import load_model

    VTN(tiny()).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a thing checkpoint .needs config.json, model.safetensors, extra.json"):
        load_model(tmp_path, VTNConfig, VTN, needs=("extra.json",), what="thing")
    with pytest.raises(UserError, match="weights do not match config.json"):
        load_model(tmp_path, VTNConfig, lambda c: torch.nn.Sequential(VTN(c)))
    with pytest.raises(UserError, match=r"missing \['head"):  # weights left out by `skip` are missing here
        load_model(tmp_path, VTNConfig, VTN, skip="head.")
    assert isinstance(load_model(tmp_path, VTNConfig, VTN), VTN)


def test_a_checkpoint_saved_before_a_field_existed_loads_as_the_model_it_was(tmp_path):
    import json

    old = tiny(temporal_conv=0, positions="index")
    VTN(old).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for field in ("temporal_conv", "positions", "view_stride"):  # written before they existed
        del config[field]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = VTN.from_pretrained(tmp_path)
    assert loaded.temporal_conv is None and loaded.config.positions == "index" and loaded.config.view_stride is None
    assert loaded.config == old


def test_same_backbone_is_one_definition():
    from vtn.temporal.checkpoint import BACKBONE_IDENTITY, backbone_differences

    a = {"name": "vit", "weights_sha256": "aa", "preprocessing": {"size": 224}, "feature_dim": 192}
    assert backbone_differences(a, {**a, "feature_dim": 7, "seed": 1}) == []  # only the identity keys count
    assert backbone_differences(a, {**a, "weights_sha256": "bb"}) == [("weights_sha256", "aa", "bb")]
    assert [k for k, _, _ in backbone_differences(a, None)] == list(BACKBONE_IDENTITY)


def test_input_errors_are_clear():
    model = VTN(tiny())
    features, mask, positions = batch(10)
    with pytest.raises(UserError, match=r"features \[batch, frames >= 1, 24\].*got \[3, 10, 512\]"):
        model(torch.randn(3, 10, 512), mask, positions)
    with pytest.raises(UserError, match="needs integer positions"):
        model(features, mask)
    with pytest.raises(UserError, match="needs integer positions"):
        model(features, mask, positions.float())
    with pytest.raises(UserError, match=r"must lie in \[0, 2048\).*got 0\..2048"):
        model(features, mask, positions.clone().index_fill_(1, torch.tensor([9]), 2048))


def test_positions_modes():
    index, seconds = torch.tensor([[0, 8, 16]]), torch.tensor([[0.0, 0.32, 0.64]])
    assert frame_positions(tiny(positions="index"), frame_index=index).tolist() == [[0, 8, 16]]
    assert frame_positions(tiny(positions="time", position_rate=25.0), timestamps=seconds).tolist() == [[0, 8, 16]]
    # "fraction": every video over the whole table, so a short one's frames are as far apart as a long one's share
    spans = torch.tensor([[30, 1.2], [300, 12.0]])
    frac = frame_positions(tiny(positions="fraction", max_positions=31), frame_index=torch.tensor([[0, 15, 30]] * 2)
                           * torch.tensor([[1], [10]]), video_span=spans)
    assert frac.tolist() == [[0, 15, 30], [0, 15, 30]]
    assert frame_positions(tiny(positions="fraction", max_positions=301), frame_index=index).tolist() == [[0, 150, 300]]
    none = tiny(positions="none")
    assert frame_positions(none, index, seconds) is None
    model = VTN(none)
    assert model.position_embeddings is None
    assert model(torch.randn(2, 5, D)).shape == (2, 5)


def test_the_temporal_convolution_reads_order_without_positions():
    """Without positions, only the convolution over neighbouring frames can tell a sequence from its reverse."""
    x = torch.randn(2, 9, D)
    for conv, order_blind in ((0, True), (3, False)):
        model, _ = pair(tiny(positions="none", temporal_conv=conv))
        model.eval()
        same = torch.allclose(model(x), model(x.flip(1)), atol=1e-4)
        assert same == order_blind, conv
    assert preset("vit_b_vtn").temporal_conv == 0 and VTNConfig().temporal_conv == 3  # the paper's; vtn's default


def test_config_validation():
    assert tiny(attention_window=[4, 8]).windows == (4, 8)
    with pytest.raises(ConfigError, match="even"):
        tiny(attention_window=5).check()
    with pytest.raises(ConfigError, match="3 values for 2 layers"):
        tiny(attention_window=(4, 4, 4)).check()
    with pytest.raises(ConfigError, match="class_names"):
        tiny(class_names=("a", "b")).check()
    with pytest.raises(ConfigError, match="temporal_conv must be odd"):
        tiny(temporal_conv=4).check()
    with pytest.raises(ConfigError, match="not a multiple of num_heads"):
        tiny(num_heads=3).check()
    with pytest.raises(ConfigError, match=r"model.num_heads: 0 is out of range; it must be >= 1"):
        tiny(num_heads=0)  # ranges are checked at construction, as for any config section
    with pytest.raises(ConfigError, match="unknown VTN preset"):
        preset("vit_z")
    with pytest.raises(ConfigError, match=r"backend: 'flash' is not one of \['fast', 'hf'\]"):
        tiny(backend="flash")


def test_vit_b_vtn_preset_size():
    """The paper's encoder + head: 27.7 M; with the ViT-B/16 backbone (85.8 M) 113.5 M, the paper's ~114 M."""
    import timm

    model = VTN(preset("vit_b_vtn"))
    assert model.config.windows == (18, 18, 18) and model.config.max_positions == 288
    vtn_params = sum(p.numel() for p in model.parameters())
    assert vtn_params == 27_702_928
    backbone = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    assert vtn_params + sum(p.numel() for p in backbone.parameters()) == 113_501_584


def test_fast_backend_exports_and_compiles():
    """torch.export and torch.compile(fullgraph=True) trace the fast model with no graph break or host sync."""
    fast, _ = pair(tiny(attention_window=(4, 8)))
    fast.eval()
    args = batch(50)
    expected = fast(*args)
    exported = torch.export.export(fast, args)
    torch.testing.assert_close(exported.module()(*args), expected, atol=1e-5, rtol=0)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_fast_backend_inductor_forward_backward():
    fast, _ = pair(tiny(attention_window=(4, 8)))
    fast.eval()
    compiled = torch.compile(fast, fullgraph=True)
    features, mask, positions = batch(50)
    outputs = []
    for model in (fast, compiled):
        x = features.clone().requires_grad_()
        logits = model(x, mask, positions)
        logits.sum().backward()
        outputs.append((logits.detach(), x.grad))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_model_code_imports_no_training_or_data_code():
    code = ("import sys, vtn.temporal.model, vtn.temporal.hf; "
            "bad = [m for m in sys.modules if m.startswith(('vtn.store', 'vtn.extract', 'vtn.evaluate'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_the_hf_backend_imports_transformers():
    code = ("import sys; from vtn.temporal.model import VTN, VTNConfig; VTN(VTNConfig(num_layers=1, feature_dim=8, num_classes=2)); "
            "assert 'transformers' not in sys.modules; VTN(VTNConfig(num_layers=1, feature_dim=8, num_classes=2, backend='hf')); "
            "assert 'transformers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
