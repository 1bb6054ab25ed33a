"""Padded vocabularies are zero-filled; tied embeddings are loaded once into one storage."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from structlog.testing import capture_logs

import loadfsm
from loadfsm.testing import (CONFIGS, build_model, load_reference_model, reference_state_dict,
                            write_checkpoint)
from loadfsm.quant.linear import Fp8Linear

PADDED = CONFIGS["tiny-padded"]          # vocab 4000 held as 4032 rows
TIED = CONFIGS["tiny-tied"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
QUANTS = [None, "fp8", loadfsm.Fp8Config(granularity="channel", exclude=())]
QUANT_IDS = ["bf16", "fp8", "fp8ch-lm_head"]


def _load(config, source, quant=None, **kwargs):
    model = build_model(config)
    with capture_logs() as logs:
        report = loadfsm.load(model, source, quant=quant, device="cpu", trace=True, **kwargs)
    return model, report, logs


def _head_weight(model):
    """lm_head as bf16 rows, dequantized when FP8."""
    head = model.lm_head
    if isinstance(head, Fp8Linear):
        return head.weight.float() * head.weight_scale.float().reshape(-1, 1)
    return head.weight.detach()


# -- padding ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def padded_ckpt(tmp_path_factory):
    return write_checkpoint(PADDED, tmp_path_factory.mktemp("padded"))


@pytest.fixture
def garbage_memory(monkeypatch):
    """Every torch.empty returns NaN-filled (or 0x5A-filled) memory, as reused memory may hold."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else 0x5A)

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
def test_padding_rows_are_zero(padded_ckpt, quant):
    """Rows past the checkpoint's vocab in embed_tokens and lm_head are exactly zero."""
    model, report, _ = _load(PADDED, padded_ckpt, quant)
    assert report.states["FINALIZED"] == len(report.layer_states)
    V = PADDED.vocab_size
    assert model.model.embed_tokens.weight.shape[0] == PADDED.padded_vocab > V
    assert bool((model.model.embed_tokens.weight[V:] == 0).all())
    assert bool((_head_weight(model)[V:] == 0).all())


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
def test_padding_is_zero_filled_over_garbage_memory(padded_ckpt, garbage_memory, quant):
    """Padding stays zero when fresh allocations hold garbage: the zero-fill is explicit."""
    model, _, _ = _load(PADDED, padded_ckpt, quant)
    V = PADDED.vocab_size
    assert bool((model.model.embed_tokens.weight[V:] == 0).all())
    assert bool((_head_weight(model)[V:] == 0).all())


def test_real_rows_hold_the_checkpoint(padded_ckpt):
    """The first vocab_size rows equal the checkpoint tensors exactly."""
    model, _, _ = _load(PADDED, padded_ckpt)
    ref = reference_state_dict(PADDED)
    V = PADDED.vocab_size
    assert torch.equal(model.model.embed_tokens.weight[:V], ref[EMBED])
    assert torch.equal(model.lm_head.weight[:V], ref[HEAD])


def test_logits_equal_unpadded_reference(padded_ckpt):
    """A padded bf16 load gives the logits of the unpadded reference model."""
    model, _, _ = _load(PADDED, padded_ckpt)
    reference = load_reference_model(replace(PADDED, pad_vocab_to=1))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, PADDED.vocab_size, (2, 16), generator=gen)
    with torch.no_grad():
        got, want = model(tokens), reference(tokens)
    assert got.shape == want.shape == (2, 16, PADDED.vocab_size)
    assert torch.equal(got, want)


def test_layer_padded_event_names_the_tensors(padded_ckpt):
    """One layer_padded event per padded layer, naming its tensor; the report lists both."""
    _, report, logs = _load(PADDED, padded_ckpt)
    events = {e["layer"]: e["tensors"] for e in logs if e["event"] == "layer_padded"}
    assert events == {"model.embed_tokens": [EMBED], "lm_head": [HEAD]}
    assert sorted(report.padded) == sorted([EMBED, HEAD])


def test_unpadded_model_reports_no_padding(tmp_path):
    """A model whose tensors match the checkpoint exactly logs no layer_padded."""
    _, report, logs = _load("tiny", None, load_format="dummy")
    assert report.padded == [] and not [e for e in logs if e["event"] == "layer_padded"]


# -- tied weights ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tied_ckpts(tmp_path_factory):
    """tiny-tied checkpoints holding the embedding only, both names, or lm_head only."""
    root = tmp_path_factory.mktemp("tied")
    embed_only = write_checkpoint(TIED, root / "embed_only", index=False)
    state = reference_state_dict(TIED)
    both = root / "both.safetensors"
    save_file(state | {HEAD: state[EMBED].clone()}, str(both))
    head_only = root / "head_only.safetensors"
    save_file({(HEAD if k == EMBED else k): v for k, v in state.items()}, str(head_only))
    return {"embed_only": embed_only, "both": both, "head_only": head_only}


CASES = ["embed_only", "both", "head_only"]


def _arrivals(logs, *names):
    return [e["piece"] for e in logs if e["event"] == "layer_transition"
            and e["trigger"] == "arrive" and e["piece"] in names]


@pytest.mark.parametrize("case", CASES, ids=CASES)
@pytest.mark.parametrize("quant", [None, "fp8"], ids=["bf16", "fp8"])
def test_tied_weights_share_one_storage(tied_ckpts, case, quant):
    """After load lm_head.weight is the embedding Parameter itself: one storage."""
    model, report, _ = _load(TIED, tied_ckpts[case], quant)
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert head is embed and head.data_ptr() == embed.data_ptr()
    assert not embed.is_meta
    assert report.states["FINALIZED"] == len(report.layer_states)
    assert report.tied == {HEAD: EMBED}


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_tied_weight_holds_the_checkpoint_tensor(tied_ckpts, case):
    """Whichever name the checkpoint uses, the shared tensor holds its values."""
    model, _, _ = _load(TIED, tied_ckpts[case])
    assert torch.equal(model.lm_head.weight, reference_state_dict(TIED)[EMBED])


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_tied_piece_arrives_once(tied_ckpts, case):
    """The trace shows exactly one arrival for the shared tensor, under either name."""
    _, _, logs = _load(TIED, tied_ckpts[case])
    assert len(_arrivals(logs, EMBED, HEAD)) == 1
    assert _arrivals(logs, EMBED, HEAD) == [HEAD if case == "head_only" else EMBED]


@pytest.mark.parametrize("first", [EMBED, HEAD], ids=["embed_first", "head_first"])
def test_tied_iterator_with_both_names_arrives_once(first):
    """A user iterator yielding both names loads the first and skips the other, logged."""
    state = reference_state_dict(TIED)
    rest = [(k, v) for k, v in state.items() if k != EMBED]
    second = HEAD if first == EMBED else EMBED
    stream = [(first, state[EMBED]), (second, state[EMBED].clone())] + rest
    model, report, logs = _load(TIED, stream)
    assert _arrivals(logs, EMBED, HEAD) == [first]
    assert any(e["event"] == "tied_weight" and e.get("skipped") for e in logs)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert report.unexpected == [] and report.states["FINALIZED"] == len(report.layer_states)


def test_tied_weight_quantized_at_most_once(tied_ckpts):
    """With quant that covers lm_head, the shared tensor is one layer, quantized at most once."""
    config = loadfsm.Fp8Config(exclude=())
    model, _, logs = _load(TIED, tied_ckpts["both"], config)
    quantized = [e["layer"] for e in logs if e["event"] == "layer_transition"
                 and e["trigger"] == "quantize"]
    assert quantized.count("model.embed_tokens") == 1 and "lm_head" not in quantized
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_model_keeps_separate_tensors():
    """In an untied model embed_tokens and lm_head hold different storage and values."""
    model, report, _ = _load("tiny", None, load_format="dummy")
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert embed is not head and embed.data_ptr() != head.data_ptr()
    assert not torch.equal(embed, head) and report.tied == {}
