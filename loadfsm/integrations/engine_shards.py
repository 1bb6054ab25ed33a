"""Shard layouts: which slot of a fused parameter each ``weight_loader`` call fills.

An engine's loader is called once per checkpoint tensor with a ``shard_id`` (``"q"``,
``"k"``, ``"v"`` for fused QKV, ``0``/``1`` for gate/up, ``"w1"``/``"w2"``/``"w3"`` with
an ``expert_id`` for fused MoE). The hook plans one piece per declared
``(parameter, shard_id, expert)``, so a layer completes when its calls are all in,
however many elements each writes (padding and fused QKV break element counts).

A module declares its layout with a method ``loader_shards(self) -> Iterable[LoaderShard]``;
for engine classes you cannot edit, register a function with ``register_shard_layout``.
Regions are in the module's own (tensor-parallel local) shapes. Parameters with no
declared layout expect one call without a shard id (the region it writes is read
from the write itself: see ``writes``). Non-persistent buffers a ``meta``-built engine
module never computed (a rotary cache) are computed at the end of the load by its
``compute_buffers(device)`` or a function registered with
``loading.writer.register_buffer_init``.
The layouts of vLLM's classes (``vllm_layouts``) register themselves the first time
pieces are planned in a process that has imported vLLM.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn

from ..errors import ShapeMismatchError
from ..pieces import Index, Piece

ShardId = str | int | None


@dataclass(frozen=True)
class LoaderShard:
    """One loader call's slot: ``module.<param>[region]`` for ``shard_id`` (and ``expert``).

    Args:
        param: attribute name on the module (``"weight"``, ``"w13_weight"``).
        shard_id: what the engine passes as ``shard_id`` / ``loaded_shard_id``.
        region: index into the parameter; ``()`` is all of it.
        expert: what the engine passes as ``expert_id``, if anything.
        optional: the engine may never call it (kv-cache scales); a default fills it.
    """

    param: str
    shard_id: ShardId
    region: tuple[Index, ...] = ()
    expert: int | None = None
    optional: bool = False


_LAYOUTS: dict[type, Callable[[nn.Module], Iterable[LoaderShard]]] = {}


def register_shard_layout(cls: type[nn.Module]):
    """Decorator: ``fn(module) -> Iterable[LoaderShard]`` is the layout of ``cls`` modules.

    For engine classes loadfsm cannot edit, e.g.::

        @register_shard_layout(QKVParallelLinear)
        def _qkv(m):
            q, kv = m.num_heads * m.head_size, m.num_kv_heads * m.head_size
            return [LoaderShard("weight", "q", (rows(0, q),)), ...]
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{cls!r} is not an nn.Module subclass")

    def wrap(fn):
        _LAYOUTS[cls] = fn
        return fn

    return wrap


def shard_layout(module: nn.Module) -> list[LoaderShard] | None:
    """The module's declared layout (its own ``loader_shards`` first), or ``None``."""
    own = getattr(module, "loader_shards", None)
    if callable(own):
        return list(own())
    fn = next((_LAYOUTS[k] for k in type(module).__mro__ if k in _LAYOUTS), None)
    return None if fn is None else list(fn(module))


def piece_name(param: str, shard_id: ShardId, expert: int | None) -> str:
    """The piece key of a loader call: ``qkv_proj.weight[q]``, ``experts.w13_weight[3:w1]``."""
    if shard_id is None and expert is None:
        return param
    return f"{param}[{shard_id}]" if expert is None else f"{param}[{expert}:{shard_id}]"


def default_weight_loader(param: nn.Parameter, loaded_weight) -> None:
    """The loader of a parameter that declares none (as vLLM's): the whole tensor, same
    shape, copied into ``param.data``."""
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise ShapeMismatchError(f"shape {tuple(loaded_weight.shape)} does not fit "
                                 f"{tuple(param.shape)}")
    param.data.copy_(loaded_weight)


def uses_weight_loaders(model: nn.Module) -> bool:
    # Each module's own parameters: ``model.parameters()`` hashes every tensor to drop
    # duplicates, twice the time of this walk when planning 100k layers.
    return any(hasattr(p, "weight_loader")
               for module in model.modules() for p in module._parameters.values())


def loader_pieces(model: nn.Module) -> list[Piece]:
    """Pieces in ``weight_loader`` terms for every declared layout of ``model``.

    Parameters without a layout get one whole piece from the planner, named as the
    parameter. O(modules + shards).
    """
    _known_engines()
    pieces = []
    for mod_name, module in model.named_modules():
        for shard in shard_layout(module) or ():
            full = f"{mod_name}.{shard.param}" if mod_name else shard.param
            shard_tag = None if shard.shard_id is None else str(shard.shard_id)
            pieces.append(Piece(piece_name(full, shard.shard_id, shard.expert), full,
                                shard.region, shard_tag, shard.expert, shard.optional))
    return pieces


def _known_engines() -> None:
    """Register the layouts of engines already imported (never import one)."""
    if "vllm" in sys.modules and importlib.util.find_spec("vllm.model_executor") is not None:
        from . import vllm_layouts  # noqa: F401
