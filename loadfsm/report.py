"""What a load tells its caller."""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field


@dataclass
class LoadReport:
    """Figures and facts of one load.

    Bytes are what the session materialized on the target device (its ledger);
    ``cuda_peak_bytes`` is ``torch.cuda.max_memory_allocated`` above the level
    at the start of the load, when the device is CUDA.
    """

    peak_bytes: int
    final_bytes: int
    largest_layer_bytes: int
    seconds: float
    states: dict[str, int]
    layer_states: dict[str, str]
    device: str
    quant: str | None
    bytes_read: int = 0
    largest_output_bytes: int = 0          # largest layer after quantization
    cuda_peak_bytes: int | None = None
    max_layers_in_flight: int = 0
    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)
    padded: list[str] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Replan:
    """What re-planning a loaded model needs besides the model itself: the load's
    ``pieces`` (``WeightSync(model, session=report)`` uses them), and a weak reference
    to the model it loaded (a report never keeps a model alive)."""

    model: weakref.ref
    pieces: tuple | None
