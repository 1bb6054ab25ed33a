"""``loadfsm.hf.from_pretrained`` on FP8 checkpoints in each published layout: a transformers
Llama saved in bf16, its projections quantized as DeepSeek-V3, compressed-tensors and
ModelOpt store them, with their ``config.json``. transformers' own loading of these needs
accelerate or compressed-tensors (absent offline), so the reference is the model loaded
from the dequantized bf16 weights: on CPU the FP8 modules dequantize before the matmul,
so the logits agree bit for bit."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from structlog.testing import capture_logs  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import loadfsm.hf  # noqa: E402
from loadfsm.integrations.hf_prequantized import PrequantizedFp8Experts  # noqa: E402
from loadfsm.quant.fp8 import dequantize_fp8, sqnr_db  # noqa: E402
from loadfsm.quant.prequantized import PrequantizedFp8Linear  # noqa: E402
from loadfsm.testing.fp8_checkpoint import (LAYOUTS, dequantized_state,  # noqa: E402
                                            quantize_state, write_fp8_checkpoint,
                                            write_safetensors)

BLOCK = (32, 32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny transformers Llama saved in bf16 (one file)."""
    root = tmp_path_factory.mktemp("hf_fp8")
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, intermediate_size=128,
                         max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(root / "bf16")
    return root


def _pair(saved, layout):
    """The FP8 checkpoint in ``layout`` and the bf16 one it stands for."""
    state = load_file(saved / "bf16" / "model.safetensors")
    config = json.loads((saved / "bf16" / "config.json").read_text())
    tensors = quantize_state(state, layout, block_size=BLOCK)
    fp8 = write_fp8_checkpoint(tensors, saved / layout, layout=layout, block_size=BLOCK,
                               config=config)
    bf16 = saved / f"{layout}-dequantized"
    bf16.mkdir(exist_ok=True)
    write_safetensors(dequantized_state(tensors, layout, block_size=BLOCK),
                      bf16 / "model.safetensors")
    shutil.copy(saved / "bf16" / "config.json", bf16 / "config.json")
    return fp8, bf16


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_the_dequantized_bf16_model(saved, layout):
    """Every layer FINALIZED, every projection pre-quantized, logits bit-identical."""
    fp8, bf16 = _pair(saved, layout)
    model, report = loadfsm.hf.from_pretrained(fp8, device="cpu")
    reference, _ = loadfsm.hf.from_pretrained(bf16, quant=None, device="cpu")
    assert report.states["FINALIZED"] == len(report.layer_states)
    fp8_layers = [m for m in model.modules() if isinstance(m, PrequantizedFp8Linear)]
    assert len(fp8_layers) == 2 * 7
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_the_block_size_comes_from_config_json(saved):
    """DeepSeek-V3's ``weight_block_size`` in config.json sets the tiles; the default
    quant ("fp8", per tensor) differs, so a warning names both and blocks are kept."""
    fp8, _ = _pair(saved, "deepseek")
    with capture_logs() as logs:
        model, _ = loadfsm.hf.from_pretrained(fp8, device="cpu")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.config.granularity == "block" and q_proj.config.block_size == BLOCK
    assert any(e["event"] == "checkpoint_quant_differs" and e["checkpoint"] == "fp8-block 32x32"
               for e in logs)


def _expert_weights(name):
    """Projections, per-expert ones included (Mixtral's w1/w2/w3); routers stay bf16."""
    return name.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight"))


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_fused_experts_take_per_expert_fp8_tensors(tmp_path, family):
    """An MoE checkpoint with one FP8 tensor and block scale per expert projection loads
    into transformers' fused experts (routers bf16); logits equal the dequantized model's,
    and a trainer's pre-quantized push lands in place."""
    from transformers import MixtralConfig, Qwen2MoeConfig
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    config = (Qwen2MoeConfig(**small, intermediate_size=96, moe_intermediate_size=48,
                             num_experts=4, num_experts_per_tok=2,
                             shared_expert_intermediate_size=96)
              if family == "qwen2_moe" else
              MixtralConfig(**small, intermediate_size=96, num_local_experts=4,
                            num_experts_per_tok=2))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    state = load_file(tmp_path / "bf16" / "model.safetensors")
    block = (16, 16)
    tensors = quantize_state(state, "deepseek", block_size=block, quantize=_expert_weights)
    body = json.loads((tmp_path / "bf16" / "config.json").read_text())
    fp8 = write_fp8_checkpoint(tensors, tmp_path / "fp8", layout="deepseek", block_size=block,
                               config=body)
    bf16 = tmp_path / "dequantized"
    bf16.mkdir()
    write_safetensors(dequantized_state(tensors, "deepseek", block_size=block),
                      bf16 / "model.safetensors")
    shutil.copy(tmp_path / "bf16" / "config.json", bf16 / "config.json")
    model, report = loadfsm.hf.from_pretrained(fp8, quant="fp8-block", device="cpu")
    reference, _ = loadfsm.hf.from_pretrained(bf16, quant=None, device="cpu")
    assert report.states["FINALIZED"] == len(report.layer_states)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, PrequantizedFp8Experts) and experts.config.block_size == block
    ref = reference.model.layers[0].mlp.experts
    for attr in ("gate_up_proj", "down_proj"):
        assert torch.equal(dequantize_fp8(getattr(experts, attr),
                                          getattr(experts, f"{attr}_scale"), experts.config),
                           getattr(ref, attr)), attr
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        # Same weights; Mixtral's own experts order their bf16 ops unlike Fp8Experts.
        assert sqnr_db(expected.float(), model(ids).logits.float()) >= 30.0
    ptr = experts.gate_up_proj.data_ptr()
    halved = quantize_state({n: t / 2 for n, t in state.items()}, "deepseek", block_size=block,
                            quantize=_expert_weights)
    loadfsm.WeightSync(model, session=report).push(halved.items())
    assert experts.gate_up_proj.data_ptr() == ptr
    want = dequantized_state(halved, "deepseek", block_size=block)
    down = want[next(n for n in want if ".experts.3." in n and n.startswith(
        "model.layers.0.") and n.endswith(("down_proj.weight", "w2.weight")))]
    assert torch.equal(dequantize_fp8(experts.down_proj[3], experts.down_proj_scale[3],
                                      experts.config), down)
