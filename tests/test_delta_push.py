"""Delta pushes: only layers (block FP8: tiles) whose quantized bytes changed travel; the
engine ends bit for bit where a full push of the same weights puts it."""

import pytest
import torch
from torch import nn

import loadfsm
from loadfsm.quant.config import Fp8Config
from loadfsm.quant.push_fp8 import quantize_for_push
from loadfsm import DeltaPush, TileDelta, TilePatch, apply_tile_delta
from loadfsm.reload import tile_push
from loadfsm.reload.tiles import gather_tiles, put_tiles
from loadfsm.testing import build_model, load_reference_model, reference_state_dict
from loadfsm.testing.fp8_checkpoint import write_fp8_checkpoint
from checks import addresses, assert_same_tensors, same, snapshot
from tiny_models import SMALL, SMALL_MOE, FusedQKVModel

CONFIGS = {"tensor": Fp8Config(), "channel": Fp8Config(granularity="channel"),
           "block": Fp8Config(granularity="block")}
LAYOUT = {"tensor": "modelopt", "channel": "compressed-tensors", "block": "deepseek"}
DOWN0 = "model.layers.0.mlp.down_proj.weight"


def _online(config, quant):
    model = build_model(config)
    loadfsm.load(model, reference_state_dict(config, 0).items(), quant=quant, device="cpu")
    return model, loadfsm.WeightSync(model)


def _prequantized(tmp_path, quant, granularity):
    tensors = dict(quantize_for_push(load_reference_model(SMALL, seed=0), quant))
    path = write_fp8_checkpoint(tensors, tmp_path / "fp8", layout=LAYOUT[granularity])
    model = build_model(SMALL)
    loadfsm.load(model, path, quant=quant, device="cpu")
    return model, loadfsm.WeightSync(model)


def _nudge(trainer, name, scale=0.5):
    with torch.no_grad():
        dict(trainer.named_parameters())[name].mul_(scale)


def _one_ulp(trainer, name):
    """Move the smallest value of ``name`` by one bf16 ULP: its bf16 changes, its FP8 not."""
    with torch.no_grad():
        flat = dict(trainer.named_parameters())[name].view(-1)
        i = int(flat.abs().argmin())
        old = flat[i].clone()
        flat.view(torch.int16)[i] += 1
        assert not same(flat[i], old)


def _steps(trainer):
    """Three trainer updates: one layer scaled; a one-ULP change of a small value (its
    bf16 moves, its FP8 does not); two layers scaled."""
    yield lambda: _nudge(trainer, DOWN0)
    yield lambda: _one_ulp(trainer, "model.layers.1.mlp.gate_up_proj.weight")
    def two():
        _nudge(trainer, "model.layers.1.self_attn.o_proj.weight", 2.0)
        _nudge(trainer, "model.norm.weight", 1.5)
    yield two


@pytest.mark.parametrize("granularity", CONFIGS)
def test_online_delta_equals_full_push_and_skips_unchanged_layers(granularity):
    """Each step sends only the changed layers (none for a change FP8 cannot see) and
    leaves the engine bit-identical to one given full pushes; no address moves."""
    quant = CONFIGS[granularity]
    ours, sync = _online(SMALL, quant)
    full, full_sync = _online(SMALL, quant)
    where = addresses(ours)
    trainer = load_reference_model(SMALL, seed=1)
    delta = DeltaPush(quant, sync)
    delta.push(sync, trainer)
    first = delta.report
    assert first.layers_skipped == 0 and first.bytes_skipped == 0
    sent = []
    for step in _steps(trainer):
        step()
        delta.push(sync, trainer)
        full_sync.push(trainer.named_parameters())
        assert_same_tensors(snapshot(ours), snapshot(full))
        sent.append(delta.report)
    assert addresses(ours) == where
    assert [r.layers_sent for r in sent] == [1, 0, 2]
    assert all(r.bytes_skipped > 0 for r in sent)
    assert sent[1].bytes_sent == 0 and sent[1].layers_skipped == first.layers_sent


@pytest.mark.parametrize("granularity", CONFIGS)
def test_prequantized_delta_sends_fp8_of_changed_layers_only(tmp_path, granularity):
    """An engine loaded pre-quantized takes FP8 deltas; it equals a full pre-quantized push."""
    quant = CONFIGS[granularity]
    ours, sync = _prequantized(tmp_path, quant, granularity)
    full, full_sync = _prequantized(tmp_path, quant, granularity)
    trainer = load_reference_model(SMALL, seed=1)
    delta = DeltaPush(quant, sync, prequantized=True)
    delta.push(sync, trainer)
    sent = []
    for step in _steps(trainer):
        step()
        delta.push(sync, trainer)
        full_sync.push(quantize_for_push(trainer, quant))
        assert_same_tensors(snapshot(ours), snapshot(full))
        sent.append(delta.report.layers_sent)
    assert sent == [1, 0, 2]


def test_expert_change_sends_the_experts_layer():
    """One expert changed: its stacked-experts layer goes whole, every other layer stays."""
    quant = Fp8Config()
    ours, sync = _online(SMALL_MOE, quant)
    full, full_sync = _online(SMALL_MOE, quant)
    trainer = load_reference_model(SMALL_MOE, seed=1)
    delta = DeltaPush(quant, sync)
    delta.push(sync, trainer)
    _nudge(trainer, "model.layers.1.mlp.experts.gate_up_proj")
    items = delta(trainer)
    delta.commit()
    sync.push(items)
    full_sync.push(trainer.named_parameters())
    assert_same_tensors(snapshot(ours), snapshot(full))
    assert delta.report.layers_sent == 1
    assert {n.rpartition(".experts.")[0] for n, _ in items} == {"model.layers.1.mlp"}


def test_failed_push_makes_the_next_push_full():
    """After a push the engine refused, the trainer forgets what it sent: all goes again."""
    quant = Fp8Config()
    ours, sync = _online(SMALL, quant)
    trainer = load_reference_model(SMALL, seed=1)
    delta = DeltaPush(quant, sync)
    delta.push(sync, trainer)
    with torch.no_grad():
        dict(trainer.named_parameters())[DOWN0][0, 0] = float("nan")
    with pytest.raises(loadfsm.PushError):
        delta.push(sync, trainer)
    with torch.no_grad():
        dict(trainer.named_parameters())[DOWN0][0, 0] = 0.0
    delta.push(sync, trainer)
    assert delta.report.layers_skipped == 0
    fresh, fresh_sync = _online(SMALL, quant)
    fresh_sync.push(trainer.named_parameters())
    assert_same_tensors(snapshot(ours), snapshot(fresh))


# -- tile deltas ---------------------------------------------------------------------------
# 32x48 tiles: every row count of SMALL is whole tiles (fused q/k/v pieces too), every
# column count (64, 128) ends in a ragged tile.
BLOCK = Fp8Config(granularity="block", block_size=(32, 48))


def _online_block(config=SMALL):
    return _online(config, BLOCK)


def _prequantized_block(tmp_path, config=SMALL):
    tensors = dict(quantize_for_push(load_reference_model(config, seed=0), BLOCK))
    path = write_fp8_checkpoint(tensors, tmp_path / "fp8", layout="deepseek",
                                block_size=BLOCK.block_size)
    model = build_model(config)
    loadfsm.load(model, path, quant=BLOCK, device="cpu")
    return model, loadfsm.WeightSync(model)


def _fp8_weights(model):
    """Trainer parameters the engine holds in FP8 (its linears' and experts' weights)."""
    return {n: p for n, p in model.named_parameters()
            if n.endswith(("proj.weight", "gate_up_proj", "down_proj")) and "lm_head" not in n}


def _change_tiles(trainer, count, generator, block=BLOCK.block_size):
    """Scale ``count`` random tiles (any one can be ragged); a third of them only in one
    element, so that their scale may stay and only some bytes move."""
    weights = list(_fp8_weights(trainer).items())
    bn, bk = block
    with torch.no_grad():
        for _ in range(count):
            _, w = weights[int(torch.randint(len(weights), (1,), generator=generator))]
            at = [int(torch.randint(s, (1,), generator=generator)) for s in w.shape]
            *lead, r, c = at
            rows = slice(r // bn * bn, r // bn * bn + bn)
            cols = slice(c // bk * bk, c // bk * bk + bk)
            if int(torch.randint(3, (1,), generator=generator)) == 0:
                w[(*lead, r, c)] *= 1.5
            else:
                w[(*lead, rows, cols)] *= 1.25


def _tiles_changed(before, after, block=BLOCK.block_size):
    """Tiles whose FP8 bytes or scale differ between two engine snapshots, counted one
    by one (independent of the code under test)."""
    bn, bk = block
    count = 0
    for name, scale in _tile_scales(after).items():
        weight = name[:-len("_scale")]
        for at in torch.ones(scale.shape).nonzero().tolist():
            *lead, i, j = at
            region = (*lead, slice(i * bn, i * bn + bn), slice(j * bk, j * bk + bk))
            count += not (same(before[name][tuple(at)], scale[tuple(at)])
                          and same(before[weight][region], after[weight][region]))
    return count


def _tile_scales(state):
    """The block scales of an engine's FP8 weights (not its kv-cache scales)."""
    return {n: t for n, t in state.items()
            if n.endswith("_scale") and n[:-len("_scale")] in state and t.dim() >= 2}


@pytest.mark.parametrize("engine", ["online", "prequantized"])
def test_tile_delta_equals_full_push_after_random_tile_changes(tmp_path, engine):
    """Five steps of random tile changes: only the changed FP8 tiles travel, exactly as
    many as a full push changes, and the engine stays bit-identical to a full push."""
    if engine == "online":
        (ours, sync), (full, full_sync) = _online_block(), _online_block()
        push_full = lambda trainer: full_sync.push(trainer.named_parameters())
    else:
        (ours, sync), (full, full_sync) = (_prequantized_block(tmp_path / "a"),
                                           _prequantized_block(tmp_path / "b"))
        push_full = lambda trainer: full_sync.push(quantize_for_push(trainer, BLOCK))
    where = addresses(ours)
    trainer = load_reference_model(SMALL, seed=1)
    delta = DeltaPush(BLOCK, sync, prequantized=engine == "prequantized", tiles=True)
    delta.push(sync, trainer)
    push_full(trainer)
    assert delta.report.tiles_sent == 0 and delta.report.bytes_skipped == 0
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        _change_tiles(trainer, 4, generator)
        if step == 2:
            _nudge(trainer, "model.norm.weight", 1.5)           # a whole layer beside tiles
        before = snapshot(full)
        delta.push(sync, trainer, version=step)
        push_full(trainer)
        assert_same_tensors(snapshot(ours), snapshot(full))
        report = delta.report
        assert report.tiles_sent == _tiles_changed(before, snapshot(full)) > 0
        assert report.tensors_sent == report.layers_sent        # one patch (or norm) each
        assert 0 < report.bytes_sent < report.bytes_skipped
    assert addresses(ours) == where
    assert report.tiles_total == sum(s.numel() for s in _tile_scales(snapshot(ours)).values())


def test_tile_change_fp8_cannot_see_sends_nothing():
    """A one-ULP change of a value FP8 rounds to zero moves bf16 but no FP8 byte: that
    tile is not sent, alone or beside a real change in the same weight, and the engine
    stays exact."""
    ours, sync = _online_block()
    full, full_sync = _online_block()
    trainer = load_reference_model(SMALL, seed=1)
    down = dict(trainer.named_parameters())[DOWN0]              # [64, 128]: 2 x 3 tiles
    with torch.no_grad():
        down[40, 100] = 1e-30                                   # tile (1, 2); FP8: zero
    delta = DeltaPush(BLOCK, sync, tiles=True)
    delta.push(sync, trainer)

    def one_ulp():
        with torch.no_grad():
            down.view(torch.int16)[40, 100] += 1

    one_ulp()
    delta.push(sync, trainer)
    report = delta.report
    assert (report.tiles_sent, report.layers_sent, report.tensors_sent,
            report.bytes_sent) == (0, 0, 0, 0)
    one_ulp()
    with torch.no_grad():
        down[:32, :48] *= 2                                     # tile (0, 0): FP8 moves
    delta.push(sync, trainer)
    full_sync.push(trainer.named_parameters())
    assert_same_tensors(snapshot(ours), snapshot(full))
    assert (delta.report.tiles_sent, delta.report.layers_sent) == (1, 1)


def test_tile_delta_patches_stacked_experts():
    """One tile of one expert changed: a patch indexed (expert, tile row, tile col)."""
    ours, sync = _online_block(SMALL_MOE)
    full, full_sync = _online_block(SMALL_MOE)
    trainer = load_reference_model(SMALL_MOE, seed=1)
    delta = DeltaPush(BLOCK, sync, tiles=True)
    delta.push(sync, trainer)
    with torch.no_grad():
        down = dict(trainer.named_parameters())["model.layers.1.mlp.experts.down_proj"]
        down[2, 33:40, 50:] *= 2
    patches = delta(trainer).patches
    apply_tile_delta(sync, TileDelta(patches=patches))
    delta.commit()
    full_sync.push(trainer.named_parameters())
    assert_same_tensors(snapshot(ours), snapshot(full))
    assert [(p.layer, p.attr, p.index.tolist()) for p in patches] == [
        ("model.layers.1.mlp.experts", "down_proj", [[2, 1, 1]])]


class UnfusedQKVModel(nn.Module):
    """A trainer whose q, k and v are separate: each feeds rows of the engine's qkv_proj."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(64, 64, bias=False)
        self.k_proj = nn.Linear(64, 32, bias=False)
        self.v_proj = nn.Linear(64, 32, bias=False)


def test_tile_delta_maps_pieces_onto_the_fused_weight():
    """A trainer pushing q, k and v apart: their tiles land at their rows of qkv_proj."""
    trainer = UnfusedQKVModel().to(torch.bfloat16)
    engines = []
    for _ in range(2):
        engine = FusedQKVModel().to(torch.bfloat16)
        loadfsm.load(engine, trainer.named_parameters(), quant=BLOCK, device="cpu")
        engines.append((engine, loadfsm.WeightSync(engine)))
    (ours, sync), (full, full_sync) = engines
    delta = DeltaPush(BLOCK, sync, tiles=True)
    delta.push(sync, trainer)
    with torch.no_grad():
        trainer.q_proj.weight[:5] *= 2                          # q: tile row 0, both columns
        trainer.v_proj.weight[:, 50:] *= 3                      # v: rows 96..127, tile row 3
    delta.push(sync, trainer)
    full_sync.push(trainer.named_parameters())
    assert_same_tensors(snapshot(ours), snapshot(full))
    assert delta.report.tiles_sent == 3


@pytest.mark.parametrize("shape", [(70, 100), (3, 64, 96), (64, 96), (5, 7)],
                         ids=["ragged", "experts", "whole-tiles", "one-ragged-tile"])
def test_tiles_move_exactly_their_region(shape):
    """Tiles gathered and put back round-trip; a put writes each tile's own region and
    nothing past a ragged edge, whatever the sender put in the padding."""
    block = (32, 48) if len(shape) > 1 and shape[-1] > 7 else (4, 4)
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(shape, generator=generator).to(torch.float8_e4m3fn)
    target = torch.randn(shape, generator=generator).to(torch.float8_e4m3fn)
    grid = torch.ones(*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    index = grid.nonzero()[::2]
    tiles = gather_tiles(source, index, block)
    expected = target.clone()
    for at in index.tolist():
        *lead, i, j = at
        region = (*lead, slice(i * block[0], (i + 1) * block[0]),
                  slice(j * block[1], (j + 1) * block[1]))
        expected[region] = source[region]
    padded = torch.full((len(index), *block), 7.0).to(torch.float8_e4m3fn)
    for row, at in enumerate(index.tolist()):
        *_, i, j = at
        h = min(block[0], shape[-2] - i * block[0])
        w = min(block[1], shape[-1] - j * block[1])
        padded[row, :h, :w] = tiles[row, :h, :w]
    put_tiles(target, index, padded, block)
    assert same(target, expected)
    assert same(gather_tiles(target, index, block), tiles)


def _as_module(tensors):
    """A trainer whose ``named_parameters()`` are checkpoint names (one tensor per q, k, v
    and per expert's gate, up and down), as a transformers-style trainer pushes them."""
    root = nn.Module()
    for name, tensor in tensors.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=False))
    return root


def test_tile_delta_from_checkpoint_named_tensors():
    """Per-expert gate and up tensors and separate q, k, v: each tile lands in its expert
    and rows of the engine's stacked or fused weight."""
    ours, sync = _online_block(SMALL_MOE)
    full, full_sync = _online_block(SMALL_MOE)
    trainer = _as_module(reference_state_dict(SMALL_MOE, seed=1))
    delta = DeltaPush(BLOCK, sync, tiles=True)
    delta.push(sync, trainer)
    params = dict(trainer.named_parameters())
    with torch.no_grad():
        params["model.layers.1.mlp.experts.2.up_proj.weight"][40:, :10] *= 2
        params["model.layers.1.mlp.experts.1.down_proj.weight"][0, 0] *= 2
        params["model.layers.0.self_attn.k_proj.weight"][0, 60] *= 3   # k: rows 256..383
    patches = delta(trainer).patches
    apply_tile_delta(sync, TileDelta(patches=patches))
    delta.commit()
    full_sync.push(trainer.named_parameters())
    assert_same_tensors(snapshot(ours), snapshot(full))
    assert sorted((p.attr, p.index.tolist()) for p in patches) == [
        ("down_proj", [[1, 0, 0]]), ("gate_up_proj", [[2, 3, 0]]), ("weight", [[8, 1]])]


def test_tile_delta_for_a_remote_engine_from_its_model_class():
    """The engine's model class on meta gives the tiles' places, as its WeightSync does."""
    ours, sync = _online_block()
    full, full_sync = _online_block()
    trainer = load_reference_model(SMALL, seed=1)
    delta = DeltaPush(BLOCK, build_model(SMALL), tiles=True)
    apply_tile_delta(sync, delta(trainer))
    delta.commit()
    _change_tiles(trainer, 3, torch.Generator().manual_seed(1))
    apply_tile_delta(sync, delta(trainer))
    delta.commit()
    full_sync.push(trainer.named_parameters())
    assert_same_tensors(snapshot(ours), snapshot(full))
    assert delta.report.tiles_sent > 0


def test_tiles_need_block_fp8_and_the_engine_plan():
    """Per-tensor and per-channel FP8 keep whole layers; a name-to-layer function gives
    no tile places."""
    _, sync = _online(SMALL, CONFIGS["channel"])
    with pytest.raises(ValueError, match="block-FP8"):
        DeltaPush(CONFIGS["channel"], sync, tiles=True)
    with pytest.raises(ValueError, match="block-FP8"):
        DeltaPush(BLOCK, lambda name: name.rpartition(".")[0], tiles=True)


# -- tile deltas: faults --------------------------------------------------------------------
QKV1 = "model.layers.1.self_attn.qkv_proj"
EXPERTS1 = "model.layers.1.mlp.experts"


def _patch(layer, attr, index, *, fill=0.5, scale=0.01):
    index = torch.tensor(index)
    tiles = torch.full((len(index), *BLOCK.block_size), fill).to(torch.float8_e4m3fn)
    return TilePatch(layer, attr, index, tiles, torch.full((len(index),), scale))


def _nan_codes(patch):
    patch.tiles.view(torch.uint8)[0, 3, 7] = 0x7F
    return patch


BAD = {
    "nan-code": lambda: _nan_codes(_patch(EXPERTS1, "down_proj", [[0, 0, 0]])),
    "index-out-of-range": lambda: _patch(EXPERTS1, "down_proj", [[0, 2, 0]]),
    "negative-index": lambda: _patch(EXPERTS1, "down_proj", [[-1, 0, 0]]),
    "repeated-index": lambda: _patch(EXPERTS1, "down_proj", [[1, 0, 1], [1, 0, 1]]),
    "nan-scale": lambda: _patch(EXPERTS1, "down_proj", [[0, 0, 0]], scale=float("nan")),
    "zero-scale": lambda: _patch(EXPERTS1, "down_proj", [[0, 0, 0]], scale=0.0),
    "index-rank": lambda: _patch(EXPERTS1, "down_proj", [[0, 0]]),
    "not-fp8": lambda: _patch("model.norm", "weight", [[0, 0]]),
}
CAUSES = {"nan-code": loadfsm.NonFiniteWeightError, "nan-scale": loadfsm.NonFiniteWeightError,
          "zero-scale": loadfsm.InvalidScaleError, "not-fp8": loadfsm.UnexpectedWeightError}


@pytest.mark.parametrize("bad", BAD)
def test_bad_tile_patch_changes_nothing(bad):
    """A patch failing its checks, behind a good one of another layer, fails the push
    before any live byte changes: no layer is new, none is stamped."""
    ours, sync = _online_block(SMALL_MOE)
    before = snapshot(ours)
    delta = TileDelta(patches=[_patch(QKV1, "weight", [[1, 0]]), BAD[bad]()])
    with pytest.raises(loadfsm.PushError) as info:
        apply_tile_delta(sync, delta, version="v1")
    assert isinstance(info.value.__cause__, CAUSES.get(bad, loadfsm.ShapeMismatchError))
    assert info.value.committed == []
    assert_same_tensors(snapshot(ours), before)
    assert set(sync.layer_versions.values()) == {None}


def test_layer_patched_and_pushed_whole_is_refused():
    """A layer in both parts of a delta is refused before anything changes."""
    ours, sync = _online_block()
    before = snapshot(ours)
    trainer = load_reference_model(SMALL, seed=1)
    whole = [(f"{QKV1}.weight", dict(trainer.named_parameters())[f"{QKV1}.weight"])]
    with pytest.raises(loadfsm.PushError) as info:
        apply_tile_delta(sync, TileDelta(whole, [_patch(QKV1, "weight", [[0, 0]])]))
    assert isinstance(info.value.__cause__, loadfsm.DuplicateWeightError)
    assert_same_tensors(snapshot(ours), before)


class _FailingPut:
    """``put_tiles`` raising ``exc`` at its ``at``-th call (once), writing otherwise."""

    def __init__(self, at, exc):
        self.at, self.exc, self.calls = at, exc, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.at:
            raise self.exc
        return put_tiles(*args)


@pytest.mark.parametrize("exc", [RuntimeError("injected"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_exception_mid_layer_leaves_it_wholly_old(monkeypatch, exc):
    """The experts layer's second weight fails to write after its first was written: the
    layer is put back wholly old; the qkv layer before it committed and is stamped."""
    ours, sync = _online_block(SMALL_MOE)
    before = snapshot(ours)
    delta = TileDelta(patches=[_patch(QKV1, "weight", [[1, 0], [3, 1]]),
                               _patch(EXPERTS1, "gate_up_proj", [[3, 2, 1]]),
                               _patch(EXPERTS1, "down_proj", [[0, 1, 0]])])
    monkeypatch.setattr(tile_push, "put_tiles", _FailingPut(3, exc))
    with pytest.raises(type(exc) if isinstance(exc, KeyboardInterrupt)
                       else loadfsm.PushError) as info:
        apply_tile_delta(sync, delta, version="v1")
    if isinstance(info.value, loadfsm.PushError):
        assert info.value.committed == [QKV1]
    after = snapshot(ours)
    changed = {n for n in after if not same(after[n], before[n])}
    assert changed == {f"{QKV1}.weight", f"{QKV1}.weight_scale"}
    assert sync.layer_versions[QKV1] == "v1" and sync.layer_versions[EXPERTS1] is None
    monkeypatch.undo()
    apply_tile_delta(sync, delta, version="v2")                 # the retry goes through
    assert sync.layer_versions[EXPERTS1] == "v2"


def test_nan_in_a_trainer_tile_fails_and_the_next_push_is_full():
    """A NaN in one tile: the engine refuses the patch and keeps its weights; the trainer
    forgets what it sent, and the next push goes whole and exact."""
    ours, sync = _online_block()
    trainer = load_reference_model(SMALL, seed=1)
    delta = DeltaPush(BLOCK, sync, tiles=True)
    delta.push(sync, trainer)
    before = snapshot(ours)
    with torch.no_grad():
        dict(trainer.named_parameters())[DOWN0][40, 100] = float("nan")
    with pytest.raises(loadfsm.PushError) as info:
        delta.push(sync, trainer)
    assert isinstance(info.value.__cause__, loadfsm.NonFiniteWeightError)
    assert_same_tensors(snapshot(ours), before)
    with torch.no_grad():
        dict(trainer.named_parameters())[DOWN0][40, 100] = 0.0
    delta.push(sync, trainer)
    assert delta.report.layers_skipped == 0 and delta.report.tiles_sent == 0
    fresh, fresh_sync = _online_block()
    fresh_sync.push(trainer.named_parameters())
    assert_same_tensors(snapshot(ours), snapshot(fresh))


# -- tile deltas on CUDA ------------------------------------------------------------------
CUDA_CASES = {"tiny-128x128": ("tiny", Fp8Config(granularity="block")),
              "small-ragged": (SMALL, BLOCK)}


def _cuda_engine(config, quant):
    model = build_model(config)
    loadfsm.load(model, reference_state_dict(config, 0).items(), quant=quant, device="cuda")
    return model, loadfsm.WeightSync(model)


def _on_cpu(model):
    return {name: t.cpu() for name, t in snapshot(model).items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CUDA_CASES)
def test_tile_delta_on_cuda_equals_full_push(case):
    """On CUDA: random tile changes, trainer and engine on the device; every step sends
    exactly the tiles a full push changes and ends bit-identical to it, no address moved."""
    config, quant = CUDA_CASES[case]
    (ours, sync), (full, full_sync) = _cuda_engine(config, quant), _cuda_engine(config, quant)
    where = addresses(ours)
    trainer = load_reference_model(config, seed=1).to("cuda")
    delta = DeltaPush(quant, sync, tiles=True)
    delta.push(sync, trainer)
    full_sync.push(trainer.named_parameters())
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        _change_tiles(trainer, 6, generator, quant.block_size)
        before = _on_cpu(full)
        delta.push(sync, trainer)
        full_sync.push(trainer.named_parameters())
        after = _on_cpu(full)
        assert_same_tensors(_on_cpu(ours), after)
        assert delta.report.tiles_sent == _tiles_changed(before, after, quant.block_size) > 0
    assert addresses(ours) == where
