"""What a newcomer meets first: the demo without numpy, one progress bar per load."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import termios
import subprocess
import sys

import pytest

_NO_NUMPY = """
import sys
sys.modules["numpy"] = None      # what a machine without numpy has: import fails
from loadfsm.cli import main
sys.exit(main(["demo", "--json"]))
"""


def _run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=300, **kwargs)


def test_demo_runs_without_numpy():
    """``loadfsm demo`` writes and loads its checkpoint with numpy absent (not a dependency)."""
    done = _run_python(_NO_NUMPY, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '"FINALIZED"' in done.stdout
    assert "NumPy" not in done.stderr            # torch's import warning is not shown


def test_demo_json_prints_no_progress_bar():
    """``--json`` output is one JSON object and stderr carries no bar."""
    done = _run_python("from loadfsm.cli import main; main(['demo', '--json'])",
                       capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("{")
    assert "loading" not in done.stderr


def test_demo_without_terminal_prints_no_progress_bar():
    """Piped output (logs, CI) gets no control characters from the bar."""
    done = _run_python("from loadfsm.cli import main; main(['demo'])",
                       capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "loading" not in done.stderr and "\r" not in done.stdout + done.stderr


@pytest.mark.skipif(not hasattr(pty, "openpty"), reason="needs a pseudo-terminal")
def test_demo_on_terminal_draws_one_bar_per_load():
    """On a terminal, every redraw of the bar holds exactly one bar (never two on a line)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", "from loadfsm.cli import main; main(['demo'])"],
                            stdout=follower, stderr=follower,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.close(follower)
    out = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 300)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:          # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(leader)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    redraws = [part for line in text.split("\n") for part in line.split("\r")]
    bars = [part for part in redraws if "loading" in part]
    assert bars, text                                   # the bar is drawn on a terminal
    assert all(part.count("loading") == 1 for part in bars), bars
    assert any("layer" in part and "/" in part for part in bars), bars
