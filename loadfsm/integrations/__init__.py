"""Integrations with model libraries loadfsm does not own.

``hf`` (Hugging Face transformers, the ``loadfsm[hf]`` extra) builds a transformers model
on ``meta`` and loads it layer by layer; ``hf_pieces`` turns transformers' own checkpoint
conversion mapping into loadfsm pieces; ``hf_experts`` runs transformers' fused MoE
experts on FP8 weights. None of them is imported by ``import loadfsm``.

``engine`` is the engine hook (``with LoadSession(model) as s: model.load_weights(w)``):
an engine's own ``weight_loader`` calls become arrivals; ``engine_shards`` declares which
piece each call fills, ``writes`` checks the region it wrote, ``tp`` holds the
tensor-parallel helpers the reference engine model uses.
"""
