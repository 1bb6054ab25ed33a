"""A pre-quantized FP8 checkpoint through the engine hook on vLLM's own classes: vLLM's
online layout has no place for checkpoint scales, so the session refuses before a loader
runs, naming the layer (vLLM loads such checkpoints with its own FP8 method)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import loadfsm  # noqa: E402
import vllm_models as models  # noqa: E402


def test_a_prequantized_layout_is_refused_by_vllm_classes(ckpts, dist):
    """ModelStateError naming a vLLM linear, raised when the session is made."""
    model, config = models.build(ckpts["llama"][0], "meta")
    layout = loadfsm.Fp8CheckpointConfig("block", scale_name="weight_scale_inv")
    with models.current(config):
        with pytest.raises(loadfsm.ModelStateError, match="pre-quantized") as err:
            loadfsm.LoadSession(model, quant=layout, device="cpu")
    assert err.value.layer.endswith("proj")
