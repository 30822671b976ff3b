"""vtn.store: the Zarr feature cache (layout, writer, reader, index, verify, import/export, datasets).

This package imports none of the other stages; see store/layout.py for the on-disk layout. Names load on
first use, so `vtn --help` (which imports store/cli.py, and so this package) does not import zarr or torch.
"""

import importlib

_EXPORTS = {
    "StoreError": "layout", "DiskFull": "layout",
    "FeatureCache": "reader", "SplitData": "reader", "Video": "reader", "open_cache": "reader",
    "CacheWriter": "writer", "consolidate": "writer",
    "ClipDataset": "dataset", "LengthBucketSampler": "dataset", "collate_clips": "dataset",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vtn.store.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vtn.store' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
