"""Which handler loads a module: chosen by the module's type, keyed to the quant config.

The torchao pattern: a handler registers for module types under a config type
(``Fp8Config``), or for no config (loaded the same way whatever the scheme). Choosing,
for one module:
  1. a kernel module a handler installed (``Handler.installs``) goes back to that handler,
     so re-planning a loaded model finds the same handler with no arguments;
  2. with a config that does not exclude the module: the handlers registered for the
     config's type, by exact module type, then by base class (``subclasses=True``),
     then by predicate (``when``), in registration order;
  3. the handlers registered for no config, the same way;
  4. ``Handler`` itself: tensors loaded as they are.
Registration happens at import (``loadfsm.handlers`` and each integration); user code
registers its own handlers the same way, from outside the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .base import Handler

Predicate = Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class _Entry:
    handler: Handler
    types: tuple[type[nn.Module], ...]
    subclasses: bool
    when: Predicate | None

    def matches(self, name: str, module: nn.Module, exact: bool) -> bool:
        if self.types:
            kind = type(module)
            hit = (kind in self.types if exact
                   else self.subclasses and isinstance(module, self.types))
            if not hit:
                return False
        elif exact:
            return False              # predicate-only entries are tried after the types
        return self.when is None or self.when(name, module)


_BY_CONFIG: dict[type | None, list[_Entry]] = {}
_INSTALLERS: dict[type[nn.Module], Handler] = {}     # kernel module class -> its handler
_FALLBACK = Handler()


def register_handler(handler: Handler, *, modules: tuple[type[nn.Module], ...] = (),
                     config: type | None = None, subclasses: bool = False,
                     when: Predicate | None = None) -> Handler:
    """Load ``modules`` (or modules ``when(name, module)`` accepts) with ``handler``
    whenever the load's quant config is a ``config`` (``None``: whatever the config).

    ``subclasses``: subclasses of ``modules`` match too (off by default: a subclass may
    change ``forward`` in ways a kernel module would not keep). Returns ``handler``.
    """
    if not isinstance(handler, Handler):
        raise TypeError(f"{handler!r} is not a Handler instance")
    if not modules and when is None:
        raise ValueError("register a handler for module types, a predicate, or both")
    for kind in modules:
        if not (isinstance(kind, type) and issubclass(kind, nn.Module)):
            raise TypeError(f"{kind!r} is not an nn.Module subclass")
    _BY_CONFIG.setdefault(config, []).append(_Entry(handler, tuple(modules), subclasses, when))
    for kernel in type(handler).__dict__.get("installs", ()):
        _INSTALLERS.setdefault(kernel, handler)
    return handler


def handler_for(name: str, module: nn.Module, config) -> Handler:
    """The handler that loads ``module`` (registered at ``name``) under ``config``."""
    installer = installer_of(module)
    if installer is not None:
        return installer
    scopes = [None]
    if config is not None and not config.excludes(name):
        scopes.insert(0, type(config))
    for scope in scopes:
        entries = _BY_CONFIG.get(scope, ())
        for exact in (True, False):
            for entry in entries:
                if entry.matches(name, module, exact):
                    return entry.handler
    return _FALLBACK


def schemes_for(name: str, module: nn.Module) -> list[type]:
    """The config types under which a registered handler would quantize ``module`` (its
    ``makes_new_tensors``): what a load under another config leaves in full precision."""
    return [config for config, entries in _BY_CONFIG.items() if config is not None
            and any(e.handler.makes_new_tensors
                    and (e.matches(name, module, True) or e.matches(name, module, False))
                    for e in entries)]


def installer_of(module: nn.Module) -> Handler | None:
    """The handler whose ``install`` makes ``module``'s class, nearest class first (a
    subclass of a kernel module with a handler of its own finds that one). O(depth of
    the class hierarchy)."""
    for cls in type(module).__mro__:
        handler = _INSTALLERS.get(cls)
        if handler is not None:
            return handler
    return None
