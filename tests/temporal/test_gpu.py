"""The CUDA paths of stage two: the fast backend against hf on the GPU, bf16 autocast, training and evaluation.

They run where a GPU is present (tests/conftest.py skips them elsewhere, as on CI).
"""

import json

import pytest
import torch

from vtn.cli import main

from test_model import assert_same, batch, pair, tiny
from test_train import TINY, make_cache, records

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("T", [1, 17, 100, 1000])
def test_fast_equals_hf_on_cuda(T):
    fast, hf = pair(tiny(num_layers=3, attention_window=(4, 16, 8)))
    cuda = [t.cuda() for t in batch(T)]
    # Matmuls stay in full fp32 (PyTorch's default); only the order of summation differs from the CPU.
    assert_same(fast.cuda(), hf.cuda(), *cuda, atol=1e-3)


def test_members_forward_equals_each_members_own_forward_on_cuda():
    """The batched sweep's vmap over members runs CUDA's fused attention through its batching rule."""
    from vtn.temporal.batched import members_forward, stacked
    from vtn.temporal.model import VTN

    torch.manual_seed(0)
    models = [VTN(tiny(attention_window=(4, 16), dropout=0, attention_dropout=0, head_dropout=0)).cuda()
              for _ in range(3)]
    features, mask, positions = (t.cuda() for t in batch(100))
    x, m, p = (t.expand(3, *t.shape) for t in (features, mask, positions))
    logits = members_forward(models[0], stacked(models), x, m, p)
    for i, model in enumerate(models):
        torch.testing.assert_close(logits[i], model(features, mask, positions), atol=1e-4, rtol=0)


def test_fast_bf16_autocast_is_close_to_fp32_on_cuda():
    fast, _ = pair(tiny(attention_window=16))
    features, mask, positions = (t.cuda() for t in batch(300))
    fast = fast.cuda().eval()
    with torch.no_grad():
        full = fast(features, mask, positions)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = fast(features, mask, positions)
    assert half.dtype in (torch.bfloat16, torch.float32)
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.05)


def test_train_and_evaluate_on_cuda_with_bf16(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache")
    run = tmp_path / "run"
    assert main(["train", cache, "--out", str(run), "--device", "cuda", "--amp", "bf16", "--lr", "3e-3",
                 "--set", "optim.min_steps=150", *TINY]) == 0
    best = max(records(run), key=lambda r: r["val_top1"])
    assert best["val_top1"] >= 0.85  # order learnt, as on the CPU
    assert "amp: bf16" in (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--cache", cache, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(best["val_top1"], abs=1 / 16)
