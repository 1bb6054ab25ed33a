"""The checks every ``quantize_*_into`` makes of the tensors it writes into."""

from __future__ import annotations

import torch


def check_quantize_outputs(w: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor, *,
                           scheme: str, q_dtype: torch.dtype, scale_shape: torch.Size,
                           scale_dtype: torch.dtype) -> None:
    """Raise ``ValueError`` unless ``q_out`` / ``scale_out`` can take ``w`` quantized."""
    if not w.is_floating_point():
        raise ValueError(f"cannot quantize a {w.dtype} tensor to {scheme}")
    if q_out.shape != w.shape or q_out.dtype != q_dtype:
        raise ValueError(f"q_out must be {q_dtype} of shape {tuple(w.shape)}, "
                         f"got {q_out.dtype} {tuple(q_out.shape)}")
    if scale_out.shape != scale_shape or scale_out.dtype != scale_dtype:
        raise ValueError(f"scale_out must be {scale_dtype} of shape {tuple(scale_shape)}, "
                         f"got {scale_out.dtype} {tuple(scale_out.shape)}")
    if q_out.device != w.device or scale_out.device != w.device:
        raise ValueError(f"q_out and scale_out must be on {w.device}")
