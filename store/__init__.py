"""vtn.store: the Zarr feature cache (layout, writer, reader, index, verify, import/export, datasets).

This package imports none of the other stages; see store/layout.py for the on-disk layout.
"""

from vtn.store.layout import StoreError
from vtn.store.reader import FeatureCache, SplitData, Video, open_cache
from vtn.store.writer import CacheWriter, consolidate

__all__ = ["CacheWriter", "FeatureCache", "SplitData", "StoreError", "Video", "consolidate", "open_cache"]
