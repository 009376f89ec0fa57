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
