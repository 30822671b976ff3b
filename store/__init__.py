"""vtn.store: the Zarr feature cache (layout, writer, reader, index, verify, import/export, datasets).

This package imports none of the other stages; see store/layout.py for the on-disk layout.
"""

from vtn.store.layout import StoreError
from vtn.store.reader import FeatureCache, SplitData, Video, open_cache
from vtn.store.writer import CacheWriter, consolidate



def __getattr__(name: str):
    # The torch datasets load on first use, so store-only commands (`vtn store info`) do not import torch.
    if name in ("ClipDataset", "collate_clips", "LengthBucketSampler"):
        from vtn.store import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'vtn.store' has no attribute {name!r}")


__all__ = ["CacheWriter", "ClipDataset", "LengthBucketSampler", "collate_clips", "FeatureCache", "SplitData", "StoreError", "Video", "consolidate", "open_cache"]
