"""`s3://` caches against a real S3 server: moto's, on a free loopback port, started by the tests (no network).

Credentials and the endpoint reach zarr -> fsspec -> s3fs -> botocore through the standard AWS environment
variables, exactly as a user sets them for AWS or a MinIO-style server; nothing in vtn is told about S3.
"""

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

from store_helpers import CLASSES, D, add, feats, plan  # noqa: E402

from vtn.store import CacheWriter, StoreError, consolidate, open_cache  # noqa: E402
from vtn.store.index import newest_index  # noqa: E402
from vtn.store.layout import open_root  # noqa: E402

HERE = Path(__file__).parent
TINY = ["--set", "model.hidden_size=16", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
        "--set", "model.intermediate_size=32", "--set", "model.attention_window=4", "--frames", "8", "--stride", "2",
        "--batch-size", "16"]  # as tests/temporal/test_train.py


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and the environment that points this process and its children at it.

    Yields a function that creates a fresh bucket and returns its name.
    """
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not one log line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        mp.setenv("NO_PROXY", host)  # a proxy configured on the machine must not see loopback traffic
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # instances made before hold no credentials for this server
        buckets = iter(range(1_000_000))

        def bucket() -> str:
            name = f"vtn-test-{next(buckets)}"
            s3fs.S3FileSystem().mkdir(name)
            return name

        yield bucket
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_a_process_sees_videos_committed_after_it_first_listed_the_cache(s3):
    """A reader that re-opens the cache (a poller, rank 0 consolidating) must see parts another process
    added since it last looked; fsspec's per-process listing cache once hid them for good."""
    url, videos = f"s3://{s3()}/cache", plan(6)
    with CacheWriter(url, feature_dim=D, class_names=CLASSES, attrs={"backbone": {"name": "test"}}) as w:
        for v in videos[:2]:
            add(w, *v)
    assert len(open_cache(url)) == 2  # this process has now listed parts/

    # Another process adds the rest in a part of its own and exits without consolidating.
    proc = subprocess.run([sys.executable, str(HERE / "writer_proc.py"), url, "0", "6", "other", "no-consolidate"],
                          cwd=HERE, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cache = open_cache(url)
    assert sorted(cache.ids) == sorted(v[0] for v in videos)
    for vid, length, label, split in videos:  # bitwise, through the fast row reader's remote path
        v = cache.video(vid)
        assert np.array_equal(v.features.view(np.uint16), feats(vid, length).view(np.uint16))
        assert (v.label, v.split, v.num_frames) == (label, split, length * 2)
    assert cache._reader(cache.index["part"][0], "features").fast
    whole = cache.load_split("train")
    assert whole.features.shape == (sum(v[1] for v in videos if v[3] == "train"), D)

    assert consolidate(url) == 6
    covered = newest_index(open_root(url)).attrs["parts"]
    assert sorted(name.split("-")[0] for name in covered) == ["other", "part"]



def _committed(url) -> int:
    try:
        return len(open_cache(url))
    except (StoreError, OSError, KeyError, ValueError):
        return 0  # not created yet


@pytest.mark.slow
def test_extract_kill_resume_train_evaluate_export_on_s3(s3, tmp_path, vtn):
    """The whole user path on an S3 cache through the CLI: extract (SIGKILLed, then resumed), verify, info,
    train, evaluate, export."""
    import h5py

    from vtn import synth

    videos = tmp_path / "videos"
    synth.make_dataset(videos, per_split={"train": 2, "val": 1}, classes=synth.CLASSES[:2], seconds=(1.0, 1.5), seed=1)
    n = 6
    url = f"s3://{s3()}/cache"
    extract = [sys.executable, "-m", "vtn", "extract", str(videos), "--out", url, "--backbone", "resnet18",
               "--random-init", "--image-size", "32", "--every", "4", "--batch-size", "8", "--workers", "1",
               "--quiet", "--set", "runtime.commit_every=0"]  # every video commits at once

    proc = subprocess.Popen(extract, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while _committed(url) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):  # already finished: the assertion below says so
        os.killpg(proc.pid, signal.SIGKILL)  # the job and its decode worker
    proc.wait()
    before = _committed(url)
    assert 0 < before < n, f"{before} videos committed when killed; the test did not test a crash"

    rerun = vtn(*extract[3:], check_rc=0)
    assert f"extracted {n - before} videos" in rerun.stderr and f"{before} already in the cache" in rerun.stderr

    verify = vtn("store", "verify", url, "--quiet", check_rc=0).stdout
    assert f"{url}: {n} videos" in verify and verify.strip().endswith("clean")
    info = json.loads(vtn("store", "info", url, "--json", check_rc=0).stdout)
    assert info["videos"] == n and {s: v["videos"] for s, v in info["splits"].items()} == {"train": 4, "val": 2}
    assert info["failures"] == [] and info["backbone"]["name"] == "resnet18"

    run = tmp_path / "run"
    vtn("train", url, "--out", run, *TINY, "--epochs", "1", "--set", "optim.min_steps=2", "--quiet", check_rc=0)
    assert (run / "last").is_dir() and (run / "metrics.jsonl").read_text().strip()
    metrics = json.loads(vtn("evaluate", run, "--cache", url, "--json", check_rc=0).stdout)
    assert metrics["videos"] == 2, metrics
    assert len((run / "predictions.csv").read_text().strip().splitlines()) == 1 + 2

    out = tmp_path / "local.h5"
    vtn("store", "export", url, "--out", out, check_rc=0)
    cache = open_cache(url)
    with h5py.File(out, "r") as f:
        exported = []
        f.visititems(lambda name, obj: exported.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert sorted(exported) == sorted(cache.ids)
        for vid in cache.ids:
            v = cache.video(vid)
            assert np.array_equal(f[vid][()], v.features)
            assert np.array_equal(f[vid].attrs["timestamps"], v.timestamps) and f[vid].attrs["label"] == v.label
