"""Live writers (store/lease.py): a claimed share is exclusive, --overwrite waits for no one, dead writers stop counting."""

import errno
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zarr
from store_helpers import CLASSES, D, add, plan

from vtn.store import CacheWriter, StoreError, open_cache
from vtn.store import lease as lease_mod
from vtn.store.verify import verify


def _writer(url, **kw):
    return CacheWriter(url, feature_dim=D, class_names=CLASSES, commit_every=0, **kw)


def test_a_second_claim_on_the_same_videos_is_refused_until_the_first_closes(tmp_path):
    url = str(tmp_path / "c.zarr")
    first = _writer(url, share=(0, 1))
    with pytest.raises(StoreError, match=r"c\.zarr: another writer is writing the same videos .*pid \d+"):
        _writer(url, share=(0, 1))
    with pytest.raises(StoreError, match="another writer"):  # any share overlaps "all videos"
        _writer(url, share=(1, 2))
    assert list(lease_mod.live_writers(zarr.open_group(url, mode="r+"))) == [first._lease.name]  # refused left nothing
    add(first, *plan(1)[0])
    first.close()
    second = _writer(url, share=(0, 1))
    assert second.committed_ids() == {plan(1)[0][0]}  # it starts from what the first committed
    second.close()
    assert lease_mod.live_writers(zarr.open_group(url, mode="r+")) == {}


def test_disjoint_shares_and_unclaimed_writers_write_side_by_side(tmp_path):
    url = str(tmp_path / "c.zarr")
    writers = [_writer(url, share=(0, 2)), _writer(url, share=(1, 2)), _writer(url), _writer(url)]
    for w, v in zip(writers, plan(4)):
        add(w, *v)
    for w in writers:
        w.close()
    assert len(open_cache(url)) == 4


def test_a_writer_that_loses_the_race_to_create_the_cache_joins_it(tmp_path, monkeypatch):
    """Job-array tasks start together: one sees no cache, then zarr finds the other's zarr.json as it creates its own."""
    url = str(tmp_path / "c.zarr")
    first = _writer(url, share=(0, 2))
    from vtn.store import writer as writer_mod
    real_open_root, real_open_group = writer_mod.open_root, zarr.open_group
    looked = []

    def not_there_yet(*args):
        looked.append(args)
        if len(looked) == 1:
            raise StoreError(f"{url}: not a vtn cache")
        return real_open_root(*args)

    def created_meanwhile(*args, mode, **kw):
        if mode == "w-":
            raise zarr.errors.ContainsGroupError(f"A group exists in store {url!r} at path ''.")
        return real_open_group(*args, mode=mode, **kw)

    monkeypatch.setattr(writer_mod, "open_root", not_there_yet)
    monkeypatch.setattr(zarr, "open_group", created_meanwhile)
    second = _writer(url, share=(1, 2))
    for w, v in zip([first, second], plan(2)):
        add(w, *v)
        w.close()
    assert len(open_cache(url)) == 2 and len(looked) == 2


def test_a_writer_waits_for_the_cache_another_writer_is_creating(tmp_path):
    out = tmp_path / "c.zarr"
    out.mkdir()
    partial = out / "zarr.0123abcd.partial"
    partial.write_bytes(b"")  # the first writer is writing zarr.json now

    def finish_creating():
        time.sleep(0.5)
        partial.unlink()
        _writer(str(out), share=(0, 2)).close()

    other = threading.Thread(target=finish_creating)
    other.start()
    second = _writer(str(out), share=(1, 2))  # neither refused as foreign nor failing on the missing zarr.json
    add(second, *plan(1)[0])
    second.close()
    other.join()
    assert len(open_cache(str(out))) == 1


def test_overwrite_is_refused_while_a_writer_is_live(tmp_path):
    url = str(tmp_path / "c.zarr")
    live = _writer(url)
    add(live, *plan(1)[0])
    with pytest.raises(StoreError, match="a writer is live on this cache .*--overwrite would delete"):
        _writer(url, overwrite=True)
    live.close()
    assert len(open_cache(url)) == 1  # untouched
    _writer(url, overwrite=True).close()
    assert len(open_cache(url)) == 0


def _entry(url, **attrs):
    g = zarr.open_group(url, mode="r+").require_group("writers")
    now = time.time()
    g.create_group(f"x{len(list(g.groups()))}", attributes={"host": socket.gethostname(), "pid": 1, "share": [0, 1],
                                                             "started": now - 5, "beat": now, **attrs})


def test_dead_and_stale_writers_do_not_count(tmp_path):
    url = str(tmp_path / "c.zarr")
    _writer(url).close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _entry(url, pid=int(dead.stdout))  # a writer killed on this host: its process is gone
    _entry(url, host="elsewhere", beat=time.time() - lease_mod.STALE_S - 1)  # another host, silent too long
    _writer(url, share=(0, 1)).close()
    assert lease_mod.live_writers(zarr.open_group(url, mode="r+")) == {}  # and their entries are cleared away
    _entry(url, host="elsewhere")  # another host, seen just now
    with pytest.raises(StoreError, match="on elsewhere, all videos"):
        _writer(url, share=(0, 1))


def test_the_beat_keeps_a_long_writer_live(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_mod, "BEAT_S", 0.05)
    url = str(tmp_path / "c.zarr")
    w = _writer(url, share=(0, 1))
    first = dict(zarr.open_group(url, mode="r")["writers"][w._lease.name].attrs)["beat"]
    time.sleep(0.5)
    assert dict(zarr.open_group(url, mode="r")["writers"][w._lease.name].attrs)["beat"] > first
    w.close()


@pytest.mark.parametrize("fails", [(zarr.Array, "__setitem__"), (zarr.Group, "update_attributes")],
                         ids=["rows", "commit record"])
def test_disk_full_is_one_message_and_leaves_no_empty_part(tmp_path, monkeypatch, fails):
    """The disk fills while writing a video's rows, or after them while writing the record that commits them:
    either way that video is not counted as kept."""
    url = str(tmp_path / "c.zarr")
    with _writer(url) as w:
        add(w, *plan(2)[0])
    real = getattr(*fails)

    def full(self, *a):
        raise OSError(errno.ENOSPC, "No space left on device")

    w = _writer(url)
    monkeypatch.setattr(*fails, full)
    with pytest.raises(StoreError, match=r"c\.zarr: the disk is full .*the 1 videos committed so far are kept "
                                         r"\(0 by this run\), 1 in progress are not.*run the same command again"):
        with w:
            add(w, *plan(2)[1])
    monkeypatch.setattr(*fails, real)
    parts = [p.name for p in (Path(url) / "parts").iterdir() if p.is_dir()]
    assert len(parts) == 1 and w.part_name not in parts  # the failed writer's empty part is gone
    assert verify(url, progress=False)[0] == []
    assert len(open_cache(url)) == 1
    assert lease_mod.live_writers(zarr.open_group(url, mode="r+")) == {}
