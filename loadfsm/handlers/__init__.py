"""Handlers, chosen per module by ``registry.handler_for``; importing this package
registers the built-in ones."""

from . import engine_fp8, fp8, fp8_checkpoint, int8, kv_scales  # noqa: F401
from .base import Handler, Install, WeightQuantizer
from .registry import handler_for, installer_of, register_handler

__all__ = ["Handler", "Install", "WeightQuantizer", "handler_for", "installer_of",
           "register_handler"]
