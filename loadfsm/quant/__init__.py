"""FP8 quantization: configs, the torch reference math, Triton kernels and FP8 modules."""

from loadfsm.quant.config import Fp8Config, resolve_quant
from loadfsm.quant.fp8 import (FP8_DTYPE, FP8_MAX, dequantize_fp8, fp8_scale_shape,
                               fp8_scales, quantize_fp8, quantize_fp8_into,
                               quantize_fp8_reference, sqnr_db)
from loadfsm.quant.linear import Fp8Linear, Fp8StackedExperts, fp8_matmul
from loadfsm.quant.triton_fp8 import triton_available

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "Fp8Config",
    "Fp8Linear",
    "Fp8StackedExperts",
    "dequantize_fp8",
    "fp8_matmul",
    "fp8_scale_shape",
    "fp8_scales",
    "quantize_fp8",
    "quantize_fp8_into",
    "quantize_fp8_reference",
    "resolve_quant",
    "sqnr_db",
    "triton_available",
]
