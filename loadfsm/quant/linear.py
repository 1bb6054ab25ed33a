"""Modules that run on FP8 weights: ``Fp8Linear`` and ``Fp8StackedExperts``.

Both hold float8_e4m3fn weights with float32 scales (layout in ``fp8.py``) and run every
matrix through ``fp8_matmul``, which runs the kernel ``fp8_kernel`` picks: on GPUs with FP8
tensor cores ``torch._scaled_mm``'s row-wise path (per-tensor and per-channel weights) or,
on sm90, ``F.scaled_mm``'s 1x128 x 128x128 block path (``fp8_block_mm``), both with
dynamically quantized activations; otherwise a dequantize + ``F.linear`` fallback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loadfsm.quant.config import Fp8Config
from loadfsm.quant.quantized_linear import QuantizedLinear, QuantizedStackedExperts
from loadfsm.quant.fp8 import (FP8_DTYPE, _quantize_with_inv, _scale_from_amax,
                               cuda_kernels, dequantize_fp8, fp8_scale_shape,
                               quantize_fp8)
from loadfsm.quant.fp8_block_mm import (block_scaled_mm, block_scaled_mm_fits,
                                        block_scaled_mm_runs)

_INF = float("inf")

# A kernel: (x2 [M, K], q [N, K], scale, bias, config, out_dtype) -> [M, N].
Fp8Kernel = Callable[..., torch.Tensor]


def fp8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None, config: Fp8Config,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``x @ dequantize(q, scale).T + bias`` in ``out_dtype``.

    Args:
        x: activations ``[..., K]``.
        q: float8_e4m3fn weight ``[N, K]``; ``scale`` its float32 scales.
        bias: ``[N]`` or None.
    Returns:
        ``[..., N]`` in ``out_dtype``. The ``scaled_mm`` kernels have no host syncs, so
        they can be captured in a CUDA graph.
    """
    n, k = q.shape
    x2 = x.reshape(-1, k)  # [M, K]
    out = fp8_kernel(x2, q, config, out_dtype)(x2, q, scale, bias, config, out_dtype)
    return out.reshape(*x.shape[:-1], n)


def fp8_kernel(x2: torch.Tensor, q: torch.Tensor, config: Fp8Config,
               out_dtype: torch.dtype) -> Fp8Kernel:
    """The kernel ``fp8_matmul`` runs for activations ``x2 [M, K]`` and the weight ``q``:
    ``rowwise_scaled_mm``, ``block_scaled_mm`` or ``dequantized_matmul``. What the device
    supports is asked once per device; the rest are shape checks."""
    if config.granularity == "block":
        if (x2.shape[0] and block_scaled_mm_fits(q, config, out_dtype)
                and block_scaled_mm_runs(x2.device)):
            return block_scaled_mm
        return dequantized_matmul
    n, k = q.shape
    if (x2.is_cuda and n % 16 == 0 and k % 16 == 0
            and (config.granularity == "tensor" or out_dtype == torch.bfloat16)
            and _has_fp8_tensor_cores(x2.device.index)):
        return rowwise_scaled_mm
    return dequantized_matmul


class Fp8Linear(QuantizedLinear):
    """A linear layer whose weight is FP8 (``[out_features, in_features]``).

    Parameters (all ``requires_grad=False``): ``weight`` float8_e4m3fn, ``weight_scale``
    float32 shaped by ``config.granularity``, optional ``bias`` in ``out_dtype``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, config: Fp8Config,
                 *, out_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        shape = (out_features, in_features)
        self._install(
            torch.empty(shape, dtype=FP8_DTYPE, device=device),
            torch.empty(fp8_scale_shape(shape, config), dtype=torch.float32, device=device),
            torch.empty(out_features, dtype=out_dtype, device=device) if bias else None,
            config, out_dtype)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       config: Fp8Config,
                       out_dtype: torch.dtype = torch.bfloat16) -> Fp8Linear:
        """Wrap tensors the loader produced, sharing their storage (no copy).

        Raises:
            ValueError: if the dtypes or shapes do not fit ``config``.
        """
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._install(q, scale, bias, config, out_dtype)
        return layer

    def _install(self, q, scale, bias, config, out_dtype):
        _check_quantized("weight", q, scale, config, dims=2)
        self._set_tensors(q, scale, bias, config, out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features]
        return fp8_matmul(x, self.weight, self.weight_scale, self.bias, self.config,
                          self.out_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, granularity={self.config.granularity}")


class Fp8StackedExperts(QuantizedStackedExperts):
    """``StackedExperts`` with FP8 ``gate_up_proj`` / ``down_proj`` and per-expert scales.

    ``gate_up_proj_scale`` / ``down_proj_scale`` are float32 with shape
    ``fp8_scale_shape`` of the stacked weight (e.g. ``[E]`` per tensor, ``[E, N, 1]``
    per channel).
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, config: Fp8Config,
                 *, out_dtype: torch.dtype = torch.bfloat16, device=None):
        # nn.Module.__init__ directly: StackedExperts.__init__ would allocate bf16 weights.
        nn.Module.__init__(self)
        tensors = []
        for shape in ((num_experts, 2 * intermediate, hidden),
                      (num_experts, hidden, intermediate)):
            tensors += [torch.empty(shape, dtype=FP8_DTYPE, device=device),
                        torch.empty(fp8_scale_shape(shape, config), dtype=torch.float32,
                                    device=device)]
        self._install(*tensors, config, out_dtype)

    @classmethod
    def from_quantized(cls, gate_up_proj: torch.Tensor, gate_up_proj_scale: torch.Tensor,
                       down_proj: torch.Tensor, down_proj_scale: torch.Tensor,
                       config: Fp8Config,
                       out_dtype: torch.dtype = torch.bfloat16) -> Fp8StackedExperts:
        """Wrap quantized stacked weights and their scales, sharing storage (no copy).

        Raises:
            ValueError: if the dtypes or shapes do not fit ``config`` or each other.
        """
        experts = cls.__new__(cls)
        nn.Module.__init__(experts)
        experts._install(gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale,
                         config, out_dtype)
        return experts

    def _install(self, gate_up, gate_up_scale, down, down_scale, config, out_dtype):
        _check_quantized("gate_up_proj", gate_up, gate_up_scale, config, dims=3)
        _check_quantized("down_proj", down, down_scale, config, dims=3)
        self._set_tensors(gate_up, gate_up_scale, down, down_scale, config, out_dtype)

    def expert_linear(self, x: torch.Tensor, which: str, expert: int) -> torch.Tensor:
        """``x @ W[expert].T`` in FP8 for ``which`` in {"gate_up_proj", "down_proj"}."""
        return fp8_matmul(x, getattr(self, which)[expert],
                          getattr(self, which + "_scale")[expert], None, self.config,
                          self.out_dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden}, "
                f"intermediate={self.intermediate}, granularity={self.config.granularity}")


def _check_quantized(name, q, scale, config, *, dims):
    if q.dim() != dims or q.dtype != FP8_DTYPE:
        raise ValueError(f"{name} must be a {dims}-D {FP8_DTYPE} tensor, "
                         f"got {q.dim()}-D {q.dtype}")
    expected = fp8_scale_shape(q.shape, config)
    if scale.shape != expected or scale.dtype != torch.float32:
        raise ValueError(f"{name} scale must be float32 of shape {tuple(expected)}, "
                         f"got {scale.dtype} {tuple(scale.shape)}")


@functools.cache
def _has_fp8_tensor_cores(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


_ROWS = Fp8Config(granularity="channel")


def rowwise_scaled_mm(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None, config: Fp8Config,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """``torch._scaled_mm`` on a per-tensor or per-channel weight (``[M, K]`` -> ``[M, N]``)."""
    # With a bf16 output, activations are quantized per token (row) in one fused pass (the
    # per-row kernel of ``quantize_fp8``) and the GEMM is _scaled_mm's row-wise path
    # ([M, 1] x [1, N] scales; CUTLASS on sm90): a per-tensor weight scale is broadcast to
    # a row of N. Other outputs keep one activation scale.
    if out_dtype == torch.bfloat16:
        xq, x_scale = _quantize_tokens(x2.contiguous())                        # [M, 1]
        w_scale = (scale.reshape(1, -1) if config.granularity == "channel"
                   else scale.reshape(1, 1).expand(1, q.shape[0]).contiguous())  # [1, N]
    else:
        x_scale = _scale_from_amax(torch.linalg.vector_norm(x2, ord=_INF))     # []
        xq, w_scale = _quantize_with_inv(x2, x_scale.reciprocal()), scale
    # q.t() is [K, N] column-major, the layout _scaled_mm wants for its second operand.
    out = torch._scaled_mm(xq, q.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
    return out if bias is None else out + bias


def _quantize_tokens(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 activations: on CUDA one Triton launch with no checks between (a
    forward's host time is most of its cost at prefill sizes), else ``quantize_fp8``."""
    kernels = cuda_kernels(x2)
    if kernels is None:
        return quantize_fp8(x2, _ROWS)
    xq = torch.empty(x2.shape, dtype=FP8_DTYPE, device=x2.device)
    x_scale = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x2.device)
    kernels.quantize_rows_into(x2, xq, x_scale)
    return xq, x_scale


def dequantized_matmul(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None, config: Fp8Config,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """The fallback on every device: the weight dequantized to ``out_dtype``, ``F.linear``."""
    bias = None if bias is None else bias.to(out_dtype)
    return F.linear(x2.to(out_dtype), dequantize_fp8(q, scale, config, out_dtype), bias)
