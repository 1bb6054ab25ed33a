"""Handlers register themselves on import; importing this package registers them all."""

from . import engine_fp8, fp8, kv_scales, passthrough  # noqa: F401
from .base import HANDLERS, Handler, register_handler

__all__ = ["HANDLERS", "Handler", "register_handler"]
