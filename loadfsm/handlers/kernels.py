"""Which handler installed a kernel module: the registry read by module type.

A handler declares the kernel module classes it installs (``Handler.installs``). A model
loaded earlier holds those modules; re-planning it (a weight push) must give each one
back to the handler that made it, whatever order or arguments the new session has.
The lookup walks the module's class hierarchy, nearest class first, so a subclass of a
kernel module (``Fp8Experts`` of ``Fp8StackedExperts``) finds its own handler, and a
user's subclass with no handler of its own finds its base's.
"""

from __future__ import annotations

from torch import nn

from .base import HANDLERS, Handler


def installer_of(module: nn.Module) -> type[Handler] | None:
    """The registered handler that installs ``module``'s class (or its nearest base)."""
    for cls in type(module).__mro__:
        for handler in HANDLERS.values():
            if cls in handler.__dict__.get("installs", ()):
                return handler
    return None


def installers(model: nn.Module) -> tuple[str, ...]:
    """Names of the handlers whose kernel modules ``model`` holds, in model order."""
    names = (installer_of(m) for m in model.modules())
    return tuple(dict.fromkeys(h.name for h in names if h is not None))
