"""The safetensors dtype names: the torch dtype each loads as, and every valid name's size.

One table for the reader (``shard_file``) and for anything that writes safetensors
(``loadfsm.testing``'s checkpoint writer), so a name and its dtype cannot drift apart.
"""

from __future__ import annotations

import torch

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# Valid in a header but not loadable: only their sizes, to check the header's offsets.
ITEMSIZES = {**{name: dtype.itemsize for name, dtype in DTYPES.items()},
             "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "C64": 8}
NAMES = {dtype: name for name, dtype in DTYPES.items()}   # torch dtype -> safetensors name
