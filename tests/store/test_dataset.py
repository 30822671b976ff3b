import numpy as np
import pytest
import torch
from store_helpers import feats

from vtn.store import ClipDataset, LengthBucketSampler, collate_clips, open_cache
from vtn.store.clips import uniform_rows
from vtn.store.dataset import clip_rows


def test_clip_rows_modes():
    rng = np.random.default_rng(0)
    rows = clip_rows(100, 16, 4, None, rng)
    assert len(rows) == 16 and np.all(np.diff(rows) == 4) and rows[0] >= 0 and rows[-1] < 100
    short = clip_rows(40, 16, 8, None, rng)  # span of stride 8 does not fit: the stride shrinks, the length stays
    assert len(short) == 16 and np.all(np.diff(short) == 2) and short[-1] < 40
    assert list(clip_rows(5, 16, 8, None, rng)) == [0, 1, 2, 3, 4]
    assert list(clip_rows(10, None, 1, None, None)) == list(range(10))
    thin = clip_rows(1000, None, 1, 288, None)
    assert len(thin) == 288 and thin[0] == 0 and thin[-1] == 999
    # A whole-video view one frame in `stride`: evenly spread from the first frame to the last, still at most 288.
    sparse = clip_rows(1000, None, 8, 288, None)
    assert len(sparse) == 125 and sparse[0] == 0 and sparse[-1] == 999 and set(np.diff(sparse)) <= {8, 9}
    assert len(clip_rows(5000, None, 8, 288, None)) == 288 and list(clip_rows(3, None, 8, 288, None)) == [0]


def test_dataset_in_memory_and_streamed_agree(make_cache):
    url, videos = make_cache(12)
    cache = open_cache(url)
    a = ClipDataset(cache, "train", clip_frames=8, stride=3, seed=5)
    b = ClipDataset(cache.load_split("train"), clip_frames=8, stride=3, seed=5)
    assert len(a) == len(b) == sum(v[3] == "train" for v in videos)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["id"] == y["id"] and torch.equal(x["features"], y["features"]) and torch.equal(x["positions"], y["positions"])
        assert torch.equal(x["times"], y["times"]) and torch.equal(x["span"], y["span"])
    item = a[0]
    length = dict((v[0], v[1]) for v in videos)[item["id"]]
    full = torch.from_numpy(feats(item["id"], length).astype(np.float32))
    start = int(item["positions"][0]) // 2  # frame index = row * 2 in the test data
    assert torch.equal(item["features"], full[start:start + 3 * len(item["features"]):3][: len(item["features"])])
    a.set_epoch(1)
    assert any(not torch.equal(a[i]["positions"], b[i]["positions"]) for i in range(len(a)) if a.lengths[i] > 30)


def test_item_streams_are_seeded_by_seed_epoch_item_and_salt(make_cache):
    url, _ = make_cache(6)
    ds = ClipDataset(open_cache(url), "train", clip_frames=4, stride=2, seed=3)
    draw = lambda *key: ds.rng(*key).integers(0, 2**31, 4).tolist()  # noqa: E731
    assert draw(1) == np.random.default_rng((3, 0, 1)).integers(0, 2**31, 4).tolist()
    assert draw(1) == draw(1) and draw(1) != draw(2) and draw(1, 1) != draw(1) and draw(1, 1) != draw(1, 2)
    before = draw(1, 2)
    ds.set_epoch(1)
    assert draw(1, 2) != before
    # The item's clip is drawn from its unsalted stream.
    i = int(np.argmax(ds.lengths))
    assert np.array_equal(ds[i]["positions"].numpy() // 2, clip_rows(int(ds.lengths[i]), 4, 2, None, ds.rng(i)))


def test_whole_video_views_one_frame_in_stride_from_cache_and_from_raw_video_alike(make_cache):
    from vtn.extract.sampling import SamplingConfig, sample

    url, _ = make_cache(6)
    split = open_cache(url).load_split("train")
    whole = ClipDataset(split, clip_frames=None, stride=3, max_frames=288, train=False)
    assert whole.sample_lengths().tolist() == [len(whole.pick(i)) for i in range(len(whole))]
    assert all(len(whole.pick(i)) == -(-int(n) // 3) for i, n in enumerate(whole.lengths))
    # The same rows of the sampled frames when a predictor decodes raw video (`view_stride`, see whole_video_sampling)
    times = np.arange(250) / 25.0
    every = sample(times, SamplingConfig(mode="fps", fps=5))
    view = sample(times, SamplingConfig(mode="fps", fps=5, view_frames=288, view_stride=3))
    np.testing.assert_array_equal(view, every[clip_rows(len(every), None, 3, 288, None)])
    assert len(view) == 17


def test_uniform_rows_cover_the_whole_video_one_frame_per_segment_jittered_from_the_seed():
    for length, segments in ((100, 10), (1501, 64), (65, 64), (37, 5)):
        edges = np.floor(np.arange(segments + 1) * length / segments).astype(int)
        draws = [uniform_rows(length, segments, np.random.default_rng(s)) for s in range(20)]
        for rows in draws:  # one frame in each segment, so the view starts in the first and ends in the last
            assert len(rows) == segments and np.all((rows >= edges[:-1]) & (rows < edges[1:]))
        assert np.array_equal(draws[0], uniform_rows(length, segments, np.random.default_rng(0)))  # the seed's
        if length >= 2 * segments:  # segments of >= 2 frames: the place in each varies with the seed
            assert len({tuple(r) for r in draws}) == 20
    firsts = {int(uniform_rows(100, 10, np.random.default_rng(s))[0]) for s in range(200)}
    assert firsts == set(range(10))  # every frame of a segment can be drawn
    middle = uniform_rows(100, 10, None)
    assert list(middle) == [4, 14, 24, 34, 44, 54, 64, 74, 84, 94]
    assert list(uniform_rows(7, 10, np.random.default_rng(0))) == list(range(7))  # short: every frame


def test_training_views_mixed_proportions_and_speed_replayed_from_seed_epoch_item(make_cache):
    url, _ = make_cache(12)
    split = open_cache(url).load_split("train")
    ds = ClipDataset(split, clip_frames=4, stride=3, seed=1, sampling="mixed", uniform_share=0.3, segments=6,
                     speed=(0.5, 2.0))
    # the mixed mode's share: its own stream per (seed, epoch, item); over 4,000 draws within 3 points of 30 %
    kinds = []
    for epoch in range(500):
        ds.set_epoch(epoch)
        kinds += [ds.view_kind(i) for i in range(len(ds))]
    assert abs(kinds.count("uniform") / len(kinds) - 0.3) < 0.03 and len(kinds) >= 4000
    # temporal scale: dense strides and uniform densities vary with the epoch, within the speed range
    strides, sizes = set(), set()
    long = [i for i in range(len(ds)) if ds.lengths[i] >= 40]
    for epoch in range(30):
        ds.set_epoch(epoch)
        for i in long:
            rows = ds.pick(i)
            (strides if ds.view_kind(i) == "dense" else sizes).add(
                int(np.diff(rows)[0]) if ds.view_kind(i) == "dense" else len(rows))
            assert np.array_equal(rows, ds.pick(i))  # the same (seed, epoch, item): the same view, again
    assert strides <= {2, 3, 4, 5, 6} and len(strides) >= 3 and sizes <= {3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
    assert len(sizes) >= 3
    # a fresh dataset (a resumed run) at the same epoch draws the same views
    again = ClipDataset(split, clip_frames=4, stride=3, seed=1, sampling="mixed", uniform_share=0.3, segments=6,
                        speed=(0.5, 2.0))
    again.set_epoch(29)
    assert all(np.array_equal(ds.pick(i), again.pick(i)) for i in range(len(ds)))


def test_collate_pads_with_masks(make_cache):
    url, _ = make_cache(6)
    ds = ClipDataset(open_cache(url), None, train=False, max_frames=50)
    items = [ds[i] for i in range(4)]
    batch = collate_clips(items)
    t = max(len(x["features"]) for x in items)
    assert batch["features"].shape == (4, t, 16) and batch["mask"].dtype == torch.bool
    for j, x in enumerate(items):
        n = len(x["features"])
        assert batch["mask"][j].sum() == n and not batch["mask"][j, n:].any()
        assert torch.equal(batch["features"][j, :n], x["features"]) and (batch["features"][j, n:] == 0).all()
        assert torch.equal(batch["times"][j, :n], x["times"])
    assert batch["labels"].tolist() == [x["label"] for x in items]


def test_length_bucket_sampler():
    lengths = np.array([5, 100, 6, 99, 50, 51])
    batches = list(LengthBucketSampler(lengths, batch_size=2, seed=0))
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(abs(lengths[b[0]] - lengths[b[1]]) <= 1 for b in batches)  # similar lengths share a batch
    # Two processes split every global batch of 4: together each step sees what one process's step sees.
    one = LengthBucketSampler(lengths[:5], batch_size=4, seed=0).global_batches()
    ranks = [LengthBucketSampler(lengths[:5], 4, seed=0, num_replicas=2, rank=r).shares() for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 2  # the same number of steps, so no rank waits
    for step, batch in enumerate(one):
        (a, wa), (b, wb) = ranks[0][step], ranks[1][step]
        if len(batch) == 1:  # rank 1's share of a one-item batch is empty: a stand-in item weighted 0
            assert a == batch and (wa, wb) == (2.0, 0.0)
        else:
            assert sorted(a + b) == sorted(batch) and wa == wb == 2 / len(batch)


@pytest.mark.parametrize("layout", ["current", "zstd-256"])  # new caches; caches written before lz4 and small chunks
def test_streamed_clips_of_wide_features_cross_chunks_and_equal_memory(tmp_path, monkeypatch, layout):
    import vtn.store.writer as writer
    from zarr.codecs import BloscCodec, Crc32cCodec

    from vtn.store import CacheWriter

    if layout == "zstd-256":
        monkeypatch.setattr(writer, "feature_chunk_rows", lambda dim, itemsize: 256)
        monkeypatch.setattr(writer, "compressors", lambda size: [
            BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=size), Crc32cCodec()])
    rng = np.random.default_rng(0)
    url = str(tmp_path / "c.zarr")
    with CacheWriter(url, feature_dim=768, class_names=["a", "b"]) as w:
        for v in range(6):
            n = int(rng.integers(130, 300))
            idx = np.sort(rng.choice(10 * n, n, replace=False))
            w.add(f"v{v}", rng.standard_normal((n, 768)).astype(np.float16), idx / 29.97, idx, label=v % 2, split="train")
    cache = open_cache(url)
    array = cache.root["parts"][cache.index["part"][0]]["features"]
    assert array.metadata.codecs[0].chunk_shape == ((32, 768) if layout == "current" else (256, 768))
    streamed = ClipDataset(cache, "train", clip_frames=16, stride=8, seed=1)
    memory = ClipDataset(cache.load_split("train"), clip_frames=16, stride=8, seed=1)
    for epoch in range(3):
        streamed.set_epoch(epoch), memory.set_epoch(epoch)
        for i in range(len(streamed)):
            x, y = streamed[i], memory[i]
            assert x["id"] == y["id"] and all(torch.equal(x[k], y[k]) for k in ("features", "positions", "times", "span"))
