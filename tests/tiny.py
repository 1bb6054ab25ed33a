"""The small Llama config the push, reliability and trace tests share (2 layers, FP8-able)."""

from dataclasses import replace

from loadfsm.models import CONFIGS

SMALL = replace(CONFIGS["tiny"], vocab_size=256, hidden_size=64, intermediate_size=128,
                num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=16)
