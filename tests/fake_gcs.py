"""An in-memory stand-in for Google Cloud Storage behind `gs://` paths (no bucket is reachable in tests).

`fake_gcs` registers it as fsspec's `gs`/`gcs` implementation, which is what `etils.epath` uses for
`gs://` paths when TensorFlow is absent, so entrl's own code runs unchanged against `gs://bucket/...`.
It keeps the GCS semantics that matter to entrl: objects, not directories (`mkdir` does nothing and
a "directory" exists only while objects lie under it), and no appends (objects are written whole).

Not covered: orbax's checkpoint arrays, which TensorStore writes with its own GCS HTTP driver
(not through fsspec), so checkpoints on this fake would go to the network.
"""

from __future__ import annotations

import importlib

import fsspec
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]
    root_marker = ""

    def mkdir(self, path, create_parents=True, **kwargs):
        pass  # GCS has no directories

    def makedirs(self, path, exist_ok=False):
        pass

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError("GCS objects cannot be appended to")
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs():
    """The fake's object store ({'gs://bucket/key': MemoryFile}); `gs://` paths use it during the test."""
    FakeGCS.store = {}
    FakeGCS.pseudo_dirs = [""]
    FakeGCS.clear_instance_cache()
    for name in FakeGCS.protocol:
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        yield FakeGCS.store
    finally:
        for name in FakeGCS.protocol:  # back to the lazily imported real implementation
            importlib.import_module("fsspec.registry")._registry.pop(name, None)
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
        FakeGCS.store = {}
