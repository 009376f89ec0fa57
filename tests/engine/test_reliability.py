"""Reliability on real servers: fuzzed parameters, a faulty third-party plugin, concurrent load, a soak.

One server per engine for the whole module, with the deliberately faulty plugin
installed through the ``tts_plugins`` entry-point group and the debug counters
switched on. Sizes here keep CI short; ``benchmarks/reliability.py`` runs the
full sizes (1,000 fuzzed sets, 200 concurrent requests all compared, thousands
in the soak) and prints the figures.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

import reliability as rel

pytestmark = pytest.mark.engine

FUZZ_EXAMPLES = int(os.environ.get("TTS_FUZZ_EXAMPLES", "120"))


@pytest.fixture(scope="module")
def served(engines):
    srv = engines.shared_server("dense")  # the faulty plugin installed, debug counters on
    prefix = engines.debug_prefix
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(engines.tiny_model("dense")))
    return srv, tok, prefix


def test_the_faulty_plugin_is_discovered_through_its_entry_point(served):
    import requests

    srv, _, _ = served
    body = {"model": srv.model, "prompt": "Hi", "max_tokens": 2, rel.FIELD[srv.engine]: {"tts_faulty": "nowhere"}}
    bad = requests.post(srv.base + "/v1/completions", json=body, timeout=60)
    assert bad.status_code == 400 and "tts_faulty must be one of" in bad.text, "the server runs the third-party plugin's own validation"


def test_plugins_that_cannot_load_or_claim_a_builtin_key_are_logged_and_left_out(served):
    """Beside the faulty plugin, the server has a distribution (``tests/plugins/broken``) that declares a plugin whose
    module does not exist and one that claims the built-in ``tts_think_max``. The server started (the fixture),
    logged both as left out, and the built-in still owns the key: its own validation answers, and a capped request
    runs."""
    import requests

    srv, _, _ = served
    log = srv.log()
    assert "plugin 'missing' (tts_broken_no_such_module, from tts-broken-plugins) left out" in log, log[-3000:]
    assert "request key 'tts_think_max' is claimed by techniques 'think' and 'claims_think_max'" in log, log[-3000:]
    body = {"model": srv.model, "prompt": "Hi", "max_tokens": 4, rel.FIELD[srv.engine]: {"tts_think_max": -1}}
    bad = requests.post(srv.base + "/v1/completions", json=body, timeout=60)
    assert bad.status_code == 400 and "tts_think_max" in bad.text, bad.text
    body[rel.FIELD[srv.engine]] = {"tts_think_max": 2}
    assert requests.post(srv.base + "/v1/completions", json=body, timeout=60).status_code == 200


def test_fuzzed_parameters_get_4xx_naming_the_key_and_the_server_survives(served):
    srv, _, _ = served
    registry = rel.oracle()
    report = rel.FuzzReport()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(rel.param_sets())
    def one(case):
        params, certain = case
        rel.fuzz_once(srv, registry, params, certain, report)
        if report.tried % 40 == 0:
            assert rel.check_serving(srv), "the server stopped answering a normal request"

    one()
    print(f"\n[{srv.engine}] fuzz: tried {report.tried}, 4xx {report.rejected} ({report.engine_rejected} by the engine's own checks), "
          f"accepted {report.accepted}, non-standard JSON {report.non_json}")
    assert not report.failures, "\n".join(report.failures[:10])
    assert report.rejected >= report.tried // 3, "the strategy must produce mostly bad sets"
    assert rel.check_serving(srv) and srv.alive()


def test_a_faulty_technique_fails_only_its_own_requests(served):
    """The faulty plugin raises in apply, on tokens and at admission: those requests go on without it
    (equal to the same request without ``tts_faulty``), and the others are untouched."""
    srv, tok, _ = served
    prompt = rel.chat_prompt(tok, rel.QUESTIONS[1])
    cases = [
        {"tts_faulty": "apply", "tts_think_max": 3}, {"tts_think_max": 3}, {}, {"tts_faulty": "tokens", "tts_no_think": True},
        {"tts_no_think": True}, {"tts_faulty": "admit", "tts_think_max": 2}, {"tts_faulty": "apply"}, {"tts_moi_beta": 1.0, "tts_faulty": "apply"},
    ]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda p: rel.complete(srv, prompt, {"params": p, "n": 1, "temperature": 0.0}, 24), cases))
    for params, res in zip(cases, together):
        alone = rel.complete(srv, prompt, rel.without_faulty({"params": params, "n": 1, "temperature": 0.0}), 24)
        assert res["choices"][0]["text"] == alone["choices"][0]["text"], params
    # each failure point once more on its own, so its log line is certain to come from it
    for where, line in [("apply", "failed in apply"), ("tokens", "failed in on_tokens"), ("admit", "failed to start a request")]:
        before = srv.log().count(f"technique 'faulty' {line}")
        params = {"tts_faulty": where, "tts_think_max": 2}
        res = rel.complete(srv, prompt, {"params": params, "n": 1, "temperature": 0.0}, 12)
        alone = rel.complete(srv, prompt, rel.without_faulty({"params": params, "n": 1, "temperature": 0.0}), 12)
        assert res["choices"][0]["text"] == alone["choices"][0]["text"], params
        assert srv.log().count(f"technique 'faulty' {line}") == before + 1, f"no error logged for the failure in {where}"
    assert rel.check_serving(srv)


def test_concurrent_load_loses_nothing_and_leaves_no_state(served):
    srv, tok, prefix = served
    report = rel.run_load(srv, tok, n=200, compare=int(os.environ.get("TTS_LOAD_COMPARE", "40")), prefix=prefix)
    print(f"\n[{srv.engine}] load: sent {report.sent}, complete {report.complete}, lost {report.lost}, "
          f"compared {report.compared}, mismatches {len(report.mismatches)}, {report.seconds:.1f}s, peak {rel.live(report.peak)}")
    assert report.peak.get("slots", 0) > 0, "the counters never saw a live request: they would prove nothing"
    assert report.lost == 0 and report.complete == 200
    assert not report.mismatches, "\n".join(report.mismatches[:5])
    after = rel.settle_counts(srv, prefix, tok)
    assert after, "the debug counters were never written"
    assert rel.live(after) == {}, f"leftover per-request state: {rel.live(after)}"
    assert srv.alive()


def test_soak_state_does_not_grow(served):
    srv, tok, prefix = served
    n = int(os.environ.get("TTS_SOAK_REQUESTS", "400"))
    report = rel.run_soak(srv, tok, n=n, prefix=prefix)
    print(f"\n[{srv.engine}] soak: {report.sent} requests, {report.errors} errors, {report.seconds:.1f}s, peak {rel.live(report.peak)}")
    assert report.errors == 0
    assert rel.live(report.after) == {}, f"leftover per-request state after {n} requests: {rel.live(report.after)}"
    workers, n_max = 16, 3  # at most 16 requests in flight, a group request has 3 members
    assert all(v <= workers * n_max for k, v in rel.live(report.peak).items()), report.peak


def test_aborted_requests_leave_no_state(served):
    """Clients that hang up mid-stream: the server aborts those requests and frees their state."""
    srv, tok, prefix = served
    started = rel.run_aborts(srv, tok, n=24)
    assert started == 24
    import time

    time.sleep(2)  # the server notices the closed connections and aborts (finishing 24 x 900 tokens takes far longer)
    after = rel.settle_counts(srv, prefix, tok)
    assert rel.live(after) == {}, f"leftover per-request state after aborts: {rel.live(after)}"
    assert rel.check_serving(srv)
