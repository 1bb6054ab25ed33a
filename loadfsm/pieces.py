"""Pieces: the exact slots of a parameter that checkpoint tensors fill.

A fused parameter (``qkv_proj.weight``) is fed by several checkpoint tensors
(``q_proj``, ``k_proj``, ``v_proj``); a stacked expert weight by one tensor per
expert; a padded embedding by one tensor covering its first rows. Each such
tensor is one ``Piece``: a checkpoint name and the region of the parameter it
fills. A layer is complete when every piece it expects has arrived.

Models with fused or stacked parameters describe them by defining a method
``checkpoint_pieces(self) -> Iterable[Piece]`` on the model class. Parameters
that no yielded piece names are fed one-to-one by the checkpoint tensor of the
same name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Union

import torch

Index = Union[int, slice]


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor and the region of one model tensor it fills.

    Args:
        ckpt_name: name of the tensor in the checkpoint (Hugging Face naming).
        param: full name of the model parameter or persistent buffer it feeds.
        region: index applied to the parameter (``param[region]``); ``()`` is all of it.
        shard: the shard id inside a fused parameter (``"q"``, ``"gate"``...), if any.
        expert: the expert index inside a stacked parameter, if any.
        optional: when the checkpoint lacks it, the layer's handler supplies a default
            (kv-cache scales are the usual case) instead of the load failing.
    """

    ckpt_name: str
    param: str
    region: tuple[Index, ...] = field(default=())
    shard: str | None = None
    expert: int | None = None
    optional: bool = False

    def expected_shape(self, param_shape: torch.Size) -> torch.Size:
        """Shape a checkpoint tensor must have to fill this region."""
        return torch.empty(param_shape, device="meta")[self.region].shape


def rows(start: int, length: int) -> slice:
    """Region helper: ``length`` rows from ``start`` along the first indexed dim."""
    return slice(start, start + length)


def fused_rows(ckpt_prefix: str, param: str, shards: Iterable[tuple[str, str, int]],
               expert: int | None = None, optional: bool = False) -> list[Piece]:
    """Pieces for a parameter whose rows are the concatenation of several tensors.

    ``shards`` lists ``(checkpoint_suffix, shard_id, rows)`` in their order inside
    the fused parameter. With ``expert`` set, the region first picks that expert of
    a stacked ``[E, rows, cols]`` parameter.
    """
    pieces, start = [], 0
    for suffix, shard_id, length in shards:
        lead: tuple[Index, ...] = () if expert is None else (expert,)
        pieces.append(Piece(f"{ckpt_prefix}{suffix}", param, lead + (rows(start, length),),
                            shard=shard_id, expert=expert, optional=optional))
        start += length
    return pieces
