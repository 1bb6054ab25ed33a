"""The load report, built from the plan, the ledger and the driver's figures (it keeps
no reference to the session)."""

from __future__ import annotations

import time

import torch

from ..ledger import MemoryLedger
from ..plan import Plan
from ..quant.config import quant_name
from ..report import LoadReport
from ..states import LayerState
from .driver import ArrivalDriver


def cuda_baseline(device: torch.device) -> int | None:
    """Reset the device's peak statistics; the bytes allocated before the load."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def build_report(plan: Plan, ledger: MemoryLedger, driver: ArrivalDriver, *,
                 config, started: float, cuda_base: int | None,
                 missing: dict[str, list[str]]) -> LoadReport:
    device = driver.device
    cuda_peak = None
    if cuda_base is not None:
        torch.cuda.synchronize(device)
        cuda_peak = torch.cuda.max_memory_allocated(device) - cuda_base
    layer_states = {name: rec.state.name for name, rec in plan.layers.items()}
    states = {state.name: 0 for state in LayerState}
    for state in layer_states.values():
        states[state] += 1
    slots = [slot for rec in plan.layers.values() for slot in rec.slots.values()]
    return LoadReport(
        peak_bytes=ledger.peak, final_bytes=ledger.final,
        largest_layer_bytes=driver.largest, largest_output_bytes=driver.largest_output,
        seconds=time.perf_counter() - started,
        states=states, layer_states=layer_states, device=str(device),
        quant=quant_name(config), bytes_read=driver.bytes_read, cuda_peak_bytes=cuda_peak,
        max_layers_in_flight=driver.peak_in_flight, missing=missing,
        unexpected=sorted(driver.unexpected),
        defaulted=[r.name for r in plan.layers.values() if r.defaulted],
        padded=[s.full_name for s in slots if s.padded],
        tied={alias: s.full_name for s in slots for alias in s.aliases})
