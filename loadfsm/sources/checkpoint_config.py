"""A checkpoint's ``config.json``: what it says about how its weights are quantized.

Read only from the checkpoint's own directory (the directory given, or the folder of a
single safetensors file), only when it is a regular file, and never larger than a
config can be.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CorruptCheckpointError
from .checkpoint_files import open_regular

CONFIG_NAME = "config.json"
MAX_CONFIG_BYTES = 16 << 20


def quantization_config(path: str | Path) -> dict | None:
    """``config.json``'s ``quantization_config`` beside the checkpoint at ``path``, or
    ``None`` when there is no config or it says nothing about quantization.

    Raises:
        CorruptCheckpointError: the config exists but is not a JSON object.
        UnsafeCheckpointPathError: ``config.json`` is not a regular file.
    """
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if not config.exists():
        return None
    fd = open_regular(config)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    try:
        body = json.loads(raw) if len(raw) <= MAX_CONFIG_BYTES else None
    except ValueError as exc:
        raise CorruptCheckpointError(f"config is not JSON: {exc}", file=str(config)) from exc
    if not isinstance(body, dict):
        raise CorruptCheckpointError("config is not a JSON object (or over "
                                     f"{MAX_CONFIG_BYTES >> 20} MiB)", file=str(config))
    found = body.get("quantization_config")
    return found if isinstance(found, dict) else None
