"""`vtn predict INPUT --model RUN`: classify raw video files end to end (decode -> backbone -> encoder -> head).

The backbone, its preprocessing and the sampling are the ones the model's features came from (a checkpoint's
inputs.json records them), so a prediction sees what training saw; the backbone is rebuilt and its weights checked
against the recorded sha256. For a fine-tuned run (`vtn finetune`) that is its own backbone, loaded from the
checkpoint's backbone.safetensors, with the stage-two run's preprocessing and sampling. Decoding, preprocessing
and batching across videos are stage one's pipeline (`extract_features`) with another consumer: each video, once
its frames are through the backbone, goes through VTN.

Views: `full` decodes only the frames of one view over the whole video (one in view_stride, up to
max_positions, spread as in evaluation), `TxS` only the frames of T evenly spaced clips of the training clip
length, each in S crops (1: centre; 3: both ends and the centre of the long side), softmax scores averaged over
the T x S views.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vtn.errors import UserError
from vtn.extract.config import ExtractConfig, RuntimeConfig
from vtn.extract.inputs import InputEntry, discover, image_format
from vtn.extract.pipeline import check_runtime, extract_features
from vtn.extract.sampling import sample
from vtn.progress import VIDEO_BAR, progress_bar
from vtn.evaluate.attention import attention_figure
from vtn.evaluate.settings import PredictConfig, parse_views
from vtn.store import collate_clips
from vtn.store.clips import clip_rows
from vtn.store.dataset import video_span
from vtn.temporal.checkpoint import clip_settings, locate, read_inputs
from vtn.temporal.data import model_inputs, whole_video_sampling
from vtn.temporal.e2e import load_temporal, rebuild_backbone, sampling_of
from vtn.temporal.metrics import mean_softmax
from vtn.temporal.model import VTN


def entries_of(source: str | Path, images: bool = False) -> tuple[list[InputEntry], list[str]]:
    """A video file, a folder of videos or a CSV manifest as entries (labels where the folder or manifest gives them).
    A still image (PNG, JPEG ...) is refused unless `images`: a decoder reads it as a one-frame video, and a video
    model would classify it without a word."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() != ".csv":
        entries, classes = [InputEntry(path.name, path, -1, "predict")], []
    else:
        entries, classes, _ = discover(path)
    for e in entries if not images else ():
        kind = image_format(e.path)
        if kind:
            raise UserError(f"{e.path}: a {kind} image, not a video; a video model would classify it as a one-frame "
                            "video. Give video files, or add --images to classify still images that way")
    return entries, classes


@dataclass
class Predictor:
    """Backbone + VTN for raw videos. `Predictor.from_run(RUN)` builds it; `predictor(paths)` predicts."""

    model: VTN
    backbone: torch.nn.Module
    preprocess: torch.nn.Module
    cfg: ExtractConfig  # sampling (with the views' frame selection), backbone and runtime
    views: tuple[int, int] | None  # None: full; (T clips, S crops)
    clip: tuple[int, int]  # training clip: frames, stride (in sampled frames)
    device: torch.device

    @classmethod
    def from_run(cls, run: str | Path, checkpoint: str = "best", views: str = "full", weights: str | None = None,
                 runtime: RuntimeConfig | None = None) -> "Predictor":
        """The model of a stage-two or fine-tuned run (its best/ checkpoint, or a checkpoint directory), with the
        backbone its features come from: timm's weights, seeded random ones, the recorded weights file (`weights`
        gives another path to the same file), or a fine-tuned run's own backbone.safetensors. Refused, naming what
        it looked for, when they cannot be found or are not the same weights."""
        ckpt = locate(run, checkpoint)
        inputs = read_inputs(ckpt)
        mode = parse_views(views)
        runtime = runtime or RuntimeConfig()
        device = check_runtime(ExtractConfig(runtime=runtime))
        backbone, preprocess, bc, _ = rebuild_backbone(inputs, ckpt, device, weights, runtime,
                                                       crops=1 if mode is None else mode[1])
        model = load_temporal(ckpt)
        frames, stride = clip_settings(inputs)
        sampling = sampling_of(inputs)
        sampling = whole_video_sampling(sampling, model.config) if mode is None else \
            replace(sampling, view_clips=(mode[0], frames, stride))
        cfg = ExtractConfig(sampling, bc, runtime)
        return cls(model.to(device).eval(), backbone, preprocess, cfg, mode, (frames, stride), device)

    def view_logits(self, features: np.ndarray, timestamps: np.ndarray, indices: np.ndarray,
                    info) -> tuple[np.ndarray, int]:
        """Log of the mean softmax over the views of one video, and the views' count (1 for full)."""
        crops = 1 if self.views is None else self.views[1]
        feats = torch.from_numpy(features).view(len(indices), crops, -1)  # [frames, crops, D]
        span = {}
        if self.views is None:
            rows = [np.arange(len(indices))]
        else:  # the clips, as rows of the decoded frames: map each clip's sampled frames to where they were decoded
            base = replace(self.cfg.sampling, view_frames=None, view_clips=None)
            every = sample(info.timestamps, base)
            rows = [np.searchsorted(indices, every[clip_rows(len(every), *self.clip, None, None, (k, self.views[0]))])
                    for k in range(self.views[0])]
            span = {"span": video_span(every, np.asarray(info.timestamps)[every])}  # positions as in training
        items = [{"features": feats[r, c], "positions": torch.from_numpy(indices[r]),
                  "times": torch.from_numpy(timestamps[r]).float(), "label": -1, "id": "", **span}
                 for r in rows for c in range(crops)]
        with torch.no_grad():
            logits = self.model(*model_inputs(collate_clips(items), self.model.config, self.device)).float().cpu().numpy()
        return mean_softmax(logits[:, None])[0], len(items)

    @property
    def class_names(self) -> list[str]:
        cfg = self.model.config
        return list(cfg.class_names) or [str(i) for i in range(cfg.num_classes)]

    def predict(self, entries: list[InputEntry], on_video=None, on_failure=None, progress=None) -> list[dict]:
        """Predict each video; returns one dict per video (id, path, label, logits, probabilities, frames through
        the backbone, views), in the order they finish. `on_video(result, video)` (video: features, timestamps,
        frame indices), `on_failure(id, error class, message)` and `progress(videos, frames)` (see
        extract_features) are called as it goes."""
        results = []

        def store(entry: InputEntry, info, features, timestamps, indices) -> None:
            logp, n_views = self.view_logits(features, timestamps, indices, info)
            result = {"id": entry.id, "path": str(entry.path), "label": entry.label, "logits": logp,
                      "probabilities": dict(zip(self.class_names, np.exp(logp).tolist())),
                      "frames_through_backbone": int(len(features)), "views": n_views}
            results.append(result)
            if on_video:
                on_video(result, (features, timestamps, indices))

        self.model.eval()
        # One video decodes in a thread of this process: starting decode processes (spawned, importing the
        # decoders) would cost more than decoding a short clip, and there is no other video to overlap with.
        workers = 0 if len(entries) == 1 and self.cfg.runtime.workers is None else None
        extract_features(entries, self.backbone, self.preprocess, self.device, self.cfg, store,
                         on_failure or (lambda *a: None), workers=workers, progress=progress or (lambda v, f: None))
        return results

    def __call__(self, paths) -> list[dict]:
        """Predict a video file, a folder, a CSV manifest, or a list of video files."""
        if isinstance(paths, (str, Path)):
            entries = entries_of(paths)[0]
        else:
            entries = [InputEntry(str(p), Path(p), -1, "predict") for p in paths]
        return self.predict(entries)


def predict_job(source: str, run: str, settings: PredictConfig | None = None, weights: str | None = None,
                json_path: str | None = None, attention_dir: str | None = None, quiet: bool = False,
                images: bool = False) -> tuple[list[dict], list[tuple]]:
    """`vtn predict`: prints each video's top classes as it finishes, writes --json lines, attention figures;
    returns (results, failures). `weights`: the backbone's weights file where it is now, if it moved. A progress
    bar on stderr unless `quiet`; `images`: take still images as one-frame videos (see entries_of)."""
    settings = settings or PredictConfig()
    views, top, attention = settings.views, settings.top, settings.attention
    entries, folder_classes = entries_of(source, images)
    if attention and views != "full":
        raise UserError("--attention shows [CLS]'s attention over one view of the whole video: use it with --views full")
    runtime = RuntimeConfig(device=settings.device, batch_size=settings.batch_size, workers=settings.workers,
                            amp=settings.amp, progress=False)
    predictor = Predictor.from_run(run, settings.checkpoint, views, weights, runtime)
    names = predictor.class_names
    failures: list[tuple] = []
    out = open(json_path, "w") if json_path else None
    folder = Path(attention_dir or (Path(json_path).parent if json_path else Path("."))) / "attention"
    records: list[dict] = []

    def on_video(result: dict, video) -> None:
        order = np.argsort(-result["logits"])[:top]
        best = [(names[c], float(np.exp(result["logits"][c]))) for c in order]
        truth = folder_classes[result["label"]] if result["label"] >= 0 else None
        say(f"{result['id']}: " + ", ".join(f"{n} {p:.1%}" for n, p in best) + (f"   (label {truth})" if truth else ""))
        if out:
            out.write(json.dumps({"id": result["id"], "path": result["path"], "label": truth,
                                  "top": [{"class": n, "probability": p} for n, p in best],
                                  "probabilities": result["probabilities"],
                                  "frames_through_backbone": result["frames_through_backbone"],
                                  "views": {"mode": views, "count": result["views"]}}) + "\n")
            out.flush()
        if len(records) < attention:
            features, timestamps, indices = video
            folder.mkdir(parents=True, exist_ok=True)
            item = {"id": result["id"], "features": torch.from_numpy(features), "positions": torch.from_numpy(indices),
                    "times": torch.from_numpy(timestamps).float(), "label": -1}
            records.append(attention_figure(predictor.model, item, Path(result["path"]), folder, predictor.device)[0])
            (folder / "attention.json").write_text(json.dumps(records, indent=1) + "\n")

    def on_failure(vid: str, error: str, message: str) -> None:
        failures.append((vid, error, message))
        say(f"{vid}: failed: {error}: {message}")

    bar = None if quiet else progress_bar(total=len(entries), unit="video", desc="predict", bar_format=VIDEO_BAR,
                                          leave=False)

    def say(line: str) -> None:  # above the bar, which is redrawn below it
        (bar.write if bar is not None else print)(line, file=sys.stdout)
        sys.stdout.flush()

    try:
        results = predictor.predict(entries, on_video, on_failure,
                                    (lambda videos, frames: bar.update(videos)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
        if out:
            out.close()
    return results, failures
