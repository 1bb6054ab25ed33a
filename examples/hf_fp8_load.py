"""Load a Hugging Face transformers MoE model in FP8, layer by layer, generate, then
push a trainer's weights into it in place.

Everything runs offline: a tiny Mixtral is built from a config, saved with
``save_pretrained`` in bf16 (sharded, with an index), then loaded by
``loadfsm.hf.from_pretrained``: each layer materializes, quantizes and finalizes as its
weights arrive, so the bf16 model never exists in memory at once. A second model of the
class (the "trainer") then pushes its ``named_parameters()`` with ``WeightSync``: every
layer, the fused FP8 experts included, is re-quantized into its live tensors.

    pip install 'loadfsm[hf]'
    python examples/hf_fp8_load.py [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import loadfsm
import loadfsm.hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="target device (default: best available)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as ckpt:
        torch.manual_seed(0)
        config = MixtralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                               num_local_experts=4, num_experts_per_tok=2)
        MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(ckpt, max_shard_size="200KB")

        model, report = loadfsm.hf.from_pretrained(ckpt, quant="fp8", device=args.device)
        prompt = torch.tensor([[1, 17, 42, 99]], device=report.device)
        tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)

    torch.manual_seed(1)
    trainer = MixtralForCausalLM(config).to(torch.bfloat16)
    pushed = loadfsm.WeightSync(model).push(trainer.named_parameters())
    after = model.generate(prompt, max_new_tokens=8, do_sample=False)

    print(f"generated: {tokens[0, prompt.shape[1]:].tolist()}")
    print(f"layers:    {report.states['FINALIZED']} FINALIZED of {len(report.layer_states)}")
    print(f"final:     {report.final_bytes / 2**20:.2f} MiB ({report.quant})")
    print(f"peak:      {report.peak_bytes / 2**20:.2f} MiB "
          f"(largest layer staging {report.largest_layer_bytes / 2**20:.2f} MiB)")
    print(f"read:      {report.bytes_read / 2**20:.2f} MiB in {report.seconds:.3f} s, "
          f"at most {report.max_layers_in_flight} layer(s) in flight")
    print(f"push:      {pushed.layers_updated} layers re-quantized in place from "
          f"{pushed.bytes_received / 2**20:.2f} MiB of bf16")
    print(f"after:     {after[0, prompt.shape[1]:].tolist()}")


if __name__ == "__main__":
    main()
