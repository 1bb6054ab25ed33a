"""Engine hook: an engine's own load_weights drives the layer machines, FP8 included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from torch import nn

import loadfsm
from loadfsm.testing import build_model
from loadfsm.testing.engine_layers import QKVParallelLinear
from loadfsm.sources.safetensors_slices import safetensors_weights
from checks import assert_loaders_restored, assert_same_tensors, loader_snapshot
from faults import raising_after
from tiny_models import PADDED_SMALL as SMALL
from tiny_models import PADDED_SMALL_MOE as SMALL_MOE
from tiny_models import QKV0, engine_model, hook_load

# engine parameter names -> reference model names
_RENAME = {"experts.w13_weight": "experts.gate_up_proj", "experts.w2_weight": "experts.down_proj"}


def _reference_names(state):
    out = {}
    for name, tensor in state.items():
        for old, new in _RENAME.items():
            name = name.replace(old, new)
        out[name] = tensor
    return out


@pytest.mark.parametrize("quant", [None, "fp8", "fp8-channel", "fp8-block"],
                         ids=["bf16", "fp8", "fp8ch", "fp8blk"])
@pytest.mark.parametrize("config", [SMALL, SMALL_MOE], ids=["dense", "moe"])
def test_hook_load_is_bit_identical_to_loadfsm_load(checkpoint_dir, config, quant):
    """Every layer FINALIZED; tensors and logits equal loadfsm.load into the reference model."""
    model, session = hook_load(config, safetensors_weights(checkpoint_dir(config)), quant)
    reference = build_model(config)
    loadfsm.load(reference, checkpoint_dir(config), quant=quant, device="cpu")
    report = session.report
    assert report.states["FINALIZED"] == len(report.layer_states)
    assert report.peak_bytes <= report.final_bytes + 2 * report.largest_layer_bytes
    assert_same_tensors(_reference_names(model.state_dict()), reference.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


def test_fused_qkv_transition_sequence_is_exact(checkpoint_dir):
    """Three shard calls: arrive x3 (k, q, v), complete, quantize, finalize, nothing else."""
    with capture_logs() as logs:
        hook_load(SMALL, safetensors_weights(checkpoint_dir(SMALL)), "fp8", trace=True)
    events = [e for e in logs if e["event"] == "layer_transition" and e["layer"] == QKV0]
    assert [(e["src"], e["dst"], e["trigger"]) for e in events] == [
        ("META", "PARTIAL", "arrive"), ("PARTIAL", "PARTIAL", "arrive"),
        ("PARTIAL", "PARTIAL", "arrive"), ("PARTIAL", "COMPLETE", "complete"),
        ("COMPLETE", "QUANTIZED", "quantize"), ("QUANTIZED", "FINALIZED", "finalize")]
    # safetensors lists names sorted, so k_proj comes first
    assert [e["piece"] for e in events[:3]] == [f"{QKV0}.weight[{s}]" for s in "kqv"]
    assert [e["shard"] for e in events[:3]] == ["k", "q", "v"]


def test_padding_rows_are_zero_filled(checkpoint_dir):
    """Vocab rows past the checkpoint (written by no loader call) are zero, and traced."""
    with capture_logs() as logs:
        model, _ = hook_load(SMALL, safetensors_weights(checkpoint_dir(SMALL)), trace=True)
    for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
        assert weight.shape[0] == 512 and not weight[500:].any() and weight[:500].any()
    padded = [e["layer"] for e in logs if e["event"] == "layer_padded"]
    assert padded == ["model.embed_tokens", "lm_head"]


def test_loaders_restored_on_exit(checkpoint_dir):
    """After the session each engine parameter holds exactly its own loader object, and the
    full-precision parameters installed in its place carry the same one."""
    model = engine_model()
    snapshot = loader_snapshot(model)
    with loadfsm.LoadSession(model, device="cpu") as session:
        wrapped = model.lm_head.weight.weight_loader
        model.load_weights(safetensors_weights(checkpoint_dir(SMALL)))
    assert wrapped is not snapshot["lm_head.weight"][1]["weight_loader"]
    assert_loaders_restored(snapshot)
    assert session.report.states["FINALIZED"] == 17
    for name, param in model.named_parameters():
        meta, attrs = snapshot[name]
        assert param is not meta and not param.is_meta
        assert getattr(param, "weight_loader", None) is attrs.get("weight_loader"), name


def test_loaders_restored_when_the_load_raises(checkpoint_dir):
    """An exception midway restores every loader, frees staging and finishes nothing."""
    model = engine_model()
    snapshot = loader_snapshot(model)
    weights = raising_after(safetensors_weights(checkpoint_dir(SMALL)), 7, OSError("disk gone"))
    session = loadfsm.LoadSession(model, device="cpu")
    with pytest.raises(OSError, match="disk gone"), session:
        model.load_weights(weights)
    assert_loaders_restored(snapshot)
    assert "report" not in vars(session)
    assert session.driver.in_flight == {} and session.ledger.staging == 0
    assert model.model.layers[1].mlp.down_proj.weight.is_meta


def test_duplicate_shard_call_raises(checkpoint_dir):
    """The same shard loaded twice raises DuplicateWeightError naming parameter and shard."""
    weights = list(safetensors_weights(checkpoint_dir(SMALL)))
    q = next(item for item in weights if item[0] == "model.layers.0.self_attn.q_proj.weight")
    model = engine_model()
    with pytest.raises(loadfsm.DuplicateWeightError, match=r"qkv_proj.weight.*'q'") as err:
        with loadfsm.LoadSession(model, device="cpu"):
            model.load_weights([q, q])
    assert err.value.tensor == f"{QKV0}.weight[q]" and err.value.layer == QKV0


def test_unknown_shard_id_raises():
    """A shard id the parameter does not have raises UnknownShardError before any write."""
    model = engine_model()
    param = model.model.layers[0].self_attn.qkv_proj.weight
    with pytest.raises(loadfsm.UnknownShardError, match="its shards are k, q, v") as err:
        with loadfsm.LoadSession(model, device="cpu") as session:
            param.weight_loader(param, torch.zeros(64, 64, dtype=torch.bfloat16), "x")
    assert (err.value.param, err.value.shard) == (f"{QKV0}.weight", "x")
    assert session.plan.layers[QKV0].state is loadfsm.LayerState.META


class OverrunQKV(QKVParallelLinear):
    """Its v shard starts 16 rows late, so it runs past the end of the parameter."""

    def weight_loader(self, param, loaded_weight, loaded_shard_id):
        if loaded_shard_id != "v":
            return super().weight_loader(param, loaded_weight, loaded_shard_id)
        param.data.narrow(0, self.q_size + self.kv_size + 16, self.kv_size).copy_(loaded_weight)


class MisplacedQKV(QKVParallelLinear):
    """Its k shard lands on the q rows."""

    def weight_loader(self, param, loaded_weight, loaded_shard_id):
        offset = 0 if loaded_shard_id == "k" else self._shard(loaded_shard_id)[0]
        param.data.narrow(0, offset, loaded_weight.shape[0]).copy_(loaded_weight)


class FusedQKVEngineModel(nn.Module):
    def __init__(self, qkv_class):
        super().__init__()
        self.qkv_proj = qkv_class(64, 16, 4, 2, dtype=torch.bfloat16)   # q 64, k 32, v 32 rows


@pytest.mark.parametrize("qkv_class, shard, match", [
    (OverrunQKV, "v", "exceeds dimension size"),
    (MisplacedQKV, "k", r"wrote \[0:32, 0:64\], outside its region \[64:96, 0:64\]"),
], ids=["outside-parameter", "outside-shard"])
def test_write_outside_its_region_raises(qkv_class, shard, match):
    """A loader writing past the parameter or outside its shard raises ShardWriteError."""
    with torch.device("meta"):
        model = FusedQKVEngineModel(qkv_class)
    param = model.qkv_proj.weight
    rows = {"q": 64, "k": 32, "v": 32}
    with pytest.raises(loadfsm.ShardWriteError, match=match) as err:
        with loadfsm.LoadSession(model, device="cpu"):
            for s in "qkv":
                param.weight_loader(param, torch.ones(rows[s], 64, dtype=torch.bfloat16), s)
    assert (err.value.param, err.value.shard) == ("qkv_proj.weight", shard)
    assert "weight_loader" not in vars(param) or param.weight_loader.__self__ is model.qkv_proj


def test_missing_shard_is_reported_by_piece():
    """A layer whose k and v calls never came is listed with exactly those pieces."""
    with torch.device("meta"):
        model = FusedQKVEngineModel(QKVParallelLinear)
    param = model.qkv_proj.weight
    with pytest.raises(loadfsm.IncompleteLoadError) as err:
        with loadfsm.LoadSession(model, device="cpu"):
            param.weight_loader(param, torch.ones(64, 64, dtype=torch.bfloat16), "q")
    assert err.value.missing == {"qkv_proj": ["qkv_proj.weight[k]", "qkv_proj.weight[v]"]}


def test_lazy_slices_read_only_what_loaders_take(checkpoint_dir):
    """Through the lazy iterator the hook load reads each checkpoint byte exactly once."""
    weights = safetensors_weights(checkpoint_dir(SMALL))
    model = engine_model()
    with loadfsm.LoadSession(model, device="cpu"):
        model.load_weights(weights)
    total = sum(t.numel() * t.element_size() for _, t in
                ((n, s.read()) for n, s in safetensors_weights(checkpoint_dir(SMALL))))
    assert weights.bytes_read == total


@pytest.mark.parametrize("quant", [None, "fp8"], ids=["bf16", "fp8"])
def test_nan_written_by_the_engine_raises_naming_the_shard(quant):
    """NaN in one shard the engine's loader wrote raises NonFiniteWeightError naming it."""
    from loadfsm.testing import reference_state_dict
    state = reference_state_dict(SMALL)
    name = "model.layers.1.self_attn.v_proj.weight"
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")
    model = engine_model()
    with pytest.raises(loadfsm.NonFiniteWeightError, match=r"qkv_proj.weight\[v\]") as err:
        with loadfsm.LoadSession(model, quant=quant, device="cpu"):
            model.load_weights(state.items())
    assert err.value.layer == "model.layers.1.self_attn.qkv_proj"


class PartialWriteModel(nn.Module):
    """One parameter without shards whose loader is ``write(param, loaded_weight)``."""

    def __init__(self, write):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(8, 4, dtype=torch.bfloat16), requires_grad=False)
        self.weight.weight_loader = write


def _strided(param, w):
    param.data[::2].copy_(w[::2])


def _index_copy(param, w):
    param.data.index_copy_(0, torch.tensor([0, 2, 5]), w[[0, 2, 5]])


def _advanced(param, w):
    param.data[torch.tensor([1, 3, 7])] = w[[1, 3, 7]]


def _transposed_gap(param, w):
    param.data.t()[:, :6].copy_(w.t()[:, :6])
    param.data[7].copy_(w[7])


@pytest.mark.parametrize("write, rows", [
    (_strided, "dim 0 rows 1, 3, 5"), (_index_copy, "dim 0 rows 1, 3, 4"),
    (_advanced, "dim 0 rows 2, 4, 5, 6"), (_transposed_gap, "dim 0 rows 6"),
], ids=["strided-slice", "index_copy_", "advanced-index", "transpose-gap"])
def test_partial_write_is_refused_naming_the_rows(write, rows):
    """A loader writing only some rows (strided, indexed, transposed) raises ShardWriteError
    naming the parameter and the unwritten rows; the layer stays unloaded."""
    with torch.device("meta"):
        model = PartialWriteModel(write)
    param = model.weight
    with pytest.raises(loadfsm.ShardWriteError, match="unwritten") as err:
        with loadfsm.LoadSession(model, device="cpu") as session:
            param.weight_loader(param, torch.ones(8, 4, dtype=torch.bfloat16))
    assert err.value.param == "weight" and err.value.rows == rows
    assert session.plan.layers["<root>"].state is loadfsm.LayerState.META


def _permuted(param, w):
    order = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    param.data.index_copy_(0, order, w[order])


def _every_other_twice(param, w):
    param.data[::2] = w[::2]
    param.data[1::2] = w[1::2]


@pytest.mark.parametrize("write", [_permuted, _every_other_twice], ids=["index_copy_", "strided"])
def test_indexed_writes_covering_every_row_are_tracked_exactly(write):
    """Indexed or strided writes that do cover the whole parameter load it exactly."""
    with torch.device("meta"):
        model = PartialWriteModel(write)
    param = model.weight
    w = torch.arange(32, dtype=torch.bfloat16).reshape(8, 4)
    with loadfsm.LoadSession(model, device="cpu") as session:
        param.weight_loader(param, w)
    assert session.report.states["FINALIZED"] == 1 and not session.report.padded
    assert torch.equal(model.weight, w)


def _head_rows_stepped(param, w):
    param.data[0:6:2].copy_(w[0:6:2])
    param.data[1:6:2].copy_(w[1:6:2])


def test_padding_claimed_zero_filled_is_zero():
    """Rows past a gapless write are zero-filled (not allocator garbage), whatever the write."""
    with torch.device("meta"):
        model = PartialWriteModel(_head_rows_stepped)
    param = model.weight
    with loadfsm.LoadSession(model, device="cpu"):
        param.weight_loader(param, torch.ones(8, 4, dtype=torch.bfloat16))
    assert torch.equal(model.weight[:6], torch.ones(6, 4, dtype=torch.bfloat16))
    assert torch.equal(model.weight[6:], torch.zeros(2, 4, dtype=torch.bfloat16))


class GappedQKV(QKVParallelLinear):
    """Its q shard skips every other row through a stepped slice."""

    def weight_loader(self, param, loaded_weight, loaded_shard_id):
        if loaded_shard_id != "q":
            return super().weight_loader(param, loaded_weight, loaded_shard_id)
        param.data[0:self.q_size:2].copy_(loaded_weight[::2])


def test_shard_left_partly_unwritten_raises():
    """A fused shard written through a stepped slice names its unwritten rows."""
    with torch.device("meta"):
        model = FusedQKVEngineModel(GappedQKV)
    param = model.qkv_proj.weight
    with pytest.raises(loadfsm.ShardWriteError, match=r"dim 0 rows 1, 3, 5") as err:
        with loadfsm.LoadSession(model, device="cpu"):
            param.weight_loader(param, torch.ones(64, 64, dtype=torch.bfloat16), "q")
    assert (err.value.param, err.value.shard) == ("qkv_proj.weight", "q")


_ROW_WRITES = {
    "narrow": lambda p, w, r: p.data.narrow(0, r, 1).copy_(w[r:r + 1]),
    "index_copy_": lambda p, w, r: p.data.index_copy_(0, torch.tensor([r]), w[r:r + 1]),
    "advanced": lambda p, w, r: p.data.__setitem__(torch.tensor([r]), w[r:r + 1]),
    "transposed": lambda p, w, r: p.data.t()[:, r].copy_(w[r]),
    "masked_scatter_": lambda p, w, r: p.data.masked_scatter_(
        torch.arange(8)[:, None].expand(8, 4) == r, w[r]),
}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(_ROW_WRITES)), st.integers(0, 7)),
                min_size=1, max_size=10))
def test_any_mix_of_row_writes_is_accepted_iff_every_row_is_written(writes):
    """Random row writes by random methods: all 8 rows written loads them exactly (or as
    one gapless box, zero-pads the rest); any gap inside is refused naming it."""
    def write(param, w):
        for method, r in writes:
            _ROW_WRITES[method](param, w, r)

    with torch.device("meta"):
        model = PartialWriteModel(write)
    param = model.weight
    w = torch.arange(1, 33, dtype=torch.bfloat16).reshape(8, 4)
    rows = {r for _, r in writes}
    lo, hi = min(rows), max(rows)
    if rows != set(range(lo, hi + 1)):
        with pytest.raises(loadfsm.ShardWriteError, match="unwritten"):
            with loadfsm.LoadSession(model, device="cpu"):
                param.weight_loader(param, w)
        return
    with loadfsm.LoadSession(model, device="cpu"):
        param.weight_loader(param, w)
    expect = torch.zeros_like(w)
    expect[lo:hi + 1] = w[lo:hi + 1]
    assert torch.equal(model.weight, expect)
