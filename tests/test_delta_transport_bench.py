"""``benchmarks/delta_transport_bench.py`` runs end to end over gloo: the delta pushes leave
the engine bit-identical to a full push of the trainer's weights and skip most bytes.
Nothing here is timed."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import delta_transport_bench  # noqa: E402


@pytest.mark.parametrize("mode", ["layers", "tiles"])
def test_delta_over_gloo_is_exact_and_skips_bytes(capsys, mode):
    assert delta_transport_bench.main(["--layers", "4", "--repeat", "1", "--mode", mode,
                                       "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bit_identical"] is True
    assert 0 < result["bytes_sent"] < result["bytes_skipped"]
    assert (result["tiles_sent"] > 0) == (mode == "tiles")
