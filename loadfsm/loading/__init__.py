"""A load in parts: planning, the arrival driver, the finiteness batch, the model writer
and the report builder, wired by ``LoadSession``."""

from .session import LoadSession, default_device

__all__ = ["LoadSession", "default_device"]
