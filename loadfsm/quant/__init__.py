"""Quantization: configs, the torch reference math, Triton kernels, FP8 and INT8 modules."""

from loadfsm.quant.config import Fp8Config, Int8Config, resolve_quant
from loadfsm.quant.fp8 import (FP8_DTYPE, FP8_MAX, dequantize_fp8, fp8_scale_shape,
                               fp8_scales, quantize_fp8, quantize_fp8_into,
                               quantize_fp8_reference, sqnr_db)
from loadfsm.quant.int8 import dequantize_int8, int8_matmul, quantize_int8
from loadfsm.quant.int8_linear import Int8Linear, Int8StackedExperts
from loadfsm.quant.linear import Fp8Linear, Fp8StackedExperts, fp8_matmul
from loadfsm.quant.triton_fp8 import triton_available

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "Fp8Config",
    "Fp8Linear",
    "Fp8StackedExperts",
    "Int8Config",
    "Int8Linear",
    "Int8StackedExperts",
    "dequantize_fp8",
    "dequantize_int8",
    "fp8_matmul",
    "fp8_scale_shape",
    "fp8_scales",
    "int8_matmul",
    "quantize_fp8",
    "quantize_fp8_into",
    "quantize_fp8_reference",
    "quantize_int8",
    "resolve_quant",
    "sqnr_db",
    "triton_available",
]
