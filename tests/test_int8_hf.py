"""INT8 through ``loadfsm.hf.from_pretrained``: transformers' own models, saved with
``save_pretrained``, loaded with ``quant="int8"``: logits against transformers'
``from_pretrained``, and a trainer's push bit-identical to a fresh INT8 load.

transformers' fused experts (``Fp8Experts`` under FP8) have no INT8 form: under INT8
they load and push in bf16, and every linear around them is INT8.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import loadfsm  # noqa: E402
import loadfsm.hf  # noqa: E402
from loadfsm.quant import Int8Config, Int8Linear, sqnr_db  # noqa: E402

_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                intermediate_size=128)
FAMILIES = {
    "llama": _DECODER,
    "qwen2": _DECODER,                                   # q/k/v biases
    "mixtral": dict(_DECODER, num_local_experts=4, num_experts_per_tok=2),
}
TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (path of seed 0, trainer model of seed 1, path of seed 1), made once."""
    root, made = tmp_path_factory.mktemp("hf_int8"), {}

    def get(family):
        if family not in made:
            config = AutoConfig.for_model(family, **FAMILIES[family])
            paths = []
            for seed in (0, 1):
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
                paths.append(root / f"{family}-{seed}")
                model.save_pretrained(paths[-1], max_shard_size="100KB")
            made[family] = (paths[0], model, paths[1])
        return made[family]

    return get


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits.float()


def _addresses(model):
    return {n: (t.data_ptr(), t.shape, t.dtype) for n, t in model.state_dict().items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_int8_logits_sqnr_against_from_pretrained(checkpoints, family):
    """Linears are Int8Linear (lm_head and routers excluded); logits >= 35 dB from
    transformers' own bf16 load (measured 39.2-40.9 dB; FP8 per tensor: 28.8-30.7)."""
    path, _, _ = checkpoints(family)
    model, report = loadfsm.hf.from_pretrained(path, quant="int8", device="cpu")
    assert report.quant == "int8" and report.states["FINALIZED"] == len(report.layer_states)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear)
    assert type(model.lm_head) is nn.Linear
    assert not any(isinstance(m, Int8Linear) for n, m in model.named_modules()
                   if n.endswith(".gate"))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert sqnr_db(_logits(reference), _logits(model)) >= 35.0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainer_push_equals_fresh_int8_load(checkpoints, family):
    """WeightSync(model) of a trainer's parameters: bit-identical to a fresh INT8 load of
    them, and no live tensor moved."""
    path, trainer, trainer_path = checkpoints(family)
    model, _ = loadfsm.hf.from_pretrained(path, quant="int8", device="cpu")
    before = _addresses(model)
    loadfsm.WeightSync(model).push(trainer.named_parameters())
    fresh, _ = loadfsm.hf.from_pretrained(trainer_path, quant="int8", device="cpu")
    expected = fresh.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert _addresses(model) == before


def test_a_config_object_is_used_as_given(checkpoints):
    """An Int8Config keeps its own exclude list (the string form adds the routers)."""
    path, _, _ = checkpoints("llama")
    config = Int8Config(exclude=("lm_head", "*.v_proj"))
    model, _ = loadfsm.hf.from_pretrained(path, quant=config, device="cpu")
    attention = model.model.layers[0].self_attn
    assert type(attention.v_proj) is nn.Linear and isinstance(attention.k_proj, Int8Linear)
    assert loadfsm.WeightSync(model).session.quant == config
