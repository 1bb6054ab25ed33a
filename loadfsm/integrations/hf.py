"""Hugging Face transformers models, loaded layer by layer (the ``loadfsm[hf]`` extra).

``from_pretrained`` follows transformers' own loading, step for step, with loadfsm's
lifecycle in place of its state-dict copy: steps H1..H5 (ARCHITECTURE.md). Names are mapped
with transformers' conversion rules for the model type (``hf_pieces``); ``nn.Linear``
becomes ``Fp8Linear`` and fused experts ``Fp8Experts``; the non-persistent buffers (rotary
``inv_freq``, ``position_ids``) are computed with the model's own ``_init_weights``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig
from transformers.modeling_utils import PreTrainedModel

from ..loading.drive import run
from ..loading.prequantized import checkpoint_quant, trace_checkpoint_quant
from ..loading.session import LoadSession
from ..quant.config import Fp8Config, resolve_quant
from ..report import LoadReport
from ..sources.checkpoint_config import quantization_config
from ..sources.checkpoint_files import refuse_overwrite
from ..sources.safetensors_dir import SafetensorsSource
from . import hf_experts  # noqa: F401  (registers the FP8 handler of fused experts)
from . import hf_prequantized  # noqa: F401  (and the pre-quantized one)
from .hf_pieces import checkpoint_mapping

# MoE routers stay in full precision whatever the user excludes: see ``Fp8Config.exclude``.
ROUTERS = tuple(p for p in Fp8Config().exclude if p != "lm_head")


class HfLoad(NamedTuple):
    """What ``from_pretrained`` returns: ``model, report = from_pretrained(...)``."""

    model: PreTrainedModel
    report: LoadReport


def from_pretrained(path: str | Path, quant="fp8", device=None, exclude=("lm_head",),
                    trace=None, strict: bool = True, dtype: torch.dtype | None = None,
                    *, model_class: type[PreTrainedModel] | None = None) -> HfLoad:
    """Load a transformers checkpoint directory layer by layer, FP8 by default.

    Args:
        path: a local directory with ``config.json`` and safetensors weights (one file,
            or shards with ``model.safetensors.index.json``).
        quant: ``"fp8"``, ``"fp8-channel"``, ``"fp8-block"``, ``"int8"``, ``None`` (full
            precision) or a config (``Fp8Config``, ``Int8Config``: used as given, its
            ``exclude`` included).
        device: target device; the best available when ``None``.
        exclude: module names kept in full precision (fnmatch or dotted suffix, see
            ``Fp8Config.exclude``); MoE routers are always added.
        trace: ``True`` (structlog events), a JSONL path, or ``None``.
        strict: raise on missing/unexpected tensors (after transformers' own ignore
            rules for the model class); else report them.
        dtype: parameter dtype; the config's ``dtype`` when ``None`` (float32 if unset).
        model_class: the transformers class to build; else the config's first
            ``architectures`` entry, else ``AutoModelForCausalLM`` / ``AutoModel``.

    Returns:
        ``HfLoad(model, report)``: the model in eval mode, ready for ``forward`` and
        ``generate``, and the ``LoadReport``.

    Raises:
        LoadError: a subclass naming the tensor, file and layer at fault.
        ValueError: a conversion rule of this model type that changes values.
    """
    path = Path(path)
    model = build_meta_model(path, dtype=dtype, model_class=model_class)         # H1
    if (path / "generation_config.json").exists() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(path)
    source = SafetensorsSource(path, device=device)
    refuse_overwrite(trace, [*source.inputs(), *path.glob("*.json")])
    try:
        entries = source.entries()
        # A checkpoint already in FP8 loads as it is (``loading.prequantized``).
        config_q, differs = checkpoint_quant(hf_quant(quant, exclude), entries,
                                             quantization_config(path))
        session, ignored = plan_session(model, entries, config_q,
                                        device=device, trace=trace, strict=strict)   # H2
        trace_checkpoint_quant(session.tracer, session.quant, differs)
        report = run(session, _Ignoring(source, ignored))                        # H3, H4
    finally:
        source.close()
    init_non_persistent_buffers(model, session.device)                          # H5
    model.eval()
    return HfLoad(model, report)


def build_meta_model(path: str | Path, *, dtype: torch.dtype | None = None,
                     model_class: type[PreTrainedModel] | None = None) -> PreTrainedModel:
    """H1: the model ``config.json`` names, built on ``meta`` in the checkpoint's dtype."""
    config = AutoConfig.from_pretrained(path)
    cls = model_class or _model_class(config)
    # Auto classes build through ``from_config``; a concrete class through the
    # ``_from_config`` those call (it applies dtype and attention implementation).
    build = getattr(cls, "from_config", None) or cls._from_config
    with torch.device("meta"):
        return build(config, dtype=dtype or _config_dtype(config))


def hf_quant(quant, exclude=("lm_head",)):
    """The quant config of a transformers load: for a scheme named by a string, routers
    always stay in full precision; a config object is used as given."""
    config_q = resolve_quant(quant)
    if config_q is not None and isinstance(quant, str):
        config_q = dataclasses.replace(config_q, exclude=(*exclude, *ROUTERS))
    return config_q


def plan_session(model: PreTrainedModel, entries: dict, quant, *,
                 device=None, trace=None, strict: bool = True) -> tuple[LoadSession, set]:
    """H2: the session for ``model`` fed by checkpoint ``entries`` (names mapped by
    transformers' conversion rules), and the checkpoint names the class ignores."""
    mapping = checkpoint_mapping(model, entries)
    session = LoadSession(model, quant=quant, device=device, trace=trace, strict=strict,
                          pieces=mapping.pieces)
    return session, mapping.ignored


def init_non_persistent_buffers(model: PreTrainedModel, device: torch.device) -> None:
    """Compute the buffers no checkpoint holds on ``device``, with the model's own init.

    transformers' ``from_pretrained`` moves non-persistent buffers off ``meta`` and runs
    ``_init_weights`` on their modules (rotary embeddings recompute ``inv_freq`` from the
    config; ``position_ids`` is an ``arange``). We do the same, module by module, with the
    ``_init_weights`` of the nearest ``PreTrainedModel`` (composite models differ per part).
    Loaded parameters of those modules are guarded with transformers' own
    ``_is_hf_initialized`` flag for the call and unflagged after.
    """
    owners = {name: m for name, m in model.named_modules() if isinstance(m, PreTrainedModel)}
    with torch.no_grad():
        for name, module in model.named_modules():
            stale = [b for b, t in module._buffers.items()
                     if t is not None and t.is_meta and b in module._non_persistent_buffers_set]
            if not stale:
                continue
            for b in stale:
                module._buffers[b] = torch.empty_like(module._buffers[b], device=device)
            owner = owners[max((n for n in owners if n == "" or name == n
                                or name.startswith(n + ".")), key=len)]
            loaded = [p for p in module.parameters(recurse=False)]
            for p in loaded:
                p._is_hf_initialized = True
            try:
                owner._init_weights(module)
            finally:
                for p in loaded:
                    del p._is_hf_initialized


class _Ignoring:
    """A source without the names the model class ignores on load (transformers' rules)."""

    def __init__(self, source: SafetensorsSource, ignored: set[str]):
        self._source, self._ignored = source, ignored
        self.file_of = source.file_of

    def entries(self):
        return {n: e for n, e in self._source.entries().items() if n not in self._ignored}

    def index(self):
        return {n: f for n, f in self._source.index().items() if n not in self._ignored}

    def read(self, order):
        return self._source.read(list(self.entries()) if order is None else order)

    @property
    def owned_arrivals(self) -> bool:
        # Without it a GPU load copied every tensor its source assembled on the device
        # (Llama-8B: the peak 1.05 GB above loadfsm.load's, above transformers' own).
        return self._source.owned_arrivals

    def close(self) -> None:
        self._source.close()


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _model_class(config) -> type[PreTrainedModel]:
    """The class ``config.architectures`` names, else the causal-LM or base auto class."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    if type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    return AutoModel
