"""Kernels readied in the background while the first tensors are read.

A first load in a fresh process would otherwise stop at its first quantized layer
while Triton initializes and loads its kernels. Each handler the plan uses gets its
``prepare`` run in one thread started with the session; until that thread is done the
driver quantizes under the handler's ``unprepared()`` (FP8: the torch reference,
bit-identical), so no layer waits and no kernel is launched from two threads at once.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterable

import torch


class KernelWarmup:
    """The preparation of ``handlers`` for ``config`` on ``device``, in a thread.

    What was prepared once stays prepared for the process (Triton keeps its kernels): a
    later session starts no thread, so its first layers quantize on the kernels at once
    instead of on the reference (which also needs a float32 copy of each chunk).
    """

    # (handler class, config, device) prepared in this process: kernels, not layers.
    _prepared: set[tuple[type, str, str]] = set()
    # One preparation at a time in a process: a second session's warm-up waits for the
    # first instead of compiling the same Triton kernels beside it.
    _lock = threading.Lock()

    def __init__(self, handlers: Iterable, config, device: torch.device):
        pending = [h for h in handlers if _key(h, config, device) not in self._prepared]
        self._thread = None
        if pending:
            self._thread = threading.Thread(target=self._prepare, name="loadfsm-warmup",
                                            args=(pending, config, device), daemon=True)
            self._thread.start()

    @classmethod
    def _prepare(cls, handlers: list, config, device: torch.device) -> None:
        try:
            with cls._lock, (torch.cuda.device(device) if device.type == "cuda"
                             else contextlib.nullcontext()):
                for handler in handlers:
                    key = _key(handler, config, device)
                    if key not in cls._prepared:
                        handler.prepare(config, device)
                        cls._prepared.add(key)
        except Exception:       # noqa: BLE001 -- only a head start: a kernel that cannot
            return              # run fails again at its first layer, typed, in the load

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()


def _key(handler, config, device: torch.device) -> tuple[type, str, str]:
    return type(handler), repr(config), str(device)
