"""The CUDA paths of `vtn extract`: pinned transfers, float resampling on the device, autocast, compile.

They run where a GPU is present (tests/conftest.py skips them elsewhere, as on CI).
"""

import numpy as np
import pytest

from vtn.store import open_cache

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("amp,compile", [("none", False), ("bf16", True), ("fp16", False)])
def test_cuda_extraction_matches_the_cpu(videos, tmp_path, vtn, amp, compile):
    args = ["extract", videos / "val", "--backbone", "resnet18", "--image-size", "64", "--random-init", "--fps", "6",
            "--batch-size", "8", "--quiet"]
    vtn(*args, "--out", tmp_path / "cpu", "--device", "cpu", check_rc=0)
    vtn(*args, "--out", tmp_path / "gpu", "--device", "cuda", "--amp", amp, *(["--compile"] if compile else []),
        check_rc=0)
    cpu, gpu = open_cache(str(tmp_path / "cpu")), open_cache(str(tmp_path / "gpu"))
    assert gpu.attrs["config"]["runtime"]["amp"] == amp and sorted(gpu.ids) == sorted(cpu.ids)
    for vid in cpu.ids:
        a, b = cpu.video(vid), gpu.video(vid)
        np.testing.assert_array_equal(a.frame_indices, b.frame_indices)
        np.testing.assert_array_equal(a.timestamps, b.timestamps)
        x, y = a.features.astype(np.float64), b.features.astype(np.float64)
        cosine = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        # Float resampling on the GPU (within a grey level of the CPU's), TF32 convolutions, reduced precision.
        assert cosine.min() > (0.999 if amp == "none" else 0.99), (vid, cosine.min())
