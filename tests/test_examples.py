"""The examples run as users run them: a fresh interpreter, the package as installed."""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True,
                          text=True, env=env, timeout=900)   # a hang guard, not a speed bound


def test_custom_handler_loads_and_pushes_a_user_scheme():
    """A scheme registered from outside the package (INT4 group-wise) loads and pushes
    through the public API and matches its dequantized reference, bit for bit."""
    result = _run("custom_handler.py")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "quant=int4-g128" in out and "16 INT4" in out
    assert "load matches the dequantized reference" in out
    assert "no tensor moved; matches the dequantized reference" in out
