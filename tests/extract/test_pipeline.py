"""`extract_features` bookkeeping, driven by scripted decoder events: rows reach the right video even when a
video fails or restarts while its frames are still in the model (one batch stays in flight)."""

from pathlib import Path

import numpy as np
import pytest
import torch

import vtn.extract.pipeline as pipeline
from vtn.extract.config import ExtractConfig, RuntimeConfig
from vtn.extract.decode import Chunk, StreamInfo
from vtn.extract.inputs import InputEntry


class ScriptedPool:
    """Stands in for DecodePool: yields the given events in order."""

    events: list = []

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return iter(self.events)

    def __exit__(self, *exc):
        return False


class Writer:
    def __init__(self):
        self.videos, self.failures = {}, []

    def add(self, vid, features, timestamps, indices, **kw):
        self.videos[vid] = (features, indices)

    def add_failure(self, vid, error, message):
        self.failures.append((vid, error))


def info(n):
    return ("info", StreamInfo(np.arange(n) / 10.0, 10.0, n / 10.0, n, 2, 2, "decord"))


def chunk(first, n, value):
    """n frames of 2x2 pixels, all `value` + their index, so each row's features tell which frame it was."""
    idx = np.arange(first, first + n)
    frames = np.stack([np.full((2, 2, 3), value + i, np.uint8) for i in idx])
    return ("chunk", Chunk(idx, idx / 10.0, frames))


def run(monkeypatch, events, batch_size=2):
    ScriptedPool.events = [(kind, vid, payload) for vid, (kind, payload) in events]
    monkeypatch.setattr(pipeline, "DecodePool", ScriptedPool)
    entries = [InputEntry(v, Path(v), 0, "train") for v in ("a", "b", "c")]
    writer = Writer()
    # The "model" returns each frame's mean pixel value: the rows stored for a video show which frames they came from.
    model = lambda x: x.mean(dim=(1, 2, 3), keepdim=False)[:, None]  # noqa: E731  [N, 1]
    preprocess = lambda f: f.permute(0, 3, 1, 2).float()  # noqa: E731  [N, 3, 2, 2]
    cfg = ExtractConfig(runtime=RuntimeConfig(batch_size=batch_size, channels_last=False))
    pipeline.extract_features(entries, model, preprocess, torch.device("cpu"), cfg,
                              lambda e, info, feats, times, idx: writer.add(e.id, feats, times, idx), writer.add_failure)
    return writer


def test_a_video_failing_while_its_frames_are_in_flight_leaves_the_others_whole(monkeypatch):
    writer = run(monkeypatch, [
        ("a", info(3)), ("a", chunk(0, 1, 10)),
        ("b", info(2)), ("b", chunk(0, 1, 50)),  # batch [a0, b0] launched: in flight
        ("a", ("fail", ("DecodeError", "a: broken"))),  # a fails with a row in flight
        ("b", chunk(1, 1, 50)), ("b", ("done", None)),  # [b1, padding] launched last; [a0, b0] collected before it
    ])
    assert writer.failures == [("a", "DecodeError")] and list(writer.videos) == ["b"]
    features, indices = writer.videos["b"]
    np.testing.assert_array_equal(features[:, 0], [50, 51])
    np.testing.assert_array_equal(indices, [0, 1])


def test_a_restarted_video_keeps_only_the_frames_of_its_second_decode(monkeypatch):
    writer = run(monkeypatch, [
        ("a", info(4)), ("a", chunk(0, 2, 10)),  # batch [a0, a1] launched: in flight
        ("a", ("reset", None)),  # decord gave up; PyAV starts again
        ("a", info(4)), ("a", chunk(0, 4, 100)),  # [a0', a1'] launched, the old [a0, a1] collected and discarded
        ("c", info(1)), ("c", chunk(0, 1, 200)),
        ("a", ("done", None)), ("c", ("done", None)),
    ])
    assert writer.failures == [] and sorted(writer.videos) == ["a", "c"]
    np.testing.assert_array_equal(writer.videos["a"][0][:, 0], [100, 101, 102, 103])
    np.testing.assert_array_equal(writer.videos["c"][0][:, 0], [200])


def test_the_last_batch_is_padded_only_when_asked_and_progress_moves_with_decoded_frames(monkeypatch):
    ScriptedPool.events = [(kind, vid, payload) for vid, (kind, payload) in [
        ("a", info(3)), ("a", chunk(0, 2, 10)), ("a", chunk(2, 1, 10)), ("a", ("done", None)),
        ("b", ("fail", ("DecodeError", "b: broken"))),
    ]]
    monkeypatch.setattr(pipeline, "DecodePool", ScriptedPool)
    entries = [InputEntry(v, Path(v), 0, "train") for v in ("a", "b")]
    for pad, shapes in ((False, [3]), (True, [8])):
        seen, calls, stored = [], [], []

        def model(x):
            seen.append(len(x))
            return x.mean(dim=(1, 2, 3))[:, None]

        cfg = ExtractConfig(runtime=RuntimeConfig(batch_size=8, channels_last=False))
        pipeline.extract_features(entries, model, lambda f: f.permute(0, 3, 1, 2).float(), torch.device("cpu"), cfg,
                                  lambda e, *rest: stored.append((e.id, len(calls))), lambda *a: None, pad=pad,
                                  progress=lambda videos, frames: calls.append((videos, frames)))
        assert seen == shapes  # 3 frames: one batch of 3, or padded to the batch size
        # a's 3 sampled frames move the count by 2/3 and 1/3 as they are decoded, before a (whose frames wait for
        # the last batch) is stored; b counts 1 when it fails
        assert [f for _, f in calls] == [2, 1, 0, 0] and sum(v for v, _ in calls) == pytest.approx(2)
        assert calls[0][0] == pytest.approx(2 / 3) and stored == [("a", 3)]
