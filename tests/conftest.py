"""Shared fixtures: test checkpoints are written once per session, per geometry."""

from __future__ import annotations

import pytest

from lvb.testing.checkpoints import GEOMETRIES, write_checkpoint


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Returns a function name -> checkpoint dir, writing each geometry once."""
    written: dict[str, object] = {}

    def make(name: str):
        if name not in written:
            written[name] = write_checkpoint(tmp_path_factory.mktemp(name), name)
        return written[name]

    return make


@pytest.fixture(params=sorted(GEOMETRIES))
def checkpoint(request, checkpoint_factory):
    return checkpoint_factory(request.param)
