"""Modules that run on INT8 weights: ``Int8Linear`` and ``Int8StackedExperts``.

Both hold int8 weights with per-row scales in their output dtype (layout in ``int8.py``)
and run every matrix through ``int8_matmul``. Like the FP8 modules, they say which
full-precision slots feed them (``full_precision_slots``) and carry their ``config``, so
a loaded model re-plans onto them and a weight push re-quantizes in place.
"""

from __future__ import annotations

import torch
from torch import nn

from loadfsm.quant.config import Int8Config
from loadfsm.quant.int8 import int8_matmul, int8_scale_shape
from loadfsm.quant.quantized_linear import QuantizedLinear, QuantizedStackedExperts


class Int8Linear(QuantizedLinear):
    """A linear layer whose weight is int8 (``[out_features, in_features]``).

    Parameters (all ``requires_grad=False``): ``weight`` int8, ``weight_scale``
    ``[out_features, 1]`` in ``out_dtype``, optional ``bias`` in ``out_dtype``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 config: Int8Config | None = None, *,
                 out_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        shape = (out_features, in_features)
        self._install(
            torch.empty(shape, dtype=torch.int8, device=device),
            torch.empty(int8_scale_shape(shape), dtype=out_dtype, device=device),
            torch.empty(out_features, dtype=out_dtype, device=device) if bias else None,
            config or Int8Config())

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       config: Int8Config) -> Int8Linear:
        """Wrap tensors the loader produced, sharing their storage (no copy). The output
        dtype is the scale's.

        Raises:
            ValueError: if the dtypes or shapes do not fit each other.
        """
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._install(q, scale, bias, config)
        return layer

    def _install(self, q, scale, bias, config):
        _check_quantized("weight", q, scale, dims=2)
        self._set_tensors(q, scale, bias, config, scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features]
        return int8_matmul(x, self.weight, self.weight_scale, self.bias, self.out_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 per-channel")


class Int8StackedExperts(QuantizedStackedExperts):
    """``StackedExperts`` with int8 ``gate_up_proj`` / ``down_proj`` and per-row scales
    ``[E, N, 1]`` (``gate_up_proj_scale``, ``down_proj_scale``) in the output dtype."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int,
                 config: Int8Config | None = None, *,
                 out_dtype: torch.dtype = torch.bfloat16, device=None):
        # nn.Module.__init__ directly: StackedExperts.__init__ would allocate bf16 weights.
        nn.Module.__init__(self)
        tensors = []
        for shape in ((num_experts, 2 * intermediate, hidden),
                      (num_experts, hidden, intermediate)):
            tensors += [torch.empty(shape, dtype=torch.int8, device=device),
                        torch.empty(int8_scale_shape(shape), dtype=out_dtype, device=device)]
        self._install(*tensors, config or Int8Config())

    @classmethod
    def from_quantized(cls, gate_up_proj: torch.Tensor, gate_up_proj_scale: torch.Tensor,
                       down_proj: torch.Tensor, down_proj_scale: torch.Tensor,
                       config: Int8Config) -> Int8StackedExperts:
        """Wrap quantized stacked weights and their scales, sharing storage (no copy).

        Raises:
            ValueError: if the dtypes or shapes do not fit each other.
        """
        experts = cls.__new__(cls)
        nn.Module.__init__(experts)
        experts._install(gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale, config)
        return experts

    def _install(self, gate_up, gate_up_scale, down, down_scale, config):
        _check_quantized("gate_up_proj", gate_up, gate_up_scale, dims=3)
        _check_quantized("down_proj", down, down_scale, dims=3)
        if down_scale.dtype != gate_up_scale.dtype:
            raise ValueError(f"gate_up_proj_scale {gate_up_scale.dtype} and down_proj_scale "
                             f"{down_scale.dtype} differ")
        self._set_tensors(gate_up, gate_up_scale, down, down_scale, config,
                          gate_up_scale.dtype)

    def expert_linear(self, x: torch.Tensor, which: str, expert: int) -> torch.Tensor:
        """``x @ W[expert].T`` in INT8 for ``which`` in {"gate_up_proj", "down_proj"}."""
        return int8_matmul(x, getattr(self, which)[expert],
                           getattr(self, which + "_scale")[expert], None, self.out_dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden}, "
                f"intermediate={self.intermediate}, int8 per-channel")


def _check_quantized(name, q, scale, *, dims):
    if q.dim() != dims or q.dtype != torch.int8:
        raise ValueError(f"{name} must be a {dims}-D int8 tensor, got {q.dim()}-D {q.dtype}")
    expected = int8_scale_shape(q.shape)
    if scale.shape != expected or not scale.is_floating_point():
        raise ValueError(f"{name} scale must be floating point of shape {tuple(expected)}, "
                         f"got {scale.dtype} {tuple(scale.shape)}")
