"""``torch.profiler`` ranges around each layer's quantize and commit.

Inside a user's ``torch.profiler.profile()`` the layers show up next to the kernels as
``loadfsm:<layer>:quantize`` and ``loadfsm:<layer>:commit``. With no profiler running,
``layer_range`` is one C call and a shared no-op context manager.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.autograd.profiler import record_function

_NOOP = nullcontext()
_profiler_enabled = torch._C._autograd._profiler_enabled   # any profiler: kineto or legacy


def layer_range(layer: str, step: str):
    """``record_function(f"loadfsm:{layer}:{step}")`` while a profiler runs, else a no-op."""
    if _profiler_enabled():
        return record_function(f"loadfsm:{layer}:{step}")
    return _NOOP
