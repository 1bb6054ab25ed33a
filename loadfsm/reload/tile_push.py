"""The engine side of tile deltas: changed FP8 tiles written into the live tensors in place.

A ``TileDelta`` carries, per block-FP8 weight of an engine layer, the tiles whose bytes
or scale changed (``TilePatch``), and whole layers as named tensors for the rest (norms,
embeddings, layers a push must send whole). ``apply_tile_delta`` runs it as one push
under the model's push lock:
  1. every patch is checked before any live byte changes: names, shapes, dtypes and the
     layer's block size on the host; tile indices in range and unique, FP8 codes and
     scales finite, scales positive on the device, read back in one sync;
  2. the whole layers go through R1..R4 as any push, and commit;
  3. each patched layer commits whole under held SIGINT: its old tiles are kept (the
     size of the patch) and put back if a write raises, so the layer stays wholly old.
Patched layers stay FINALIZED (no staging is made); they are stamped with the push's
version and listed in ``committed`` like any layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from ..atomic import deferred_interrupts
from ..errors import (DuplicateWeightError, InvalidScaleError, NonFiniteWeightError,
                      ShapeMismatchError, UnexpectedWeightError)
from ..handlers.fp8 import Fp8ExpertsHandler, Fp8LinearHandler
from ..handlers.fp8_checkpoint import PrequantizedFp8Handler
from ..layer import LayerRecord
from ..quant.fp8 import FP8_DTYPE
from ..quant.prequantized import fp8_row_flags
from ..sources.base import iter_weights
from .sync import SyncReport, WeightSync
from .tiles import gather_tiles, put_tiles
from .transaction import ReloadTransaction



@dataclass
class TilePatch:
    """Changed tiles of one FP8 weight: ``layer``'s ``attr`` (``weight``, ``gate_up_proj``).

    ``index``: int64 ``[T, attr.dim()]``, each row the index of a tile's scale;
    ``tiles``: FP8 ``[T, bn, bk]``; ``scales``: float32 ``[T]``.
    """

    layer: str
    attr: str
    index: torch.Tensor
    tiles: torch.Tensor
    scales: torch.Tensor

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.attr}" if self.layer else self.attr

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.index, self.tiles, self.scales))


@dataclass
class TileDelta:
    """One tile-delta push: ``items`` (named tensors of whole layers, as ``WeightSync.push``
    takes them) and ``patches``; a layer is in one or the other."""

    items: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    patches: list[TilePatch] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return (sum(t.numel() * t.element_size() for _, t in self.items)
                + sum(p.nbytes for p in self.patches))


def holds_fp8_tiles(rec: LayerRecord, attr: str) -> bool:
    """Whether ``rec``'s live ``attr`` is an FP8 weight in ``quantize_fp8``'s own layout
    with ``{attr}_scale`` beside it (an engine's own FP8 layout may rearrange them, and a
    checkpoint may keep a module in full precision: those layers take whole pushes)."""
    handler = rec.handler
    if isinstance(handler, (Fp8LinearHandler, Fp8ExpertsHandler)):
        return attr in handler.weights
    return (isinstance(handler, PrequantizedFp8Handler) and attr in handler.weights
            and rec.slots[attr].dtype == FP8_DTYPE)


def apply_tile_delta(sync: WeightSync, delta: TileDelta, *, version=None) -> SyncReport:
    """Push ``delta`` into ``sync``'s model, in place (steps 1..3 of the module docstring).

    Checks come first, so a patch that fails them changes nothing, whatever the
    ``atomic`` mode; a write that raises after them leaves the layers before it new.
    ``delta.items`` may be a one-pass iterable (a transport's arrivals, streamed into the
    push): a tensor of a patched layer among them is then refused as it arrives.

    Returns:
        A ``SyncReport``; ``bytes_received`` counts the patches' bytes too.

    Raises:
        PushError: a patch failed its checks (the cause: ``ShapeMismatchError``,
            ``NonFiniteWeightError``, ``InvalidScaleError``, ``UnexpectedWeightError``),
            and then nothing changed; or the push failed midway, leaving every layer
            wholly old or wholly new (``committed`` lists the new ones).
    """
    def feed(push: ReloadTransaction) -> None:
        streamed = not isinstance(delta.items, (list, tuple))
        recs = _check(sync, delta.patches, () if streamed else delta.items)  # step 1
        weights = iter_weights(delta.items)
        if streamed and recs:
            weights = _unpatched(sync, recs, weights)
        push.feed(weights, sync._routes)                                    # step 2
        if push.settle():
            return                  # the push reports the missing pieces and rolls back
        sync.session.commit_held()
        by_layer: dict[str, list[TilePatch]] = {}
        for patch in delta.patches:
            by_layer.setdefault(patch.layer, []).append(patch)
        for layer, patches in by_layer.items():                            # step 3
            _commit_layer(push, recs[layer], patches)

    return sync.run(feed, version=version)


def _check(sync: WeightSync, patches: list[TilePatch],
           items: Iterable[tuple[str, torch.Tensor]]) -> dict[str, LayerRecord]:
    """Step 1: every patch checked, one device sync for all, none of ``items`` (whole
    layers) in a patched layer; returns the patched layers."""
    layers, recs, flags = sync.session.plan.layers, {}, []
    whole = {sync._routes.resolve(name, tensor.shape).rec.name for name, tensor in items}
    for patch in patches:
        rec = layers.get(patch.layer)
        if rec is None or patch.attr not in rec.slots or not holds_fp8_tiles(rec, patch.attr):
            raise UnexpectedWeightError("tile patch names no FP8 weight of the model",
                                        names=[patch.name], tensor=patch.name,
                                        layer=patch.layer)
        if patch.layer in whole:
            raise DuplicateWeightError("layer is both patched and pushed whole",
                                       tensor=patch.name, layer=patch.layer)
        recs[patch.layer] = rec
        weight, scale = _live(rec, patch.attr)
        _check_shapes(rec, patch, weight, scale)
        flags.append(_device_flags(patch, scale.shape))
    if flags:
        for patch, found in zip(patches, torch.stack(flags).tolist()):
            _raise_found(patch, found)
    return recs


def _unpatched(sync: WeightSync, recs: dict[str, LayerRecord],
               weights: Iterator[tuple[str, torch.Tensor]]
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Streamed ``weights``, each refused if its layer is patched (step 1, as it arrives)."""
    for name, tensor in weights:
        layer = sync._routes.resolve(name, tensor.shape).rec.name
        if layer in recs:
            raise DuplicateWeightError("layer is both patched and pushed whole",
                                       tensor=name, layer=layer)
        yield name, tensor


def _live(rec: LayerRecord, attr: str) -> tuple[torch.Tensor, torch.Tensor]:
    live = rec.handler.live_tensors(rec)
    return live[attr], live[f"{attr}_scale"]


def _check_shapes(rec: LayerRecord, patch: TilePatch, weight: torch.Tensor,
                  scale: torch.Tensor) -> None:
    config = getattr(rec.module, "config", None)
    if getattr(config, "granularity", None) != "block":
        raise ShapeMismatchError("tile patches need a block-FP8 weight; this layer's "
                                 "scales are per tensor or per row", tensor=patch.name,
                                 layer=patch.layer)
    count = len(patch.index)
    want = {"index": ((count, weight.dim()), torch.int64),
            "tiles": ((count, *config.block_size), weight.dtype),
            "scales": ((count,), torch.float32)}
    for part, (shape, dtype) in want.items():
        tensor = getattr(patch, part)
        if tuple(tensor.shape) != shape or tensor.dtype != dtype \
                or tensor.device != weight.device:
            raise ShapeMismatchError(
                f"tile patch {part}: {tuple(tensor.shape)} {tensor.dtype} on "
                f"{tensor.device}, the layer needs {shape} {dtype} on {weight.device}",
                tensor=patch.name, layer=patch.layer)


def _device_flags(patch: TilePatch, grid: torch.Size) -> torch.Tensor:
    """``[index out of range, index repeated, tile NaN/Inf, scale NaN/Inf, scale <= 0]``
    as a float tensor, computed where the patch is (no sync)."""
    index = patch.index
    if not len(index):
        return torch.zeros(5, device=index.device)
    outside = (index < 0).any()
    flat = index[:, 0]
    for column, size in enumerate(grid):
        outside = outside | (index[:, column] >= size).any()
        if column:
            flat = flat * size + index[:, column]          # row-major tile number
    flat = flat.sort().values
    repeated = (flat[1:] == flat[:-1]).any()
    codes = fp8_row_flags(patch.tiles.reshape(len(index), -1)).isnan().any()
    scales = patch.scales
    return torch.stack([outside, repeated, codes, ~scales.isfinite().all(),
                        (scales <= 0).any()]).float()


def _raise_found(patch: TilePatch, found: list[float]) -> None:
    where = {"tensor": patch.name, "layer": patch.layer}
    outside, repeated, codes, nonfinite, nonpositive = found
    if outside:
        raise ShapeMismatchError("tile index out of range of the weight's tiles", **where)
    if repeated:
        raise ShapeMismatchError("tile index names one tile twice", **where)
    if codes:
        raise NonFiniteWeightError("FP8 tiles hold NaN or Inf", **where)
    if nonfinite:
        raise NonFiniteWeightError("tile scales hold NaN or Inf", **where)
    if nonpositive:
        raise InvalidScaleError("tile scales hold zero or negative values", **where)


def _commit_layer(push: ReloadTransaction, rec: LayerRecord,
                  patches: list[TilePatch]) -> None:
    """Step 3 for one layer: all its patches, or (on an exception) none of them."""
    written = []
    with deferred_interrupts():
        try:
            for patch in patches:
                push.current = patch.name
                weight, scale = _live(rec, patch.attr)
                block, at = tuple(patch.tiles.shape[1:]), patch.index.unbind(1)
                kept = (patch, gather_tiles(weight, patch.index, block), scale[at])
                written.append(kept)
                put_tiles(weight, patch.index, patch.tiles, block)
                scale[at] = patch.scales
        except BaseException:
            for patch, tiles, scales in reversed(written):
                weight, scale = _live(rec, patch.attr)
                put_tiles(weight, patch.index, tiles, tuple(tiles.shape[1:]))
                scale[patch.index.unbind(1)] = scales
            raise
        push.committed.append(rec.name)
    push.received += sum(p.nbytes for p in patches)
    push.count += len(patches)
    push.current = None
    push.session.tracer.event("tiles_committed", layer=rec.name,
                              tiles=sum(len(p.index) for p in patches))
