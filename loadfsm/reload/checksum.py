"""Per-layer checksums of the weights an engine serves, and the trainer's side of them.

``layer_checksums(sync)`` hashes each layer's live tensors (what a push commits into)
on their device, with one device sync for the whole model; ``expected_checksums``
computes the same numbers from the tensors a trainer pushes, through the engine's own
planning and quantization (FP8 scales and bytes included), so equal numbers prove that
the engine serves exactly the pushed weights.

The hash of a tensor reads its bytes in row-major order as 16-bit words ``w``, in rows
of ``_ROW`` words: each row is ``sum(w * m)`` for fixed multipliers ``m`` (positions
inside a row count), reduced mod ``_P``, then weighted by a per-row factor (the order
of rows counts). Two independent lanes give 62 bits. All products stay below 2**63:
the arithmetic is exact integers, identical on every device.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..layer import LayerRecord
from ..loading.session import LoadSession
from ..states import LayerState
from .routes import PushRoutes
from .sync import WeightSync

_ROW = 1024                     # words per row
_CHUNK_ROWS = 1 << 14           # rows hashed at once: bounds the int32 temporaries
_P = (1 << 31) - 1              # the lanes' modulus (a prime)
_ROW_FACTORS = (48271, 69621)   # per-lane generators of the row weights mod _P
_MIX = (16807, 39373)           # per-lane factors folding tensors into a layer


def layer_checksums(target: WeightSync | LoadSession | nn.Module) -> dict[str, int]:
    """Checksums of every loaded layer's live tensors: layer name -> 62-bit integer.

    Computed where the tensors are; the constants go to each device once and the results
    come back in one transfer per device (no sync per layer).

    Args:
        target: a ``WeightSync``, a ``LoadSession`` that loaded its model, or a model
            loadfsm loaded (re-planned: O(layers)). Layers still on ``meta`` are left out.

    Run it between pushes: a push in flight changes the tensors it reads.
    """
    lanes: dict[str, torch.Tensor] = {}
    constants: dict[torch.device, _Constants] = {}
    with torch.no_grad():
        for rec in _records(target):
            live = rec.handler.live_tensors(rec)
            if any(t.is_meta for t in live.values()):
                continue
            lanes[rec.name] = _layer_lanes(live, constants)
    by_device: dict[torch.device, list[str]] = {}
    for name, lane in lanes.items():
        by_device.setdefault(lane.device, []).append(name)
    values = {}
    for names in by_device.values():
        for name, (high, low) in zip(names, torch.stack([lanes[n] for n in names]).tolist()):
            values[name] = (high << 31) | low
    return {name: values[name] for name in lanes}


def expected_checksums(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       *, quant=None, device=None) -> dict[str, int]:
    """What ``layer_checksums`` of an engine must say after it took ``named_tensors``.

    The trainer builds the engine's model class on ``meta`` and passes the tensors it
    pushes (checkpoint or parameter names, as ``WeightSync.push`` takes them) and the
    engine's ``quant``: they are loaded into that model layer by layer exactly as the
    engine quantizes them, and hashed. It holds one engine-format copy of the pushed
    layers on ``device`` (``"cpu"`` keeps the trainer's GPU free; FP8 bytes are the
    same on every device).

    Returns:
        The checksums of the layers the tensors cover wholly.
    """
    session = LoadSession(model, quant=quant, device=device, strict=False)
    routes = PushRoutes(session.plan)
    with torch.no_grad():
        for name, tensor in named_tensors:
            route = routes.resolve(name, tensor.shape)
            names = route.pieces if route.param is not None else (route.name,)
            if route.tied and not all(piece in route.rec.missing for piece in names):
                continue                     # the other name of a tied tensor fed it
            if route.param is None:
                session.arrive(route.name, tensor.detach())
            else:
                session.driver.arrive_param(route.rec, route.param, tensor.detach(),
                                            route.pieces)
    report = session.finish()
    return {name: value for name, value in layer_checksums(session).items()
            if report.layer_states[name] == LayerState.FINALIZED.name}


def _records(target) -> list[LayerRecord]:
    if isinstance(target, WeightSync):
        target = target.session
    if not isinstance(target, LoadSession):
        target = LoadSession.for_loaded_model(target)
    return list(target.plan.layers.values())


class _Constants:
    """The hash's constants on one device, copied there once per call (a host-to-device
    copy per tensor would sync each time)."""

    def __init__(self, device: torch.device):
        generator = torch.Generator().manual_seed(0x10AD)
        # Per-position multipliers in [1, 2**16): a 16-bit word times one fits int32.
        mults = torch.randint(1, 1 << 16, (2 * _ROW,), generator=generator)
        packed = torch.cat([mults, torch.tensor([*_ROW_FACTORS, *_MIX])]).to(device)
        self.mults = packed[:2 * _ROW].view(2, _ROW).to(torch.int32)       # [2, _ROW]
        self.row_factors = packed[2 * _ROW:2 * _ROW + 2]                      # [2] int64
        self.mix = packed[2 * _ROW + 2:]                                      # [2] int64


def _layer_lanes(live: dict[str, torch.Tensor],
                 constants: dict[torch.device, _Constants]) -> torch.Tensor:
    """The two lanes of a layer (int64 ``[2]`` on its device): its tensors folded in
    attribute order, each with its byte length."""
    acc = None
    for attr in sorted(live):
        tensor = live[attr]
        if tensor.device not in constants:
            constants[tensor.device] = _Constants(tensor.device)
        const = constants[tensor.device]
        lanes = _tensor_lanes(tensor, const)
        acc = lanes if acc is None else (acc * const.mix + lanes) % _P
    return acc


def _tensor_lanes(tensor: torch.Tensor, const: _Constants) -> torch.Tensor:
    """The two lanes of one tensor (int64 ``[2]``)."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    if data.storage_offset() % 2:         # 16-bit words need an even start
        data = data.clone()
    device, n = data.device, data.numel()
    even = n - n % 2
    words = data[:even].view(torch.int16)
    rows = words.numel() // _ROW
    acc = torch.zeros(2, dtype=torch.int64, device=device)
    for start in range(0, rows, _CHUNK_ROWS):
        stop = min(rows, start + _CHUNK_ROWS)
        block = words[start * _ROW:stop * _ROW].view(-1, 1, _ROW).to(torch.int32)
        acc += _weighted_rows((block * const.mults).sum(-1), start, const)  # [rows, 2]
    tail = words[rows * _ROW:]
    if tail.numel():
        row = (tail.to(torch.int32) * const.mults[:, :tail.numel()]).sum(-1).view(1, 2)
        acc += _weighted_rows(row, rows, const)
    if n % 2:
        acc += data[even:].to(torch.int64) * 257
    return (acc + n) % _P


def _weighted_rows(sums: torch.Tensor, first: int, const: _Constants) -> torch.Tensor:
    """Sum over rows of (row sum mod P) * (row weight), mod P, per lane: ``[2]``."""
    index = torch.arange(first + 1, first + 1 + sums.shape[0], device=sums.device,
                         dtype=torch.int64).view(-1, 1)
    weights = (index * const.row_factors) % _P
    return ((sums % _P) * weights % _P).sum(0)
