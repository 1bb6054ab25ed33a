"""FP8 GEMM on 128x128 weight tiles without dequantizing: ``F.scaled_mm``'s block path.

The DeepSeek-style recipe of ``F.scaled_mm`` (cuBLASLt, sm90 only): activations quantized
per token in groups of 128 columns (1x128), weights in 128x128 tiles, both scales applied
inside the K loop. The operands, as torch checks them (``ScaledBlas.cpp``,
``_scaled_block1x128_block128x128``), for ``x [M, K]`` and a weight ``q [N, K]``:
  1. ``a``: float8_e4m3fn ``[Mp, K]``, Mp = M rounded up to 4 (cuBLASLt needs it); the
     pad rows are left unwritten and their output rows are sliced off.
  2. ``scale_a``: float32 ``[Mp, K/128]`` with strides ``(1, Mp)`` (outer-dim-major).
  3. ``b``: ``q.t()``, the ``[K, N]`` column-major view of the row-major weight.
  4. ``scale_b``: float32 ``[Kp, N/128]`` with strides ``(1, Kp)``, Kp = K/128 rounded up
     to 4: the transposed view of the weight's own ``[N/128, K/128]`` tile scales (padded
     with unused K blocks when K/128 is not a multiple of 4). Their contiguous transpose
     is refused, and ``ws.t().contiguous().t()`` runs but reads the tiles transposed.
The activation groups are the rows of the ``[M*K/128, 128]`` view of x: on CUDA one Triton
launch quantizes them as the per-row kernel of ``quantize_fp8`` would and writes the scales
straight into ``scale_a``'s layout (the forward is bound by host time at prefill sizes);
elsewhere the per-row path of ``quantize_fp8`` and a copy. ``scale_b`` is made from the
weight's scales at every call (a view, or a padded copy of a few KB), so a weight push
that rewrites them in place is seen by the next call and by CUDA graphs captured before it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from loadfsm.quant.config import Fp8Config
from loadfsm.quant.fp8 import FP8_DTYPE, cuda_kernels, quantize_fp8_into

GROUP = 128  # the only activation group and weight tile edge the recipe has
_ROWS = Fp8Config(granularity="channel")
# F.scaled_mm and its block recipes exist from torch 2.10 on.
_SCALING = getattr(F, "ScalingType", None)
_HAS_BLOCK_RECIPES = (hasattr(F, "scaled_mm") and _SCALING is not None
                      and {"BlockWise1x128", "BlockWise128x128"} <= set(_SCALING.__members__))


def block_scaled_mm_fits(q: torch.Tensor, config: Fp8Config, out_dtype: torch.dtype) -> bool:
    """Whether the weight ``q [N, K]`` and its config fit the recipe: 128x128 tiles, N and
    K multiples of 128, a row-major weight and a bf16 output."""
    n, k = q.shape
    return (config.granularity == "block" and config.block_size == (GROUP, GROUP)
            and n % GROUP == 0 and k % GROUP == 0 and q.is_contiguous()
            and out_dtype == torch.bfloat16)


@functools.cache
def _runs_on(device_index: int) -> bool:
    # torch raises NotImplementedError off sm90 and below cuBLASLt 12.9 (a build for CUDA
    # 12.8 on an H100 has the enums but not the kernel), and cuBLASLt a RuntimeError where
    # it finds no algorithm: a valid 4x128x128 product asks, with no host sync.
    if not _HAS_BLOCK_RECIPES or torch.cuda.get_device_capability(device_index)[0] != 9:
        return False
    device = torch.device("cuda", device_index)
    q = torch.zeros(GROUP, GROUP, dtype=FP8_DTYPE, device=device)
    x = torch.zeros(4, GROUP, dtype=torch.bfloat16, device=device)
    try:
        block_scaled_mm(x, q, torch.ones(1, 1, device=device), None,
                        Fp8Config(granularity="block"), torch.bfloat16)
    except RuntimeError:  # NotImplementedError included
        return False
    return True


def block_scaled_mm_runs(device: torch.device) -> bool:
    """Whether ``F.scaled_mm`` runs the block recipe on ``device`` (a CUDA sm90 GPU with
    cuBLASLt >= 12.9); asked once per device."""
    return device.type == "cuda" and _runs_on(device.index)


def quantize_activation_groups(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2 [M, K]`` quantized per token in 1x128 groups, laid out for ``F.scaled_mm``.

    Returns:
        ``(a, scale_a)``: ``a`` float8_e4m3fn ``[Mp, K]`` and ``scale_a`` float32
        ``[Mp, K/128]`` with strides ``(1, Mp)`` (steps 1 and 2 of the module docstring);
        rows past M are unwritten.
    """
    m, k = x2.shape
    padded = -(-m // 4) * 4
    a = torch.empty(padded, k, dtype=FP8_DTYPE, device=x2.device)
    scale_t = torch.empty(k // GROUP, padded, dtype=torch.float32, device=x2.device)
    x2 = x2.contiguous()
    kernels = cuda_kernels(x2)
    if kernels is not None:
        kernels.quantize_groups_into(x2, a, scale_t, GROUP)    # one launch
        return a, scale_t.t()
    rows = torch.empty(m * k // GROUP, 1, dtype=torch.float32, device=x2.device)
    quantize_fp8_into(x2.view(-1, GROUP), a[:m].view(-1, GROUP), rows, _ROWS)
    scale_t.t()[:m].copy_(rows.view(m, k // GROUP))
    return a, scale_t.t()


def weight_scale_operand(scale: torch.Tensor) -> torch.Tensor:
    """The weight's ``[N/128, K/128]`` tile scales as ``scale_b`` (step 4 of the module
    docstring): a view when K/128 is a multiple of 4, else a padded copy."""
    pad = -scale.shape[1] % 4
    scale = F.pad(scale, (0, pad), value=1.0) if pad else scale.contiguous()
    return scale.t()


def block_scaled_mm(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None, config: Fp8Config,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """``x2 @ dequantize(q, scale).T + bias`` through ``F.scaled_mm``'s block recipe.

    Args:
        x2: activations ``[M, K]``; q: float8_e4m3fn ``[N, K]``; scale: its float32
        ``[N/128, K/128]`` tile scales (``block_scaled_mm_fits`` must hold); config:
        taken as every kernel of ``fp8_matmul`` takes it (the recipe fixes the tiles).
    Returns:
        ``[M, N]`` in ``out_dtype``, with no host sync (CUDA graphs capture it).
    """
    m = x2.shape[0]
    a, scale_a = quantize_activation_groups(x2)
    out = F.scaled_mm(a, q.t(), scale_a, _SCALING.BlockWise1x128, weight_scale_operand(scale),
                      _SCALING.BlockWise128x128, output_dtype=out_dtype)[:m]
    return out if bias is None else out + bias
