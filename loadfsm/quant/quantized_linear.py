"""What every quantized linear (and stacked-experts) module shares: its tensors, and what
feeds it on a push."""

from __future__ import annotations

import torch
from torch import nn

from .experts import StackedExperts


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored quantized (``weight`` with ``weight_scale``)
    and computed in ``out_dtype``. A weight push re-plans it from
    ``full_precision_slots``: the full-precision weight and bias it was made from."""

    def _set_tensors(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     config, out_dtype: torch.dtype) -> None:
        if bias is not None and bias.shape != q.shape[:1]:
            raise ValueError(f"bias must have shape {tuple(q.shape[:1])}, "
                             f"got {tuple(bias.shape)}")
        self.out_features, self.in_features = q.shape
        self.config, self.out_dtype = config, out_dtype
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    def full_precision_slots(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """What a checkpoint (or a weight push) feeds this layer: its weight and bias."""
        slots = {"weight": (self.weight.shape, self.out_dtype)}
        if self.bias is not None:
            slots["bias"] = (self.bias.shape, self.bias.dtype)
        return slots


class QuantizedStackedExperts(StackedExperts):
    """``StackedExperts`` whose two stacked weights are stored quantized, each with its
    ``{name}_scale``; a push feeds it the full-precision stacked weights."""

    def _set_tensors(self, gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
                     down: torch.Tensor, down_scale: torch.Tensor, config,
                     out_dtype: torch.dtype) -> None:
        num_experts, two_intermediate, hidden = gate_up.shape
        if down.shape != (num_experts, hidden, two_intermediate // 2) or two_intermediate % 2:
            raise ValueError(f"gate_up_proj {tuple(gate_up.shape)} and down_proj "
                             f"{tuple(down.shape)} do not describe the same experts")
        self.num_experts, self.hidden, self.intermediate = (num_experts, hidden,
                                                            two_intermediate // 2)
        self.config, self.out_dtype = config, out_dtype
        self.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        self.gate_up_proj_scale = nn.Parameter(gate_up_scale, requires_grad=False)
        self.down_proj = nn.Parameter(down, requires_grad=False)
        self.down_proj_scale = nn.Parameter(down_scale, requires_grad=False)

    def full_precision_slots(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """What a checkpoint (or a weight push) feeds this layer: the stacked weights."""
        return {name: (getattr(self, name).shape, self.out_dtype)
                for name in ("gate_up_proj", "down_proj")}

