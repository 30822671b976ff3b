"""Broken inputs are recorded (id, error class, message) and skipped; exit status 3; the rest is stored."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vtn.extract.sampling import SamplingConfig
from vtn.extract.workers import DecodeBug, DecodePool
from vtn.store import open_cache

BACKBONE = ["--backbone", "resnet18", "--random-init", "--image-size", "64"]
EXPECTED = {"zero_byte": "EmptyFile", "truncated": "NotAVideo", "not_video": "NotAVideo",
            "audio_only": "NotAVideo", "zero_frames": "NoFrames", "corrupt": "DecodeError"}


@pytest.mark.parametrize("workers", ["2", "0"])
def test_each_bad_file_is_recorded_and_the_rest_stored(videos, bad_files, tmp_path, vtn, workers):
    src = tmp_path / "in"
    shutil.copytree(videos / "val", src / "good")
    (src / "bad").mkdir()
    for path in bad_files.values():
        shutil.copy(path, src / "bad" / path.name)
    out = tmp_path / "cache"
    proc = vtn("extract", src, "--out", out, *BACKBONE, "--num-frames", "3", "--workers", workers, check_rc=3)
    assert "6 failed" in proc.stderr and "extracted 4 videos" in proc.stderr
    assert "[h264 @" not in proc.stderr and "[mov,mp4" not in proc.stderr  # FFmpeg's raw log lines
    if workers != "0":  # decord's own logger is kept off only in worker processes (see decode.CAPTURE_DECORD_LOG)
        assert "ERROR opening" not in proc.stderr, proc.stderr
    cache = open_cache(str(out))
    assert sorted(cache.ids) == sorted(f"good/{p.parent.name}/{p.name}" for p in (src / "good").rglob("*.mp4"))
    failures = {f["id"]: f for f in cache.failures}
    assert {k: failures[f"bad/{k}.mp4"]["error"] for k in EXPECTED} == EXPECTED
    assert all(f"bad/{k}.mp4" in failures[f"bad/{k}.mp4"]["message"] for k in EXPECTED)  # names the file
    info = vtn("store", "info", out, check_rc=0).stdout
    assert "zero_frames.mp4" in info
    # A re-run retries only the failures, which fail again: still exit 3, nothing stored twice.
    proc = vtn("extract", src, "--out", out, *BACKBONE, "--num-frames", "3", "--workers", workers, check_rc=3)
    assert "4 already in the cache" in proc.stderr


@pytest.mark.parametrize("workers", ["1", "0"])
def test_a_hung_decode_is_killed_after_the_timeout(videos, tmp_path, vtn, workers):
    # Opening a FIFO nobody writes to blocks forever, like a stuck network mount.
    os.mkfifo(tmp_path / "hang.mp4")
    shutil.copy(videos / "val/left_to_right_red_first/0000.mp4", tmp_path / "ok.mp4")
    manifest = tmp_path / "list.csv"
    manifest.write_text("hang.mp4,a\nok.mp4,b\nmissing.mp4,b\n")
    out = tmp_path / "cache"
    # With --workers 0 there is no process to kill: the decode thread is abandoned, the job goes on and ends.
    proc = vtn("extract", manifest, "--out", out, *BACKBONE, "--num-frames", "2", "--timeout", "2", "--workers", workers,
               "--quiet", check_rc=3, timeout=120)
    cache = open_cache(str(out))
    assert cache.ids == ["ok.mp4"]
    errors = {f["id"]: f["error"] for f in cache.failures}
    assert errors == {"hang.mp4": "DecodeTimeout", "missing.mp4": "NotAVideo"}
    assert "2 failed" in proc.stderr


def test_ctrl_c_prints_one_line_and_no_worker_traceback(videos, tmp_path):
    # A FIFO first in the list holds one worker in the middle of a decode for as long as the test likes;
    # opening its write end succeeds only once a worker has opened it, i.e. extraction is under way.
    src = tmp_path / "in"
    shutil.copytree(videos / "val", src)
    fifo = src / min(p.name for p in src.iterdir()) / "0.hang.mp4"  # in a class folder: a stray video is refused
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "vtn", "extract", str(src), "--out", str(tmp_path / "cache"),
                             *BACKBONE, "--workers", "2", "--timeout", "600", "--quiet"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:  # no reader yet
                assert proc.poll() is None and time.monotonic() < deadline, "extraction never reached the FIFO"
                time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
        _, stderr = proc.communicate(timeout=60)
        os.close(writer)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "vtn extract: interrupted; committed work is kept, re-run to continue" in stderr


@pytest.mark.parametrize("workers", [1, 0])
def test_a_bug_while_decoding_surfaces_with_its_traceback_and_is_not_the_videos_failure(videos, workers):
    # every=0 makes sample() divide by zero inside decode_video: an exception that says nothing about the file.
    bug = SamplingConfig(mode="every", every=0)
    path = str(videos / "val/left_to_right_red_first/0000.mp4")
    with pytest.raises(DecodeBug if workers else ZeroDivisionError) as raised:
        with DecodePool([("v", path, bug)], SamplingConfig(), workers=workers, timeout=60) as pool:
            events = list(pool)
            pytest.fail(f"the bug was recorded as events: {events}")
    if workers:  # the worker's own traceback, down to the failing call
        assert "ZeroDivisionError" in str(raised.value) and "sample" in str(raised.value) and path in str(raised.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permissions")
def test_an_unreadable_video_is_recorded_as_unreadable_saying_permission_denied(videos, tmp_path, vtn):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(videos / "val/left_to_right_red_first/0000.mp4", src / "ok.mp4")
    shutil.copy(videos / "val/left_to_right_red_first/0000.mp4", src / "locked.mp4")
    os.chmod(src / "locked.mp4", 0)
    out = tmp_path / "cache"
    vtn("extract", src, "--out", out, *BACKBONE, "--num-frames", "2", "--workers", "1", "--quiet", check_rc=3)
    (failure,) = open_cache(str(out)).failures
    assert failure["id"] == "locked.mp4" and failure["error"] == "Unreadable"
    assert "permission denied" in failure["message"].lower()


def test_a_permission_error_is_classed_unreadable_in_every_mode(videos, tmp_path, monkeypatch):
    """The same classification as above, runnable as root: the open itself is refused, as the kernel would."""
    import builtins

    locked = str(tmp_path / "locked.mp4")
    shutil.copy(videos / "val/left_to_right_red_first/0000.mp4", locked)
    real_open = builtins.open

    def refusing_open(file, *a, **kw):
        if str(file) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with DecodePool([("locked.mp4", locked)], SamplingConfig(mode="num_frames", num_frames=2), workers=0,
                    timeout=30) as pool:
        events = [(kind, payload) for kind, _, payload in pool]
    assert [kind for kind, _ in events] == ["fail"]
    error, message = events[0][1]
    assert error == "Unreadable" and "Permission denied" in message
