"""`vtn bench long`: how a trained run reads whole long videos whose class is decided by a few short events (the
order videos of vtn/synth.py `make_order_dataset`): val top-1 on whole videos, and the attention mass [CLS] puts on
the deciding frames next to the share of the frames those events cover (mass / share: how much more than a
uniform reading the model looks at them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vtn.errors import UserError
from vtn.evaluate.attention import cls_attention
from vtn.evaluate.frames import source_root
from vtn.store import collate_clips, open_cache
from vtn.temporal.checkpoint import locate, read_inputs
from vtn.temporal.data import check_inputs, model_inputs, whole_videos
from vtn.temporal.model import VTN


def read_events(path: Path) -> dict[str, tuple[float, float]]:
    """events.json of make_order_dataset: each video's (start, end) in seconds of its events, by id."""
    try:
        data = json.loads(path.read_text())
        return {k: (float(start), float(end)) for k, (start, end) in data.items()}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not an events.json of make_order_dataset ({type(e).__name__}: {e})") from None


def event_attention(model: VTN, item: dict, span: tuple[float, float], device: torch.device) -> dict:
    """One whole video: whether its prediction is right, [CLS]'s rollout and last-layer attention mass on the frames
    inside the events `span` (seconds), and the share of the video's frames inside it."""
    batch = collate_clips([item])
    per_layer, rollout = cls_attention(model, batch, device)
    with torch.no_grad():
        logits = model(*model_inputs(batch, model.config, device))
    t = item["times"].numpy()
    inside = (t >= span[0]) & (t < span[1])
    return {"right": int(logits.argmax(1).item()) == item["label"], "rollout": float(rollout[inside].sum()),
            "last": float(per_layer[-1][inside].sum()), "share": float(inside.mean())}


def run(run_dir: str, cache_url: str, events: str | None, split: str, checkpoints: list[str]) -> list[dict]:
    """A row per checkpoint of `run_dir` on the whole videos of `split`; printed as they are measured."""
    cache = open_cache(cache_url)
    root = source_root(cache)
    path = Path(events) if events else (root / "events.json" if root else None)
    if path is None or not path.is_file():
        raise UserError(f"{cache.url}: no events.json beside its videos ({root}); pass --events")
    spans = read_events(path)
    device = torch.device("cpu")
    rows = []
    print(f"{'checkpoint':<10} {'videos':>6} {'top-1':>6} {'rollout mass':>12} {'last-layer mass':>15} "
          f"{'events share':>12} {'rollout/share':>13}")
    for name in checkpoints:
        ckpt = locate(run_dir, name)
        model = VTN.from_pretrained(ckpt)
        check_inputs(read_inputs(ckpt), cache, ckpt)
        data = whole_videos(cache.load_split(split), split, model.config)
        missing = [v for v in data.ids if v not in spans]
        if missing:
            raise UserError(f"{path}: no events for {len(missing)} of the {split} videos (e.g. {missing[0]!r})")
        got = [event_attention(model, data[i], spans[data.ids[i]], device) for i in range(len(data))]
        mean = {k: float(np.mean([g[k] for g in got])) for k in ("right", "rollout", "last", "share")}
        ratio = float(np.mean([g["rollout"] / max(g["share"], 1e-9) for g in got]))
        rows.append({"checkpoint": name, "videos": len(got), "top1": mean["right"], "rollout_mass": mean["rollout"],
                     "last_layer_mass": mean["last"], "events_share": mean["share"], "rollout_over_share": ratio})
        print(f"{name:<10} {len(got):>6} {mean['right']:>6.3f} {mean['rollout']:>12.3f} {mean['last']:>15.3f} "
              f"{mean['share']:>12.3f} {ratio:>13.2f}", flush=True)
    return rows
