"""``loadfsm demo``: the built-in tiny model, written to a temporary checkpoint and
loaded layer by layer in FP8, with the figures that show why."""

from __future__ import annotations

import tempfile

import torch

from .api import load
from .quant.fp8 import sqnr_db
from .loading import default_device
from .testing import ModelConfig, as_config, build_model, load_reference_model, write_checkpoint
from .trace_timeline import naive_peak


def run_demo(model: str | ModelConfig = "tiny", *, quant: str | None = "fp8", device=None,
             dummy: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Load the reference model; return the figures ``loadfsm demo`` prints."""
    config = as_config(model)
    device = torch.device(device) if device is not None else default_device()
    with tempfile.TemporaryDirectory(prefix="loadfsm-demo-") as tmp:
        source = None if dummy else write_checkpoint(config, tmp, seed=seed,
                                                      max_shard_bytes=16 << 20)
        fp8_model = build_model(config)
        report = load(fp8_model, source, quant=quant, device=device, seed=seed,
                      progress=progress)
    if dummy:
        reference = build_model(config)
        load(reference, None, device=device, seed=seed)
    else:
        reference = load_reference_model(config, seed=seed, device=device)
    tokens = torch.randint(0, config.vocab_size, (2, 32),
                           generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        sqnr = sqnr_db(reference(tokens).float(), fp8_model(tokens).float())
    figures = report.to_dict()
    figures.pop("layer_states")
    figures.update(model=config_name(model), naive_peak_bytes=naive_peak(report),
                   sqnr_db=round(sqnr, 2), load_format="dummy" if dummy else "safetensors")
    return figures


def config_name(model) -> str:
    return model if isinstance(model, str) else "custom"


def format_demo(f: dict) -> str:
    mb = lambda n: f"{n / 2**20:8.2f} MB"  # noqa: E731
    states = ", ".join(f"{k}={v}" for k, v in f["states"].items() if v)
    lines = [
        f"model {f['model']} ({f['load_format']}) -> {f['quant'] or 'bf16'} on {f['device']}",
        f"layers by state: {states}",
        f"peak memory    {mb(f['peak_bytes'])}   (final + layers in flight, ledger)",
        f"final model    {mb(f['final_bytes'])}",
        f"largest layer  {mb(f['largest_layer_bytes'])}   (bf16 staging)",
        f"naive peak     {mb(f['naive_peak_bytes'])}   (load all bf16, then quantize)",
        f"peak saved     {f['naive_peak_bytes'] / max(f['peak_bytes'], 1):8.2f} x",
        f"load time      {f['seconds']:8.3f} s",
        f"logits SQNR    {f['sqnr_db']:8.2f} dB vs the bf16 model",
    ]
    if f.get("cuda_peak_bytes") is not None:
        lines.insert(3, f"cuda peak      {mb(f['cuda_peak_bytes'])}   "
                        "(torch.cuda.max_memory_allocated)")
    return "\n".join(lines)
