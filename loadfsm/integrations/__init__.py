"""Integrations with model libraries loadfsm does not own.

``hf`` (Hugging Face transformers, the ``loadfsm[hf]`` extra) builds a transformers model
on ``meta`` and loads it layer by layer; ``hf_pieces`` turns transformers' own checkpoint
conversion mapping into loadfsm pieces; ``hf_experts`` runs transformers' fused MoE
experts on FP8 weights. None of them is imported by ``import loadfsm``.
"""
