"""``loadfsm.hf.from_pretrained``: transformers models loaded layer by layer.

A thin alias of ``loadfsm.integrations.hf``; transformers (the ``loadfsm[hf]`` extra) is
imported on first use, so ``import loadfsm`` and ``import loadfsm.hf`` never need it.

    model, report = loadfsm.hf.from_pretrained("ckpt_dir/", quant="fp8", device="cuda")
    model.generate(input_ids, max_new_tokens=8)
"""

from __future__ import annotations

__all__ = ["from_pretrained", "HfLoad", "init_non_persistent_buffers"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'loadfsm.hf' has no attribute {name!r}")
    try:
        from .integrations import hf
    except ImportError as exc:
        raise ImportError("loadfsm.hf needs transformers: pip install 'loadfsm[hf]'") from exc
    return getattr(hf, name)
