"""DeepConf online (``tts_conf_*``): the device kernel against a per-row float64 reference, the stop, the report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_plugins.logits_processors.conf import ConfParams, ConfStop, token_confidence, trace_statistics
from tts_plugins.services import parse_report, report_json
from tts_plugins.technique import EngineInfo, SlotRequest

VOCAB, SLOTS, EOS = 700, 6, 3


def tech(dtype_device: str = "cpu") -> ConfStop:
    return ConfStop(EngineInfo(vocab_size=VOCAB, max_slots=SLOTS, device=torch.device(dtype_device), eos_token_ids=(EOS,)))


def logits(gen: torch.Generator, rows: int, scale: float) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=gen) * scale


def report(t: ConfStop, slot: int) -> dict:
    values = t.report_values(np.array([slot]))[0]
    return ConfStop.report(dict(zip(ConfStop.report_fields, values)))


class Reference:
    """One trace, per row, in float64: token confidences, the windowed group confidence, the first stop."""

    def __init__(self, p: ConfParams) -> None:
        self.p, self.confs, self.stopped_at = p, [], None

    def step(self, row: torch.Tensor) -> bool:
        """Feed one step's logits; True when the trace is stopped at this step (its token must be EOS)."""
        if self.stopped_at is not None:
            return True
        self.confs.append(float(token_confidence(row.unsqueeze(0), self.p.topk)[0]))
        recent = self.confs[-self.p.window:]
        group = sum(recent) / len(recent)
        if self.p.threshold is not None and len(self.confs) >= self.p.min_tokens and group < self.p.threshold:
            self.stopped_at = len(self.confs)
            return True
        return False


def _params(w: int, k: int, thr: float | None, m: int | None) -> ConfParams:
    flat = {"tts_conf_window": w, "tts_conf_topk": k, "tts_conf_threshold": thr}
    return ConfParams.parse({**flat, "tts_conf_min_tokens": m} if m else flat)


params_st = st.builds(_params, st.integers(1, 9), st.integers(1, 25), st.one_of(st.none(), st.floats(1.5, 4.5)),
                      st.one_of(st.none(), st.integers(1, 12)))


@settings(max_examples=40, deadline=None)
@given(plans=st.lists(st.tuples(st.integers(0, SLOTS - 1), params_st, st.integers(1, 30)), min_size=1, max_size=6),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.5, 2.0, 4.0]))
def test_windowed_confidence_stop_and_report_equal_a_float64_reference(plans, seed, scale):
    """Traces of random lengths and windows run one after another in reused slots, beside a plain row and
    each other: every step's stop, and the reported statistics, equal the per-row float64 reference."""
    t, gen = tech(), torch.Generator().manual_seed(seed)
    live: dict[int, tuple[Reference, int]] = {}
    for slot, p, length in plans:  # each plan starts a trace in a slot (replacing what was there) and runs steps
        t.set_slot(slot, p, SlotRequest())
        live[slot] = (Reference(p), length)
        for _ in range(length):
            host = np.array([SLOTS, *sorted(live)], dtype=np.int64)  # the neutral slot's row first
            z = logits(gen, len(host), scale)
            out = t.apply(z.clone(), torch.from_numpy(host), host)
            assert torch.equal(out[0], z[0])  # a row that did not opt in is bit-identical
            for row, s in enumerate(host[1:], 1):
                ref, _ = live[int(s)]
                stop = ref.step(z[row])
                changed = (out[row] != z[row]).nonzero().flatten().tolist()
                assert changed == ([EOS] if stop else []), (row, ref.stopped_at, len(ref.confs))
                if stop:
                    assert int(out[row].argmax()) == EOS
        ref, _ = live[slot]
        got, want = report(t, slot), trace_statistics(ref.confs, p.window)
        assert got["tokens"] == len(ref.confs) and got["stopped"] == (ref.stopped_at is not None)
        assert math.isclose(got["lowest"], want["lowest"], rel_tol=1e-5, abs_tol=1e-5)
        assert math.isclose(got["mean"], want["mean"], rel_tol=1e-5, abs_tol=1e-5)
    for slot in list(live):
        t.set_slot(slot, None, SlotRequest())
    assert t.num_active == 0 and np.isnan(t.report_values(np.arange(SLOTS + 1))).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, SLOTS), steps=st.integers(1, 12), window=st.integers(1, 5))
def test_a_threshold_that_cannot_be_reached_changes_nothing(seed, rows, steps, window):
    """The lowest threshold there is (a confidence is never negative), or none: every row bit-identical."""
    gen = torch.Generator().manual_seed(seed)
    for flat in ({"tts_conf_threshold": -1e4, "tts_conf_window": window, "tts_conf_min_tokens": 1}, {"tts_conf_window": window}):
        t = tech()
        for s in range(rows):
            t.set_slot(s, ConfParams.parse(flat), SlotRequest())
        host = np.arange(rows, dtype=np.int64)
        for _ in range(steps):
            z = logits(gen, rows, 3.0)
            assert torch.equal(t.apply(z.clone(), torch.from_numpy(host), host), z)


def test_a_masked_eos_delays_the_stop_until_allowed():
    """The engine masked EOS (min_tokens): the stopped row is left alone, and stopped once EOS is allowed."""
    t = tech()
    t.set_slot(0, ConfParams.parse({"tts_conf_threshold": 1e4, "tts_conf_window": 1}), SlotRequest())
    host = np.zeros(1, dtype=np.int64)
    z = torch.randn(1, VOCAB)
    z[0, EOS] = float("-inf")
    assert torch.equal(t.apply(z.clone(), torch.from_numpy(host), host), z)
    z[0, EOS] = 0.0
    out = t.apply(z.clone(), torch.from_numpy(host), host)
    assert int(out[0].argmax()) == EOS
    assert report(t, 0)["stopped"] and report(t, 0)["tokens"] == 1  # the step after the stop is not judged


def test_bf16_rows_measure_and_stop_like_float32():
    """A flat row (low confidence: C near log V) is stopped, a peaked one (C large) is not, in both precisions."""
    t32, t16 = tech(), tech()
    p = ConfParams.parse({"tts_conf_threshold": 10.0, "tts_conf_window": 2, "tts_conf_min_tokens": 1})
    for t in (t32, t16):
        t.set_slot(2, p, SlotRequest())
        t.set_slot(4, p, SlotRequest())
    host = np.array([2, 4, SLOTS], dtype=np.int64)
    z = (torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1)) * 0.2).to(torch.bfloat16)
    z[1, :5] += 20.0  # peaked: the top-20 holds 15 tokens about 20 below the maximum, C about 16
    a = t32.apply(z.float().clone(), torch.from_numpy(host), host)
    b = t16.apply(z.clone(), torch.from_numpy(host), host)
    assert int(a[0].argmax()) == EOS == int(b[0].argmax())
    assert torch.equal(a[1], z[1].float()) and torch.equal(b[1:], z[1:])
    for slot in (2, 4):
        assert report(t32, slot)["stopped"] == report(t16, slot)["stopped"] == (slot == 2)
        assert math.isclose(report(t32, slot)["mean"], report(t16, slot)["mean"], rel_tol=1e-3)


@pytest.mark.parametrize("flat, key", [
    ({"tts_conf_window": 0}, "tts_conf_window"), ({"tts_conf_window": 10**6}, "tts_conf_window"),
    ({"tts_conf_topk": 0}, "tts_conf_topk"), ({"tts_conf_topk": 1000}, "tts_conf_topk"), ({"tts_conf_topk": 2.5}, "tts_conf_topk"),
    ({"tts_conf_threshold": "low"}, "tts_conf_threshold"), ({"tts_conf_threshold": float("nan")}, "tts_conf_threshold"),
    ({"tts_conf_min_tokens": -1}, "tts_conf_min_tokens"), ({"tts_conf_threshold": True}, "tts_conf_threshold"),
])
def test_bad_values_are_refused_naming_the_key(flat, key):
    with pytest.raises(ValueError, match=key):
        ConfParams.parse(flat)


def test_defaults_are_the_papers():
    p = ConfParams.parse({"tts_conf_threshold": 10.0})
    assert (p.window, p.topk, p.min_tokens) == (2048, 20, 2048)  # w = 2048, k = 20; judged on full windows
    assert ConfParams.parse({"tts_conf_window": 16}).min_tokens == 16 and ConfParams.parse({}) is None


def test_report_round_trip():
    reason = report_json({"conf": {"stopped": True, "tokens": 5, "lowest": 1.5, "mean": 2.0}}, 151645)
    assert parse_report(reason) == {"conf": {"stopped": True, "tokens": 5, "lowest": 1.5, "mean": 2.0}}
    assert parse_report(None) is None and parse_report("</answer>") is None and parse_report(7) is None


def test_a_step_past_the_end_is_not_reported():
    """An overlapping scheduler judges one more step before it knows the request ended: the report, given the
    request's token count, is the one of its last token."""
    t, gen = tech(), torch.Generator().manual_seed(3)
    p = ConfParams.parse({"tts_conf_window": 2, "tts_conf_topk": 4})
    t.set_slot(1, p, SlotRequest())
    host, confs = np.array([1]), []
    for _ in range(4):
        z = logits(gen, 1, 2.0)
        confs.append(float(token_confidence(z, 4)[0]))
        t.apply(z, torch.from_numpy(host), host)
    values = t.report_values(np.array([1]), np.array([3]))[0]
    got = ConfStop.report(dict(zip(ConfStop.report_fields, values)))
    want = trace_statistics(confs[:3], 2)
    assert got["tokens"] == 3 and math.isclose(got["lowest"], want["lowest"], rel_tol=1e-6)
    assert math.isclose(got["mean"], want["mean"], rel_tol=1e-6) and report(t, 1)["tokens"] == 4
