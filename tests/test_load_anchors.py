"""``benchmarks/load_anchors.py`` on the CPU: its sides run and read what they claim, and
its result has the issue's ratios. Nothing here is timed."""

import json
import os
import sys
from pathlib import Path

import pytest

from loadfsm.testing import write_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import load_anchors  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), max_shard_bytes=4 << 20)


def test_result_has_each_side_and_skips_cold_without_root(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(load_anchors, "can_drop_caches", lambda: False)
    assert load_anchors.main(["--dir", str(tiny_dir), "--model", "tiny", "--device", "cpu",
                              "--repeat", "1", "--cold", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    total = sum(f.stat().st_size for f in tiny_dir.glob("*.safetensors"))
    assert result["checkpoint_bytes"] == total
    assert {"loadfsm", "seq_read"} <= result.keys() and "pinned_h2d" not in result
    assert result["cold"].startswith("skipped") and "loadfsm_cold" not in result
    assert result["final_bytes"] > 0 and result["ratios"] == {}


def test_cold_sides_drop_the_cache_before_each(tiny_dir, monkeypatch):
    dropped = []
    monkeypatch.setattr(load_anchors, "can_drop_caches", lambda: True)
    monkeypatch.setattr(load_anchors, "drop_caches", lambda: dropped.append(1))
    result = load_anchors.bench("tiny", tiny_dir, load_anchors.torch.device("cpu"), "fp8",
                                repeat=2, cold=True)
    assert len(dropped) == 2 * 3
    assert set(result["ratios"]) == {"loadfsm_cold_over_seq_read_cold",
                                     "loadfsm_cold_over_par_read_cold"}


@pytest.mark.parametrize("read", ["seq_read", "par_read"])
def test_reads_cover_every_byte(tiny_dir, monkeypatch, read):
    files = sorted(tiny_dir.glob("*.safetensors"))
    monkeypatch.setattr(load_anchors, "PAR_CHUNK", 1 << 20)      # several jobs per file
    seen = []
    real_preadv, real_open = os.preadv, open

    def preadv(fd, buffers, offset):
        got = real_preadv(fd, buffers, offset)
        seen.append(got)
        return got

    class Counting:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def readinto(self, buffer):
            got = self.f.readinto(buffer)
            seen.append(got)
            return got

    monkeypatch.setattr(load_anchors.os, "preadv", preadv)
    monkeypatch.setattr(load_anchors, "open", Counting, raising=False)   # its name only
    getattr(load_anchors, read)(files)
    assert sum(seen) == sum(f.stat().st_size for f in files)
