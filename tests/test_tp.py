"""Tensor parallel (2 ranks, gloo on CPU): each rank loads and quantizes only its shard."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loadfsm.testing import write_checkpoint
from loadfsm.quant.config import resolve_quant
from loadfsm.quant.fp8 import quantize_fp8, sqnr_db
from loadfsm.sources.safetensors_slices import safetensors_weights
from checks import snapshot
from tiny_models import PADDED_SMALL, PADDED_SMALL_MOE, hook_load

TP = 2
# 4 heads / 2 kv heads split over 2 ranks; vocab 500 padded to 512 = 2 x 256 rows.
CONFIGS_TP = {"dense": PADDED_SMALL, "moe": PADDED_SMALL_MOE}
QUANTS = (None, "fp8")
IDS = torch.randint(0, PADDED_SMALL.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def _load(config, path, quant):
    """Hook-load the engine model (tensor-parallel when a group exists); its tensors,
    logits and the bytes it read."""
    weights = safetensors_weights(path)
    model, session = hook_load(config, weights, quant)
    assert session.report.states["FINALIZED"] == len(session.report.layer_states)
    with torch.no_grad():
        logits = model(IDS)
    return {"state": snapshot(model), "logits": logits, "bytes_read": weights.bytes_read}


def _worker(rank, store, paths, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=TP)
    try:
        results = {(kind, quant): _load(CONFIGS_TP[kind], paths[kind], quant)
                   for kind in CONFIGS_TP for quant in QUANTS}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One spawn of two ranks loads every (model, quant); the single-rank runs alongside."""
    root = tmp_path_factory.mktemp("tp")
    paths = {kind: str(write_checkpoint(cfg, root / kind)) for kind, cfg in CONFIGS_TP.items()}
    mp.spawn(_worker, args=(str(root / "store"), paths, str(root)), nprocs=TP)
    ranks = [torch.load(root / f"rank{r}.pt") for r in range(TP)]
    single = {(kind, quant): _load(CONFIGS_TP[kind], paths[kind], quant)
              for kind in CONFIGS_TP for quant in QUANTS}
    total = {kind: sum(s.numel() * s.element_size() for s in
                       (sl.read() for _, sl in safetensors_weights(path)))
             for kind, path in paths.items()}
    return ranks, single, total


def _gather(name, parts, config):
    """The single-rank tensor from the ranks' shards, by the layer's TP layout."""
    if "qkv_proj" in name:
        q, kv = config.num_heads * config.head_dim // TP, config.num_kv_heads * config.head_dim // TP
        split = [p.split([q, kv, kv]) for p in parts]
        return torch.cat([torch.cat([s[i] for s in split]) for i in range(3)])
    if "gate_up_proj" in name or "w13_weight" in name:
        halves = [p.chunk(2, dim=-2) for p in parts]
        return torch.cat([torch.cat([h[i] for h in halves], dim=-2) for i in range(2)], dim=-2)
    if "o_proj" in name or "down_proj" in name or "w2_weight" in name:
        return torch.cat(parts, dim=-1)
    if "embed_tokens" in name or "lm_head" in name:
        return torch.cat(parts)
    assert all(torch.equal(p, parts[0]) for p in parts), f"{name} is not replicated"
    return parts[0]


@pytest.mark.parametrize("kind", list(CONFIGS_TP))
def test_tp_shards_concatenate_to_the_single_rank_load(runs, kind):
    """Unquantized: the two ranks' shards put together equal the single-rank tensors exactly."""
    ranks, single, _ = runs
    want = single[(kind, None)]["state"]
    for name, tensor in want.items():
        got = _gather(name, [r[(kind, None)]["state"][name] for r in ranks], CONFIGS_TP[kind])
        assert torch.equal(got, tensor), name


@pytest.mark.parametrize("kind", list(CONFIGS_TP))
def test_tp_ranks_read_only_their_slices(runs, kind):
    """Each rank reads about half the checkpoint (its shards plus the replicated norms)."""
    ranks, single, total = runs
    assert single[(kind, None)]["bytes_read"] == total[kind]
    for r in ranks:
        assert r[(kind, None)]["bytes_read"] < 0.55 * total[kind]


@pytest.mark.parametrize("kind", list(CONFIGS_TP))
def test_tp_fp8_is_quantized_per_shard(runs, kind):
    """Each rank's FP8 weights and scales are those of its own bf16 shard."""
    ranks, _, _ = runs
    config = resolve_quant("fp8")
    for r in ranks:
        fp8, bf16 = r[(kind, "fp8")]["state"], r[(kind, None)]["state"]
        checked = 0
        for name, tensor in fp8.items():
            if f"{name}_scale" in fp8:
                q, scale = quantize_fp8(bf16[name], config)
                assert torch.equal(tensor.view(torch.uint8), q.view(torch.uint8)), name
                assert torch.equal(fp8[f"{name}_scale"], scale), name
                checked += 1
        assert checked >= 6


@pytest.mark.parametrize("kind", list(CONFIGS_TP))
def test_tp_forward_matches_single_rank(runs, kind):
    """TP bf16 logits match single-rank bf16 (>= 40 dB); TP FP8 is >= 20 dB of those and
    >= 25 dB of single-rank FP8 (its scales are per shard, so not bit-equal)."""
    ranks, single, _ = runs
    reference = single[(kind, None)]["logits"].float()
    single_fp8 = single[(kind, "fp8")]["logits"].float()
    for r in ranks:
        assert sqnr_db(reference, r[(kind, None)]["logits"].float()) >= 40
        assert sqnr_db(reference, r[(kind, "fp8")]["logits"].float()) >= 20
        assert sqnr_db(single_fp8, r[(kind, "fp8")]["logits"].float()) >= 25
    assert torch.equal(ranks[0][(kind, "fp8")]["logits"], ranks[1][(kind, "fp8")]["logits"])
