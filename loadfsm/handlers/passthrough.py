"""Layers loaded as they are: norms, embeddings, excluded linears."""

from __future__ import annotations

from .base import Handler, register_handler


@register_handler("passthrough")
class PassthroughHandler(Handler):
    """Claims every layer no other handler wants; its results are its staging tensors."""

    def claims(self, layer_name, module) -> bool:
        return True
