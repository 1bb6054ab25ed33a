"""Checkpoint names -> loadfsm pieces, by transformers' own conversion mapping.

transformers 5 holds some parameters in a layout its checkpoints do not: MoE experts
fused into ``mlp.experts.gate_up_proj`` [E, 2I, H] while the files hold one tensor per
expert (``block_sparse_moe.experts.3.w1.weight``). Its loader renames and converts them
with ``WeightRenaming`` / ``WeightConverter`` rules registered per model type. We read
those same rules and express each checkpoint tensor as a ``Piece`` of the parameter it
lands in: renames become one-to-one pieces, ``MergeModulelist`` picks an expert,
``Concatenate`` a row range. Conversions that change values (transpose, permute,
interleave) have no piece form and are refused.

The expected set comes from the model, not the files: transformers' save direction
(``revert_weight_conversion`` on the ``meta`` state dict) names every tensor a complete
checkpoint holds, so a missing expert is reported by name, never zero-filled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter,
                                             WeightRenaming, apply_renamings,
                                             rename_source_key, revert_weight_conversion)
from transformers.utils.loading_report import LoadStateDictInfo

from ..pieces import Index, Piece, rows


@dataclass
class CheckpointMapping:
    """What transformers' rules say about one checkpoint for one model.

    ``pieces``: every piece a complete checkpoint feeds, renamed or converted (parameters
    fed one-to-one under their own name are left to the plan's default).
    ``ignored``: checkpoint names the model class ignores on load
    (``_keys_to_ignore_on_load_unexpected`` and transformers' built-in exceptions).
    """

    pieces: list[Piece]
    ignored: set[str]


def checkpoint_mapping(model: nn.Module, names: Iterable[str]) -> CheckpointMapping:
    """Map the checkpoint tensor ``names`` onto ``model`` (a transformers model on meta).

    Raises:
        ValueError: a conversion that changes values, which no piece can express.
    """
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None

    by_slot: dict[tuple[str, tuple], Piece] = {}
    whole: set[str] = set()            # params a checkpoint tensor fills all of
    unknown: set[str] = set()
    for name in names:
        piece = _piece_for(name, renamings, converters, prefix, meta_state)
        if piece is None:
            unknown.add(name)
            continue
        by_slot.setdefault((piece.param, _region_key(piece.region)), piece)
        if not piece.region:
            whole.add(piece.param)
    # Pieces a complete checkpoint would hold but this one lacks: named, so the load
    # reports them missing instead of leaving part of a fused parameter unset.
    for name in revert_weight_conversion(model, meta_state):
        piece = _piece_for(name, renamings, converters, prefix, meta_state)
        if piece is not None and piece.region and piece.param not in whole:
            by_slot.setdefault((piece.param, _region_key(piece.region)), piece)
    pieces = [p for p in by_slot.values() if p.ckpt_name != p.param or p.region]
    return CheckpointMapping(pieces, _ignored(model, unknown))


def _piece_for(name, renamings, converters, prefix, meta_state) -> Piece | None:
    """The piece checkpoint tensor ``name`` fills, or None when no parameter takes it."""
    target, pattern = rename_source_key(name, renamings, converters, prefix, meta_state)
    if target not in meta_state:
        return None
    if pattern is None:
        return Piece(name, target)
    renamed = apply_renamings(name, renamings)
    converter = next(c for c in converters if pattern in c.source_patterns
                     and c.rename_source_key(renamed)[1] == pattern)
    region, expert = _region(converter, pattern, renamed, meta_state[target].shape)
    return Piece(name, target, region, shard=_shard_id(pattern), expert=expert)


def _region(converter: WeightConverter, pattern: str, renamed: str,
            shape) -> tuple[tuple[Index, ...], int | None]:
    """Where one source tensor of ``converter`` lands in its target of ``shape``."""
    region: dict[int, Index] = {}
    expert = None
    for op in converter.operations:
        if type(op) is MergeModulelist:
            expert = _expert_index(pattern, renamed)
            region[op.dim] = expert
        elif type(op) is Concatenate and op.num_shards_attribute is None:
            sources = converter.source_patterns
            # Sizes along the concat dim are equal: transformers' own reverse op is Chunk.
            # Region indices refer to the target's dims, so an expert index before this
            # dim does not shift it.
            size = shape[op.dim] // len(sources)
            region[op.dim] = rows(sources.index(pattern) * size, size)
        else:
            raise ValueError(f"transformers converts {converter.source_patterns} -> "
                             f"{converter.target_patterns} with {op!r}, which changes values; "
                             f"loadfsm cannot load it as pieces")
    full = tuple(region.get(d, slice(None)) for d in range(max(region) + 1)) if region else ()
    return full, expert


def _expert_index(pattern: str, renamed: str) -> int:
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    match = re.search(regex, renamed)
    if match is None or not match.groups():
        raise ValueError(f"cannot find the expert index of {renamed!r} in pattern {pattern!r}")
    return int(match.group(1))


def _shard_id(pattern: str) -> str:
    """``.experts.*.w1.weight`` -> ``w1``: the name that tells the source tensors apart."""
    parts = [p for p in pattern.split(".") if p and p not in ("*", "weight", "bias")]
    return parts[-1] if parts else pattern


def _region_key(region: tuple[Index, ...]) -> tuple:
    return tuple((i.start, i.stop) if isinstance(i, slice) else i for i in region)


def _ignored(model: nn.Module, unknown: set[str]) -> set[str]:
    """The unknown names transformers' own rules for this model class drop silently."""
    info = LoadStateDictInfo(missing_keys=set(), unexpected_keys=set(unknown),
                             mismatched_keys=set(), error_msgs=[], conversion_errors={},
                             skipped_pp_keys=set())
    model._adjust_missing_and_unexpected_keys(info)
    return unknown - info.unexpected_keys
