"""Delta pushes over torch.distributed (gloo on CPU, a trainer and two engines): layers and
FP8 tiles travel, the engines end bit for bit where full pushes put them, a fault leaves
uncommitted layers wholly old, and a delta onto weights it was not computed against is
refused."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loadfsm
from loadfsm import (DeltaPush, DeltaReceiver, DeltaReport, DeltaSender, Fp8Config,
                     PushNotTakenError, StaleDeltaError, TileDelta, TilePatch,
                     apply_tile_delta)
from loadfsm.reload.chain import SenderAbortedError
from loadfsm.reload.delta_wire import DeltaHead, encode_version
from loadfsm.quant.push_fp8 import quantize_for_push
from loadfsm.testing import build_model, load_reference_model, reference_state_dict
from loadfsm.testing.fp8_checkpoint import write_fp8_checkpoint
from checks import addresses, same, snapshot
from faults import raising_after
from tiny_models import SMALL, SMALL_MOE

RANKS = 3                        # a trainer and two engines
HANG = datetime.timedelta(minutes=5)   # a collective waiting this long fails, not hangs
BUCKET_BYTES = 16 << 10          # several buckets per push: the ring turns over mid-delta
# 32x48 tiles: SMALL's rows are whole tiles, its columns end in a ragged one.
BLOCK = Fp8Config(granularity="block", block_size=(32, 48))
# Whole layers a fault step changes beside tiles, in the order they travel: the embedding
# and lm_head are each a bucket of their own, the norms share one.
WHOLE = ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
         "model.layers.1.input_layernorm.weight", "lm_head.weight")
DOWN0 = "model.layers.0.mlp.down_proj.weight"
DOWN0_LAYER = "model.layers.0.mlp.down_proj"


def _engine(config, quant, checkpoint=None):
    """An engine loaded with online FP8, or from the FP8 ``checkpoint``."""
    model = build_model(config)
    source = checkpoint or reference_state_dict(config, 0).items()
    loadfsm.load(model, source, quant=quant, device="cpu")
    return model, loadfsm.WeightSync(model)


def _fp8_checkpoint(config, tmp):
    """Seed 0 quantized as the trainer would, saved as a DeepSeek-style block-FP8
    checkpoint (one per engine rank)."""
    tensors = dict(quantize_for_push(load_reference_model(config, seed=0), BLOCK))
    return write_fp8_checkpoint(tensors, f"{tmp}/fp8-{dist.get_rank()}", layout="deepseek",
                                block_size=BLOCK.block_size)


def _full_push_of(config, quant, path, checkpoint=None):
    """What a fresh engine holds after a full push of the trainer's saved parameters (in
    FP8, quantized as the trainer would, into an engine loaded from ``checkpoint``)."""
    model, sync = _engine(config, quant, checkpoint)
    saved = torch.load(path)
    if checkpoint is None:
        sync.push(saved.items())
    else:
        trainer = load_reference_model(config, seed=1)
        with torch.no_grad():
            for name, param in trainer.named_parameters():
                param.copy_(saved[name])
        sync.push(quantize_for_push(trainer, quant))
    return snapshot(model)


def _changed(model, before, committed=()):
    """Tensors of ``model`` that differ from ``before``, outside the layers ``committed``."""
    return [n for n, t in snapshot(model).items()
            if n.rpartition(".")[0] not in committed and not same(t, before[n])]


def _save(trainer, path):
    torch.save({n: p.detach().clone() for n, p in trainer.named_parameters()}, path)


def _fp8_weights(model):
    return [p for n, p in model.named_parameters()
            if n.endswith(("proj.weight", "gate_up_proj", "down_proj"))
            and "lm_head" not in n]


def _change_tiles(trainer, count, generator, block=BLOCK.block_size):
    """Scale ``count`` random tiles of the trainer's FP8-held weights."""
    weights, (bn, bk) = _fp8_weights(trainer), block
    with torch.no_grad():
        for _ in range(count):
            w = weights[int(torch.randint(len(weights), (1,), generator=generator))]
            *lead, r, c = [int(torch.randint(s, (1,), generator=generator)) for s in w.shape]
            w[(*lead, slice(r // bn * bn, r // bn * bn + bn),
               slice(c // bk * bk, c // bk * bk + bk))] *= 1.25


def _nudge(trainer, name, scale):
    with torch.no_grad():
        dict(trainer.named_parameters())[name].mul_(scale)


# -- exact over several steps -------------------------------------------------------------
# name: (model, engine's config, tiles, engine loaded from an FP8 checkpoint)
EXACT = {"tiles-dense": (SMALL, BLOCK, True, False),
         "tiles-moe": (SMALL_MOE, BLOCK, True, False),
         "tiles-prequantized": (SMALL, BLOCK, True, True),
         "layers": (SMALL, Fp8Config(), False, False)}
STEPS = 5


def _exact_trainer(name, tmp):
    config, quant, tiles, prequantized = EXACT[name]
    trainer = load_reference_model(config, seed=1)
    sender = DeltaSender(DeltaPush(quant, build_model(config), tiles=tiles,
                                   prequantized=prequantized), bucket_bytes=BUCKET_BYTES)
    generator = torch.Generator().manual_seed(0)
    reports = []
    for step in range(STEPS):
        if step in (1, 2, 3):
            if tiles:
                _change_tiles(trainer, 4, generator)
            else:
                _nudge(trainer, DOWN0, 0.5)
        if step == 2:        # whole layers beside tiles, over buckets enough to turn the
            for whole in ("model.embed_tokens.weight", "model.norm.weight",  # ring over
                          "lm_head.weight"):
                _nudge(trainer, whole, 1.5)
        _save(trainer, f"{tmp}/{name}{step}.pt")                # step 4: nothing changed
        reports.append(sender(trainer, version=step))
    return reports


def _exact_engine(name, tmp):
    config, quant, _, prequantized = EXACT[name]
    checkpoint = _fp8_checkpoint(config, tmp) if prequantized else None
    model, sync = _engine(config, quant, checkpoint)
    receiver = DeltaReceiver(sync)
    where = addresses(model)
    steps = []
    for step in range(STEPS):
        report = receiver.receive()
        expected = _full_push_of(config, quant, f"{tmp}/{name}{step}.pt", checkpoint)
        state = snapshot(model)
        steps.append({"mismatched": [n for n, t in state.items() if not same(t, expected[n])],
                      "version": (report.version, sync.version, dict(sync.layer_versions)),
                      "delta": receiver.report})
    steps[-1]["moved"] = [n for n, a in addresses(model).items() if a != where[n]]
    return steps


# -- faults: a sender raising mid-delta, an engine failing to apply -----------------------
class _BreaksOff:
    """The ``DeltaPush`` whose next delta's whole layers break off after ``n`` tensors."""

    def __init__(self, delta, n):
        self.delta, self.n = delta, n

    def __call__(self, model):
        tile_delta = self.delta(model)
        tile_delta.items = raising_after(tile_delta.items, self.n,
                                         RuntimeError("optimizer blew up"))
        return tile_delta

    def __getattr__(self, name):
        return getattr(self.delta, name)


def _faults_trainer(tmp):
    trainer = load_reference_model(SMALL, seed=1)
    delta = DeltaPush(BLOCK, build_model(SMALL), tiles=True)
    sender = DeltaSender(delta, bucket_bytes=BUCKET_BYTES)
    sender(trainer, version=0)
    out = {}
    # Raises mid-delta: tiles and four whole layers changed; the stream breaks off after
    # three whole layers, once the embedding's bucket went.
    _fault_step(trainer)
    sender.delta = _BreaksOff(delta, 3)
    with pytest.raises(RuntimeError, match="optimizer blew up"):
        sender(trainer, version=1)
    sender.delta = delta
    _save(trainer, f"{tmp}/faults1.pt")
    out["after_raise"] = sender(trainer, version=2)             # goes whole, exact
    # A NaN in one tile: the engine refuses it; the trainer hears so and goes whole next.
    with torch.no_grad():
        dict(trainer.named_parameters())[DOWN0][40, 100] = float("nan")
    with pytest.raises(PushNotTakenError, match="failed to apply"):
        sender(trainer, version=3)
    with torch.no_grad():
        dict(trainer.named_parameters())[DOWN0][40, 100] = 0.0
    _save(trainer, f"{tmp}/faults2.pt")
    out["after_nan"] = sender(trainer, version=4)
    return out


def _fault_step(trainer):
    _change_tiles(trainer, 4, torch.Generator().manual_seed(1))
    for name in WHOLE:
        _nudge(trainer, name, 1.5)


def _faults_engine(tmp):
    model, sync = _engine(SMALL, BLOCK)
    receiver = DeltaReceiver(sync)
    receiver.receive()
    before, out = snapshot(model), {}
    with pytest.raises(loadfsm.PushError) as info:
        receiver.receive()
    exc = info.value
    out["raised"] = {"cause": type(exc.__cause__), "layer": exc.layer,
                     "uncommitted_changed": _changed(model, before, exc.committed),
                     "holds": receiver.holds}
    receiver.receive()
    out["raise_wrong"] = _wrong(model, SMALL, BLOCK, f"{tmp}/faults1.pt")
    before = snapshot(model)
    with pytest.raises(loadfsm.PushError) as info:
        receiver.receive()
    out["nan"] = {"cause": type(info.value.__cause__), "layer": info.value.layer,
                  "changed": _changed(model, before)}
    receiver.receive()
    out["nan_wrong"] = _wrong(model, SMALL, BLOCK, f"{tmp}/faults2.pt")
    return out


def _wrong(model, config, quant, path):
    expected = _full_push_of(config, quant, path)
    return [n for n, t in snapshot(model).items() if not same(t, expected[n])]


# -- a delta onto the wrong base ----------------------------------------------------------
def _stale_trainer(tmp):
    trainer = load_reference_model(SMALL, seed=1)
    sender = DeltaSender(DeltaPush(BLOCK, build_model(SMALL), tiles=True),
                         bucket_bytes=BUCKET_BYTES)
    sender(trainer, version="v0")
    generator, out = torch.Generator().manual_seed(2), {"refused": []}
    for step in (1, 2):              # engine 2 took a push from elsewhere (failed in 2)
        _change_tiles(trainer, 3, generator)
        _save(trainer, f"{tmp}/stale{step}.pt")
        with pytest.raises(PushNotTakenError, match="refused the delta"):
            sender(trainer, version=f"v{step}")
        out["refused"].append(sender.report.tiles_sent)
        sender(trainer, version=f"v{step}-full")
        out[f"full{step}"] = sender.report
    return out


def _elsewhere(sync, step):
    """Step 1: a push from elsewhere; step 2: one that fails after committing layers,
    leaving ``sync.version`` as it was."""
    weights = list(load_reference_model(SMALL, seed=2 + step).named_parameters())
    if step == 1:
        sync.push(weights, version="elsewhere")
        return
    with torch.no_grad():
        weights[-1][1].fill_(float("nan"))
    version = sync.version
    with pytest.raises(loadfsm.PushError) as info:
        sync.push(weights, version="elsewhere-failed")
    assert info.value.committed and sync.version == version


def _stale_engine(tmp, rank):
    """Engine 2 takes pushes from elsewhere and refuses the deltas; engine 1 takes them."""
    model, sync = _engine(SMALL, BLOCK)
    sync.commit_bytes = 1                # every verified layer commits at once
    receiver = DeltaReceiver(sync)
    receiver.receive()
    out = {}
    for step in (1, 2):
        if rank == 1:
            receiver.receive()
            out[f"delta_wrong{step}"] = _wrong(model, SMALL, BLOCK, f"{tmp}/stale{step}.pt")
        else:
            _elsewhere(sync, step)
            before = snapshot(model)
            with pytest.raises(StaleDeltaError) as info:
                receiver.receive()
            out[f"refused{step}"] = {"message": str(info.value),
                                     "committed": info.value.committed,
                                     "changed": _changed(model, before)}
        receiver.receive()
        out[f"wrong{step}"] = _wrong(model, SMALL, BLOCK, f"{tmp}/stale{step}.pt")
    return out


def _worker(rank, tmp):
    """Rank 0 trains and sends; ranks 1 and 2 are engines."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=RANKS, timeout=HANG)
    try:
        out = {}
        for name in EXACT:
            out[name] = (_exact_trainer if rank == 0 else _exact_engine)(name, tmp)
        out["faults"] = (_faults_trainer if rank == 0 else _faults_engine)(tmp)
        out["stale"] = _stale_trainer(tmp) if rank == 0 else _stale_engine(tmp, rank)
        torch.save(out, f"{tmp}/out{rank}.pt")
        dist.barrier()
        open(f"{tmp}/done{rank}", "w").close()
    finally:
        dist.destroy_process_group()


def _spawn(worker, tmp, ranks):
    try:
        mp.spawn(worker, args=(str(tmp),), nprocs=ranks, join=True)
    except mp.ProcessExitedException:
        # gloo can abort a process while it tears down; benign once every rank finished.
        if not all((tmp / f"done{rank}").exists() for rank in range(ranks)):
            raise
    return [torch.load(tmp / f"out{rank}.pt", weights_only=False) for rank in range(ranks)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario in one set of processes (spawning costs seconds); each rank's
    records."""
    return _spawn(_worker, tmp_path_factory.mktemp("delta_transport"), RANKS)


ENGINES = range(1, RANKS)


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("rank", ENGINES)
def test_delta_over_gloo_equals_full_push_every_step(runs, name, rank):
    """Five steps (first full, then changed tiles or layers, whole layers beside them,
    nothing): after each, every engine equals a full push of the same weights, serves
    the trainer's version, and no address moved."""
    steps = runs[rank][name]
    assert all(step["mismatched"] == [] for step in steps)
    assert steps[-1]["moved"] == []
    for number, step in enumerate(steps):
        report_version, sync_version, layer_versions = step["version"]
        assert report_version == sync_version == number
        assert set(layer_versions.values()) <= set(range(number + 1))


@pytest.mark.parametrize("name", EXACT)
def test_delta_reports_bytes_skipped_on_both_sides(runs, name):
    """The trainer's report travels in the head: the engine sees the same bytes skipped;
    the first push skips nothing, later ones skip most, an unchanged step sends nothing."""
    trainer = runs[0][name]
    assert all(trainer == [step["delta"] for step in runs[rank][name]] for rank in ENGINES)
    first, *later, unchanged = trainer
    assert first.bytes_skipped == 0 and first.layers_skipped == 0
    assert all(0 < r.bytes_sent < r.bytes_skipped for r in later)
    assert unchanged.bytes_sent == 0 and unchanged.layers_sent == 0
    if EXACT[name][2]:
        assert all(r.tiles_sent > 0 for r in later)


@pytest.mark.parametrize("rank", ENGINES)
def test_sender_raising_mid_delta_leaves_uncommitted_layers_old(runs, rank):
    """The trainer raises after the embedding's bucket went: each engine rolls back what
    did not commit, names the layer, holds no known push; the next push is whole, exact."""
    raised = runs[rank]["faults"]["raised"]
    assert raised["cause"] is SenderAbortedError
    assert raised["layer"] == "model.embed_tokens"
    assert raised["uncommitted_changed"] == [] and raised["holds"] is None
    assert runs[rank]["faults"]["raise_wrong"] == []
    after = runs[0]["faults"]["after_raise"]
    assert after.layers_skipped == 0 and after.tiles_sent == 0


@pytest.mark.parametrize("rank", ENGINES)
def test_engine_failing_a_delta_makes_the_next_push_whole(runs, rank):
    """A NaN tile: the engines refuse it naming the layer and change nothing; the
    trainer learns it (PushNotTakenError) and its next push is whole and exact."""
    nan = runs[rank]["faults"]["nan"]
    assert nan["cause"] is loadfsm.NonFiniteWeightError and nan["layer"] == DOWN0_LAYER
    assert nan["changed"] == []
    assert runs[rank]["faults"]["nan_wrong"] == []
    assert runs[0]["faults"]["after_nan"].layers_skipped == 0


@pytest.mark.parametrize("step", [1, 2], ids=["pushed-elsewhere", "failed-push-elsewhere"])
def test_delta_onto_another_base_is_refused(runs, step):
    """An engine that took a push from elsewhere (one that failed midway too, its version
    unchanged) refuses a delta with StaleDeltaError before any byte changes, naming what
    it holds, while the other engine takes it; the trainer hears of the refusal and its
    next push is whole: both engines exact."""
    refused = runs[2]["stale"][f"refused{step}"]
    assert refused["changed"] == [] and refused["committed"] == []
    assert ("'elsewhere'" if step == 1 else "another push stamped") in refused["message"]
    assert runs[0]["stale"]["refused"][step - 1] > 0          # it was a tile delta
    assert runs[1]["stale"][f"delta_wrong{step}"] == []
    assert runs[1]["stale"][f"wrong{step}"] == runs[2]["stale"][f"wrong{step}"] == []
    full = runs[0]["stale"][f"full{step}"]
    assert full.layers_skipped == 0 and full.tiles_sent == 0


# -- a sender process dying mid-delta -----------------------------------------------------
class _Dies:
    """The ``DeltaPush`` whose next delta's process exits after ``n`` whole-layer tensors."""

    def __init__(self, delta, n):
        self.delta, self.n = delta, n

    def __call__(self, model):
        tile_delta = self.delta(model)
        items = list(tile_delta.items)

        def dying():
            yield from items[:self.n]
            os._exit(0)
        tile_delta.items = dying()
        return tile_delta

    def __getattr__(self, name):
        return getattr(self.delta, name)


def _dying_worker(rank, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=2, timeout=HANG)
    if rank == 0:
        trainer = load_reference_model(SMALL, seed=1)
        delta = DeltaPush(BLOCK, build_model(SMALL), tiles=True)
        sender = DeltaSender(delta, bucket_bytes=BUCKET_BYTES)
        sender(trainer, version=0)
        open(f"{tmp}/done0", "w").close()
        _fault_step(trainer)
        sender.delta = _Dies(delta, 4)      # once the embedding's bucket went
        sender(trainer, version=1)                   # never returns
    model, sync = _engine(SMALL, BLOCK)
    receiver = DeltaReceiver(sync)
    receiver.receive()
    before = snapshot(model)
    try:
        receiver.receive()
        out = {"raised": None}
    except loadfsm.LoadError as exc:
        out = {"raised": type(exc), "layer": exc.layer,
               "uncommitted_changed": _changed(model, before, exc.committed)}
    torch.save(out, f"{tmp}/out1.pt")
    torch.save({}, f"{tmp}/out0.pt")
    open(f"{tmp}/done1", "w").close()
    os._exit(0)                  # the group lost a rank: no teardown collective


def test_sender_dying_mid_delta_leaves_uncommitted_layers_old(tmp_path):
    """The trainer's process exits mid-delta: the engine raises SenderDiedError naming
    the layer in flight, and every layer it did not commit is wholly old."""
    died = _spawn(_dying_worker, tmp_path, 2)[1]
    assert died["raised"] is loadfsm.SenderDiedError
    assert died["layer"] == "model.embed_tokens"
    assert died["uncommitted_changed"] == []


# -- the head -----------------------------------------------------------------------------
def test_head_round_trips():
    """A delta head decodes to what was encoded: flags, ids, versions, the report."""
    report = DeltaReport(1, 2, 3, 4, 5, 6, 7)
    for base, version in ((None, 0), (-5, "step-é"), ("a", None)):
        head = DeltaHead(False, 123, (1 << 62) + 9, base, version, 4, report)
        assert DeltaHead.decode(head.tensor().numpy().tobytes()) == head


def test_versions_that_cannot_travel_are_refused_before_sending():
    """A version other than None, an int or a str cannot be compared on the engine."""
    with pytest.raises(TypeError):
        encode_version(1.5)
    with pytest.raises(ValueError):
        encode_version(1 << 64)


def test_streamed_whole_layer_of_a_patched_layer_is_refused():
    """Whole layers streamed into a tile delta (a transport's arrivals): a tensor of a
    patched layer is refused as it arrives, and the patch is never written."""
    model, sync = _engine(SMALL, BLOCK)
    before = snapshot(model)
    qkv = "model.layers.1.self_attn.qkv_proj"
    weight = dict(load_reference_model(SMALL, seed=1).named_parameters())[f"{qkv}.weight"]
    patch = TilePatch(qkv, "weight", torch.tensor([[0, 0]]),
                      torch.full((1, *BLOCK.block_size), 0.5).to(torch.float8_e4m3fn),
                      torch.full((1,), 0.01))
    with pytest.raises(loadfsm.PushError) as info:
        apply_tile_delta(sync, TileDelta(iter([(f"{qkv}.weight", weight)]), [patch]))
    assert isinstance(info.value.__cause__, loadfsm.DuplicateWeightError)
    assert info.value.layer == qkv
    after = snapshot(model)
    assert all(same(after[n], before[n]) for n in after)
