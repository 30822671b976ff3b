"""`vtn bench finetune`'s core on a tiny setting: every row measured, memory figures sane (not timings)."""

import pytest

from vtn.bench.finetune import COMPUTE, CONTROLS, FinetuneBenchConfig, run


@pytest.mark.slow  # 10 fresh processes, each importing torch and timm
def test_bench_finetune_core_measures_every_control_and_the_default_saves_memory(capsys):
    cfg = FinetuneBenchConfig(backbones=(("vit_tiny_patch16_224", 112),), lengths=(8,), clips=1, micro_batch=2,
                              bank_frames=2, repeats=1, stage_two_steps=1, threads=1, device="cpu")
    out = run(cfg)
    rows = {r["control"]: r for r in out["rows"]}
    assert list(rows) == [*CONTROLS, *COMPUTE] and all(r["T"] == 8 for r in rows.values())
    assert all(r["peak_bytes"] > 0 and r["seconds"] > 0 for r in rows.values())
    # 8 frames in micro-batches of 2, recomputed in the backward pass: the activations of 2 frames, not 8.
    assert rows["default"]["peak_bytes"] <= rows["plain"]["peak_bytes"] and rows["plain"]["x_plain"] == 1.0
    (g,) = out["gradients"]
    assert g["max_abs_diff"] <= 1e-4 * g["max_abs_grad"]  # chunked backprop gives plain gradients
    (s,) = out["speed"]
    assert s["stage_two"] > 0 and s["end_to_end"] > 0
    text = capsys.readouterr().out
    assert "x plain" in text and "max abs diff" in text and "stage two" in text
    # The default step against the backbone's own forward + backward on its frames, and the rest's breakdown.
    assert "x compute" in text and "recompute s" in text and "rest s" in text
    lines = [line for line in text.splitlines() if line.startswith("vit_tiny_patch16_224 @112")]
    assert len(lines) == len(CONTROLS) + len(COMPUTE) + 2
    step, both = rows["default"]["seconds"], rows["backbone fwd+bwd"]["seconds"]
    assert f"{step / both:.2f}x" in text
    # Where the step's time went, part by part: the parts are the step, less the timer's own cost.
    parts = rows["default"]["phases"]
    assert list(parts) == ["preprocess", "forward", "backward", "optimiser"] and all(v > 0 for v in parts.values())
    assert 0.5 * step <= sum(parts.values()) <= 1.01 * step
    assert f"optimiser {parts['optimiser']:.3f}" in text
