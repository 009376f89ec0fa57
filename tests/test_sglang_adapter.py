"""The SGLang adapter's step hooks without SGLang: a batch where nobody opted in costs O(1) per step."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest

from tts_plugins.adapters import sglang as adapter


class Req:
    def __init__(self, rid: str, custom: dict | None = None) -> None:
        self.rid = rid
        self.sampling_params = SimpleNamespace(custom_params=custom)
        self.done = False

    def finished(self) -> bool:
        return self.done


class CountingReqs(list):
    """A batch's request list that counts how often a hook walks it."""

    walks = 0

    def __iter__(self):
        CountingReqs.walks += 1
        return super().__iter__()


@pytest.fixture
def opted_in(monkeypatch):
    counter = adapter.OptedIn()
    monkeypatch.setattr(adapter, "OPTED_IN", counter)
    calls = []
    real = adapter._tts_params
    monkeypatch.setattr(adapter, "_tts_params", lambda r: calls.append(r) or real(r))
    CountingReqs.walks = 0
    return counter, calls


def step(reqs: list[Req]) -> SimpleNamespace:
    batch = SimpleNamespace(reqs=CountingReqs(reqs), forward_mode=SimpleNamespace(is_decode=lambda: True))
    return adapter._init_new_around(lambda cls, b, *a, **k: SimpleNamespace(), None, batch)


def test_a_step_where_nobody_opted_in_makes_no_per_request_call(opted_in):
    counter, calls = opted_in
    reqs = [Req(f"r{i}", {"other": 1} if i % 2 else None) for i in range(64)]
    for r in reqs:
        adapter._admitted_after(None, r)
    assert counter.count == 0
    calls.clear()
    fb = step(reqs)
    assert calls == [] and CountingReqs.walks == 0 and not hasattr(fb, "tts_plugins_rows")


def test_the_count_follows_admission_release_and_a_request_dropped_before_it_ran(opted_in):
    counter, calls = opted_in
    plain, mine, dropped = Req("a"), Req("b", {"tts_think_max": 4}), Req("c", {"tts_group": "g"})
    for req in (plain, mine, dropped):
        adapter._admitted_after(None, req)
    del req
    assert counter.count == 2
    fb = step([plain, mine])
    assert fb.tts_plugins_rows[0] == [plain, mine]  # while someone opted in, the batch remembers its requests
    adapter._release_after(None, mine)  # not finished (retracted): still counted
    assert counter.count == 2
    mine.done = True
    adapter._release_after(None, mine)
    adapter._release_after(None, mine)  # released twice: uncounted once
    assert counter.count == 1
    calls.clear()
    del dropped  # aborted in the queue: never released, uncounted when it goes away
    gc.collect()
    assert counter.count == 0
    calls.clear()
    CountingReqs.walks = 0
    step([plain, mine])
    assert calls == [] and CountingReqs.walks == 0


def test_a_future_sglang_whose_internals_moved_refuses_every_key(monkeypatch, caplog):
    """An SGLang outside the tested range: register() does not raise, logs what it leaves out, and the one hook it
    can still install (SamplingParams.verify, at admission) refuses every tts_* key naming the key and the version."""
    import functools
    import sys
    import types

    from tts_plugins import patching

    class Registry:
        def __init__(self):
            self.registered = []

        def register(self, target, hook, kind):
            self.registered.append((target, hook, kind))

    # a stand-in of SGLang 0.9.0 whose only module left in place is the sampling params
    for name in ("sglang", "sglang.srt", "sglang.srt.sampling"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    params_mod = types.ModuleType("sglang.srt.sampling.sampling_params")
    params_mod.SamplingParams = type("SamplingParams", (), {"verify": lambda self: None})
    monkeypatch.setitem(sys.modules, params_mod.__name__, params_mod)
    monkeypatch.setattr(patching, "engine_version", lambda engine: "0.9.0")
    registry = Registry()
    hooks = functools.partial(patching.sglang_hooks, registry=registry)
    with caplog.at_level("WARNING"):
        adapter._register(lambda reg, engine: None, hooks, patching.SGLANG_MIN_VERSION, patching.SGLANG_MAX_VERSION)
    assert [t for t, _, _ in registry.registered] == [adapter.TARGETS["verify"]], registry.registered
    assert "every request with a tts_* key gets a 400" in caplog.text
    _, refuse, _ = registry.registered[0]
    refuse(None, SimpleNamespace(custom_params={"other": 1}))  # a plain request passes
    with pytest.raises(ValueError, match=r"tts_think_max=3 is refused: .*SGLang 0\.9\.0"):
        refuse(None, SimpleNamespace(custom_params={"tts_think_max": 3}))


def test_register_never_raises(monkeypatch, caplog):
    """A failure while installing (here: the patches raise) is logged, never raised into the engine's start-up."""
    monkeypatch.setattr(adapter, "_register", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with caplog.at_level("ERROR"):
        adapter.register()
    assert "could not install the SGLang hooks" in caplog.text
