"""The decode timeout kills a worker that makes no progress, never one that is busy decoding a long file."""

import os

import numpy as np
import pytest

from vtn import synth
from vtn.extract.sampling import SamplingConfig
from vtn.extract.workers import DecodePool

TIMEOUT = 0.5  # seconds


@pytest.fixture(scope="session")
def long_video(tmp_path_factory):
    """200 s of 640x360 at 25 fps (5000 frames): too many for decord's budget, so PyAV reads it, and the two
    sampled frames come after about 2 s of decoding, 4 timeouts (written in a second: one looped GOP)."""
    return synth.make_looped_video(tmp_path_factory.mktemp("long") / "long.mp4", seconds=200, width=640, height=360,
                                   loop_seconds=4)


@pytest.mark.parametrize("workers", [2, 0])  # 0: decoded in threads of this process, under the same timeout
def test_a_long_sparse_decode_is_not_killed_and_a_hung_one_still_is(long_video, tmp_path, workers):
    os.mkfifo(tmp_path / "hang.mp4")  # opening a FIFO nobody writes to blocks forever, like a stuck mount
    jobs = [("long", str(long_video)), ("hang", str(tmp_path / "hang.mp4"))]
    with DecodePool(jobs, SamplingConfig(mode="num_frames", num_frames=2), workers=workers, timeout=TIMEOUT) as pool:
        events = list(pool)
    kinds = {key: [kind for kind, k, _ in events if k == key] for key in ("long", "hang")}
    assert kinds == {"long": ["info", "chunk", "done"], "hang": ["fail"]}  # no "alive" reaches the consumer
    info = next(p for kind, k, p in events if (kind, k) == ("info", "long"))
    chunk = next(p for kind, k, p in events if (kind, k) == ("chunk", "long"))
    assert info.backend == "pyav" and info.num_frames == 5000
    np.testing.assert_array_equal(chunk.frame_indices, [1250, 3750])  # the centres of the two halves
    np.testing.assert_allclose(chunk.timestamps, [50.0, 150.0])
    error, message = next(p for kind, k, p in events if (kind, k) == ("fail", "hang"))
    assert error == "DecodeTimeout" and "hang.mp4" in message
