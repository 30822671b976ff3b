"""`is_vtn_cache` on a remote URL: missing or not a group is "not a vtn cache"; a refused access is an error."""

import fsspec
import pytest
import zarr
from fsspec.implementations.memory import MemoryFileSystem

from vtn.paths import SCHEMA_KEY, is_vtn_cache


class DeniedFileSystem(MemoryFileSystem):
    """A store whose every read is refused, as an object store answers wrong credentials (HTTP 403)."""

    protocol = "denied"

    def _denied(self, *args, **kwargs):
        raise PermissionError("403 Forbidden: the credentials are not allowed to read this bucket")

    cat_file = _cat_file = open = _open = info = ls = exists = _denied


def test_remote_is_vtn_cache_says_no_only_for_missing_or_not_a_group_and_lets_a_refused_access_through():
    root = "memory://paths-remote"
    zarr.open_group(f"{root}/cache", mode="w").attrs[SCHEMA_KEY] = 1
    zarr.open_group(f"{root}/plain", mode="w")
    zarr.create_array(f"{root}/array", shape=(2,), dtype="i4")
    fsspec.filesystem("memory").pipe("/paths-remote/text/zarr.json", b"not json")
    assert is_vtn_cache(f"{root}/cache")
    assert not any(is_vtn_cache(f"{root}/{name}") for name in ("missing", "plain", "array", "text"))
    fsspec.register_implementation("denied", DeniedFileSystem, clobber=True)
    with pytest.raises(PermissionError, match="403"):
        is_vtn_cache("denied://bucket/cache")
