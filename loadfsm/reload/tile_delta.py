"""The trainer side of tile deltas: per block-FP8 weight, the tiles whose FP8 changed.

``TileTracker`` keeps, per trainer parameter the engine holds in block FP8, its FP8
bytes and scales as last sent, and where its tiles sit in the engine (layer, weight,
expert, first tile row: a fused q/k/v or a per-expert checkpoint tensor is part of one
engine weight). A step compares the parameter with its bf16 copy tile by tile on its
device, quantizes only the tiles that moved (``quantize_tiles``: the bytes the engine's
quantization gives them), and keeps those whose FP8 bytes or scale differ from what was
sent. Two host syncs per moved tensor read how many of its tiles moved; none per tile.
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

    def changed(self, name: str, param: torch.Tensor, kept: torch.Tensor,
                place: Place) -> tuple[TilePatch | None, Moved | None]:
        """The patch of ``param``'s tiles whose FP8 changed since sent (``None``: none),
        and what moved in bf16 (``None``: nothing), for ``commit``."""
        index = tile_mask(kept, param, self.block).nonzero()       # the one host sync
        if not len(index):
            return None, None
        fresh = gather_tiles(param.detach(), index, self.block)
        q, scale = quantize_tiles(fresh, self.block)
        sent_q, sent_scale = self.sent[name]
        sent_tiles = gather_tiles(sent_q, index, self.block)
        sent_scales = sent_scale[index.unbind(1)]
        differs = (tile_mask(sent_tiles, q, self.block).view(-1)
                   | (sent_scales.view(torch.int32) != scale.view(torch.int32)))
        keep = differs.nonzero().view(-1)
        patch = place.patch(index[keep], q[keep], scale[keep]) if len(keep) else None
        return patch, (name, index, fresh, q, scale)

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
