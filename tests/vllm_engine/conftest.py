"""Shared fixtures of the real-vLLM suite: tiny checkpoints (transformers'
``save_pretrained``), one distributed init per process, vLLM's own reference loads."""

from __future__ import annotations

import pytest

import vllm_models as models


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Model kind -> (checkpoint of seed 0, checkpoint of seed 1)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {kind: (models.write_checkpoint(kind, root / kind, seed=0),
                   models.write_checkpoint(kind, root / f"{kind}-new", seed=1))
            for kind in models.MODELS}


@pytest.fixture(scope="session")
def dist(ckpts):
    """vLLM's process groups, once per process (a MoE config current: expert groups)."""
    models.init_distributed(models.vllm_config(ckpts["mixtral"][0]))


@pytest.fixture(scope="session")
def reference(ckpts, dist):
    """Kind -> (vLLM's model built on CPU, loaded by its own ``load_weights``, its names)."""
    return {kind: models.vllm_load(ckpts[kind][0]) for kind in ckpts}
