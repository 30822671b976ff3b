"""Backbone set-up a new user meets first: timm's pretrained weights offline, and a mistyped model name."""

import socket
import threading
import time

import pytest
import torch

from vtn.extract.backbone import BackboneError, Preprocess, create_backbone

from .test_extract import _hub_cache

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: a connection is refused at once, nothing is sent anywhere
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty local hub cache and a hub that cannot be reached, with HF_HUB_OFFLINE not set: the machine of a
    user who never set anything up. Returns the hub cache folder."""
    import timm  # noqa: F401  (imported here, so the timings below are the weights' lookup, not the import)
    from huggingface_hub import constants

    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture
def connects(monkeypatch):
    """The names of the threads that open a TCP connection (any library's), in order."""
    seen, connect = [], socket.socket.connect

    def spy(sock, address):
        seen.append(threading.current_thread().name)
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", spy)
    return seen


def test_missing_pretrained_weights_offline_fail_at_once_saying_the_ways_forward(no_hub, connects):
    t0 = time.monotonic()
    with pytest.raises(BackboneError) as e:
        create_backbone("resnet18", pretrained=True)
    assert time.monotonic() - t0 < 5  # timm's retries took about a minute here
    assert connects == ["vtn-hub-probe"]  # one probe, then no request at all
    message = str(e.value)
    for needle in ("offline", "--weights FILE", "timm/resnet18.a1_in1k", str(no_hub), "HF_HOME", "HF_HUB_CACHE",
                   "--random-init"):
        assert needle in message


def test_pretrained_weights_in_the_hub_cache_load_at_once_without_hf_hub_offline(no_hub, connects):
    published = _hub_cache(no_hub, "resnet18", seed=3)
    t0 = time.monotonic()
    model, _, identity = create_backbone("resnet18", pretrained=True)
    assert time.monotonic() - t0 < 5
    assert connects == ["vtn-hub-probe"]  # read from the cache without asking the hub
    assert identity["weights"] == "timm-pretrained"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, published.state_dict()[k], rtol=0, atol=0)
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE is False  # offline mode held only for the download


def test_cli_offline_without_hub_cache_is_a_usage_error_naming_the_ways_forward(videos, tmp_path, vtn):
    import os

    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=UNREACHABLE)
    proc = vtn("extract", videos / "val", "--out", tmp_path / "c", "--backbone", "resnet18", "--quiet",
               env=env, check_rc=2)
    for needle in ("--weights FILE", "timm/resnet18.a1_in1k", str(tmp_path / "hf" / "hub"), "--random-init"):
        assert needle in proc.stderr
    assert "Retrying" not in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_backbone_suggests_the_closest_timm_names(videos, tmp_path, vtn):
    proc = vtn("extract", videos / "val", "--out", tmp_path / "c", "--backbone", "vit_base_patch16", "--random-init",
               check_rc=2)
    assert "unknown timm model 'vit_base_patch16'; closest: vit_base_patch16_224, " in proc.stderr
    # A pretrained tag is not part of the name looked up.
    with pytest.raises(BackboneError, match=r"unknown timm model 'resnt18\.a1_in1k'; closest: resnet18\b"):
        create_backbone("resnt18.a1_in1k")


class _SizedButBroken(torch.nn.Module):
    """A model class that takes img_size (as ViTs do) and has a bug when it is given."""

    def __init__(self, img_size=None, num_classes=0, **kwargs):
        super().__init__()
        if img_size is not None:
            len(img_size)  # TypeError: an int has no len()
        self.fc = torch.nn.Linear(2, 2)
        self.num_features = 2
        self.pretrained_cfg = {}


def test_img_size_is_dropped_only_for_models_that_do_not_take_it_and_a_type_error_bug_surfaces():
    from timm.models import register_model

    @register_model
    def vtn_test_sized_but_broken(pretrained=False, **kwargs):
        return _SizedButBroken(**kwargs)

    with pytest.raises(TypeError, match="has no len"):
        create_backbone("vtn_test_sized_but_broken", image_size=64)
    _, data_config, identity = create_backbone("resnet18", image_size=64)  # a CNN takes any size
    assert data_config["input_size"] == (3, 64, 64) and identity["name"] == "resnet18"


def test_an_interpolation_torch_does_not_have_is_refused_not_replaced_by_another():
    config = {"input_size": (3, 32, 32), "crop_pct": 1.0, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    assert Preprocess({**config, "interpolation": "bicubic"}).interpolation == "bicubic"
    with pytest.raises(BackboneError, match="interpolation 'lanczos' is not supported"):
        Preprocess({**config, "interpolation": "lanczos"})
