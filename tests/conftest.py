"""Fixtures several test modules share. Plain helpers live in modules the tests import:
``checks`` (comparisons), ``faults`` (fault injection), ``op_count`` (work counted, not
timed) and ``tiny_models`` (models, configs, arrival orders); no test module imports
another."""

from __future__ import annotations

import pytest

from loadfsm.testing import write_checkpoint


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """``checkpoint_dir(config, seed=0)``: the reference weights of ``config`` written once
    per session, in 200 KB shards so that layers span files."""
    root, paths = tmp_path_factory.mktemp("ckpt"), {}

    def get(config, seed=0):
        if (config, seed) not in paths:
            paths[config, seed] = write_checkpoint(config, root / str(len(paths)), seed=seed,
                                                   max_shard_bytes=200_000)
        return paths[config, seed]

    return get
