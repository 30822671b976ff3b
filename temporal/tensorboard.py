"""TensorBoard event files of a run (RUN/tb/), written beside metrics.jsonl, which stays the source of truth.

Each evaluated epoch's metrics.jsonl record goes in as scalars under the same names (train_loss, lr, val_top1 ...)
at its optimiser step; at the end of the run, the training curves and the confusion matrix of best/ on the val
videos as figures, and the hyper-parameters with the best epoch's metrics for the HParams view. A sweep's runs are
each a run directory, so TensorBoard pointed at the sweep overlays them. On when `run.tensorboard` (default; `--no-tb`
turns it off) and the `tensorboard` package is installed (pip install 'vtn[tb]'); without it nothing is written.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from vtn.config import flat_dict
from vtn.plots import confusion_figure, pyplot
from vtn.runtime import peak_memory
from vtn.temporal.data import predict
from vtn.temporal.metrics import confusion
from vtn.temporal.model import VTN

TB_DIR = "tb"


def installed() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        return False
    return True


class Board:
    """The event writer of one run directory with its config `cfg` (for the HParams view). `start_step`: a resumed
    run's step, from which events of the part of the run lost to the interruption are dropped (as metrics.jsonl's
    lines are)."""

    def __init__(self, run: Path, cfg, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.run, self.cfg = run, cfg
        self.last = None  # (step, elapsed) of the last record: clips/s is measured between records
        self.writer = SummaryWriter(str(run / TB_DIR), purge_step=start_step or None)

    def record(self, record: dict, opt: torch.optim.Optimizer, device: torch.device) -> None:
        """One metrics.jsonl record: each number as a scalar at the record's step; besides, every parameter
        group's learning rate, the training clips per second since the last record, and the peak memory."""
        step = record["step"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(key, value, step)
        for i, group in enumerate(opt.param_groups):
            self.writer.add_scalar(f"lr/group{i}", group["lr"], step)
        if self.last is not None and record["elapsed"] > self.last[1]:
            clips = (step - self.last[0]) * self.cfg.optim.batch_size
            self.writer.add_scalar("clips_per_s", clips / (record["elapsed"] - self.last[1]), step)
        self.last = (step, record["elapsed"])
        self.writer.add_scalar("peak_memory_mib", peak_memory(device) / 2**20, step)
        self.writer.flush()

    def close(self, best: dict | None, val=None, device: torch.device | None = None) -> None:
        """The end of the run: curves.png (already drawn), best/'s confusion matrix on the `val` dataset (when
        given), and the config's values with the best record's metrics."""
        records = [json.loads(x) for x in (self.run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        step = records[-1]["step"] if records else 0
        if (self.run / "curves.png").is_file():
            self.png("curves", (self.run / "curves.png").read_bytes(), step)
        if val is not None and len(val) and (self.run / "best").is_dir():
            model = VTN.from_pretrained(self.run / "best").to(device or "cpu").eval()
            logits, index = predict(model, val, device or torch.device("cpu"))
            names = list(model.config.class_names) or [str(i) for i in range(model.config.num_classes)]
            fig, buffer = confusion_figure(confusion(logits, val.labels[index]), names), io.BytesIO()
            fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            pyplot().close(fig)
            self.png("confusion", buffer.getvalue(), step)
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_dict(self.cfg).items()}
        metrics = {f"hparam/{k}": v for k, v in (best or {}).items()
                   if k.startswith("val_") and isinstance(v, (int, float))}
        self.writer.add_hparams(hparams, metrics, run_name=".")  # into this run's own event files
        self.writer.close()

    def png(self, tag: str, png: bytes, step: int) -> None:
        """A PNG image as it is (add_figure would draw the figure again, and add_image encode it again)."""
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        width, height = Image.open(io.BytesIO(png)).size
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def open_board(run: Path, cfg, on: bool = True, start_step: int = 0) -> Board | None:
    """The run's Board when `on` and `cfg.run.tensorboard` and tensorboard is installed, else None."""
    return Board(run, cfg, start_step) if on and cfg.run.tensorboard and installed() else None
