"""The trainer side of tile deltas: per block-FP8 weight, the tiles whose FP8 changed.

``TileTracker`` keeps, per trainer parameter the engine holds in block FP8, its FP8
bytes and scales as last sent, and where its tiles sit in the engine (layer, weight,
expert, first tile row: a fused q/k/v or a per-expert checkpoint tensor is part of one
engine weight). A step compares the parameter with its bf16 copy tile by tile on its
device, quantizes only the tiles that moved (``quantize_tiles``: the bytes the engine's
quantization gives them), and keeps those whose FP8 bytes or scale differ from what was
sent. Two host syncs per push read how many tiles of each parameter moved; none per tile
or per tensor, and one quantization covers the moved tiles of every parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.config import Fp8Config
from ..quant.fp8 import quantize_fp8
from .routes import PushRoutes
from .tile_push import TilePatch, holds_fp8_tiles
from .tiles import gather_tiles, put_tiles, quantize_tiles, tile_mask

# What a step moved in one parameter: its tile index, and the new bf16, FP8 and scales.
Moved = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Place:
    """Where a trainer parameter's tiles are in the engine: ``layer``'s ``attr``, the
    ``expert`` it is (a per-expert tensor; ``None``: the weight's own experts), and its
    first tile row there."""

    layer: str
    attr: str
    expert: int | None
    row_tile: int

    def patch(self, index: torch.Tensor, tiles: torch.Tensor,
              scales: torch.Tensor) -> TilePatch:
        """A patch of the parameter's tiles at ``index`` (its own), indexed as the engine's."""
        index = index.clone()
        index[:, -2] += self.row_tile
        if self.expert is not None:
            index = torch.cat([torch.full_like(index[:, :1], self.expert), index], dim=1)
        return TilePatch(self.layer, self.attr, index, tiles, scales)


class TileTracker:
    """What the engine holds of each block-FP8 parameter, tile by tile.

    Args:
        routes: the engine's push routes (its plan: layers, pieces, handlers).
        config: the engine's block-FP8 ``Fp8Config``.
    """

    def __init__(self, routes: PushRoutes, config: Fp8Config):
        self.routes, self.config, self.block = routes, config, config.block_size
        self.sent: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # FP8 and scales
        self._places: dict[str, Place | None] = {}

    def place(self, name: str, shape: torch.Size) -> Place | None:
        """Where ``name``'s tiles go, or ``None``: the engine does not hold it in FP8.

        Raises:
            ValueError: a part of an engine weight that does not start and end on tiles.
        """
        if name not in self._places:
            self._places[name] = self._find(name, shape)
        return self._places[name]

    def changed(self, params: list[tuple[str, torch.Tensor, torch.Tensor, Place]]
                ) -> tuple[list[TilePatch], list[Moved]]:
        """For ``(name, parameter, bf16 copy as sent, place)`` of block-FP8 parameters:
        the patches of tiles whose FP8 changed since sent, and what moved in bf16 (for
        ``commit``). Two host syncs in all, each reading one count per parameter."""
        block = self.block
        masks = [tile_mask(kept, param, block) for _, param, kept, _ in params]
        counts = _counts(masks)                                          # host sync 1
        moved = [(name, param, place, torch.nonzero_static(mask, size=count))
                 for (name, param, _, place), mask, count in zip(params, masks, counts)
                 if count]
        if not moved:
            return [], []
        fresh = [gather_tiles(param.detach(), index, block) for _, param, _, index in moved]
        q, scale = quantize_tiles(torch.cat(fresh), block)
        sent_q = torch.cat([gather_tiles(self.sent[name][0], index, block)
                            for name, _, _, index in moved])
        sent_scale = torch.cat([self.sent[name][1][index.unbind(1)]
                                for name, _, _, index in moved])
        differs = (tile_mask(sent_q, q, block).view(-1)
                   | (sent_scale.view(torch.int32) != scale.view(torch.int32)))
        sizes = [len(index) for *_, index in moved]
        parts = differs.split(sizes)
        patches, done = [], []
        for (name, _, place, index), new, q_part, s_part, part, count in zip(
                moved, fresh, q.split(sizes), scale.split(sizes), parts,
                _counts(parts)):                                         # host sync 2
            if count:
                keep = torch.nonzero_static(part, size=count).view(-1)
                patches.append(place.patch(index[keep], q_part[keep], s_part[keep]))
            done.append((name, index, new, q_part, s_part))
        return patches, done

    def whole(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP8 form of ``param`` sent whole (what the engine makes of it)."""
        return quantize_fp8(param.detach(), self.config)

    def commit(self, raw: dict[str, torch.Tensor], moved: list[Moved]) -> None:
        """The engine took the tiles ``moved``: ``raw`` (the bf16 copies) and ``sent``
        hold them now."""
        for name, index, fresh, q, scale in moved:
            put_tiles(raw[name], index, fresh, self.block)
            sent_q, sent_scale = self.sent[name]
            put_tiles(sent_q, index, q, self.block)
            sent_scale[index.unbind(1)] = scale

    def _find(self, name: str, shape: torch.Size) -> Place | None:
        route = self.routes.resolve(name, shape)
        rec = route.rec
        if route.param is not None:
            param, region = route.param, ()
        else:
            piece = rec.pieces[route.name]
            param, region = piece.param, tuple(piece.region or ())
        attr = rec.slot_attr(param)
        if not holds_fp8_tiles(rec, attr):
            return None
        expert = region[0] if region and isinstance(region[0], int) else None
        rows = region[1:] if expert is not None else region
        bn, height = self.block[0], rec.slots[attr].shape[-2]
        span = rows[0] if rows else slice(0, height)
        start, stop = span.start or 0, height if span.stop is None else span.stop
        if len(rows) > 1 or not isinstance(span, slice) or start % bn \
                or (stop % bn and stop != height):
            raise ValueError(f"{name} feeds {rec.name}.{attr} at {region}: tile deltas need "
                             f"parts of whole {bn}-row tiles")
        return Place(rec.name, attr, expert, start // bn)


def _counts(masks: list[torch.Tensor]) -> list[int]:
    """How many are set in each of ``masks``: one host sync for all."""
    return torch.stack([mask.sum() for mask in masks]).tolist() if masks else []
