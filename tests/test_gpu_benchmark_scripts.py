"""The GPU-only benchmark scripts import and parse their options without a GPU (they run
on the H200; CI only proves they are not broken before the device sees them)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import forward_host  # noqa: E402
import push_profile  # noqa: E402


@pytest.mark.parametrize("script", [forward_host, push_profile])
def test_help_parses(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main(["--help"])
    assert exit_.value.code == 0
    assert "usage: benchmarks/" in capsys.readouterr().out
