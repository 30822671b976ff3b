import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import store_helpers (importlib mode adds no test dirs)

from store_helpers import CLASSES, D, add, plan  # noqa: E402

from vtn.store import CacheWriter  # noqa: E402


@pytest.fixture
def make_cache(tmp_path):
    """Build a cache of `n` planned videos; returns (url, plan)."""

    def make(n: int = 20, name: str = "cache.zarr", **kw):
        url = str(tmp_path / name)
        videos = plan(n)
        with CacheWriter(url, feature_dim=D, class_names=CLASSES, attrs={"backbone": {"name": "test"}}, **kw) as w:
            for v in videos:
                add(w, *v)
        return url, videos

    return make
