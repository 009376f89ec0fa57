"""Batch state: vLLM V1 row add/remove/move/swap against a dict model."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tts_plugins.batch import RowMap, SlotState
from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.technique import EngineInfo, LogitsTechnique, SlotRequest

ROWS = 6


class Recorder(LogitsTechnique):
    """A technique that remembers which request owns each slot and what tokens it saw."""

    name = "recorder"
    keys = frozenset({"tts_rec"})

    @classmethod
    def parse_params(cls, flat):
        return flat.get("tts_rec")

    def __init__(self, info):
        super().__init__(info)
        self.owner: dict[int, int] = {}
        self.seen: dict[int, list[int]] = {}
        self.mark = torch.zeros(info.max_slots + 1)

    def set_slot(self, slot, params, request):
        self.owner.pop(slot, None)
        self.seen.pop(slot, None)
        self.mark[slot] = 0.0
        if params is not None:
            self.owner[slot] = params
            self.seen[slot] = []
            self.mark[slot] = float(params)

    def on_tokens(self, slot, token_ids):
        self.seen[slot].extend(token_ids)

    @property
    def num_active(self):
        return len(self.owner)

    def apply(self, logits, row_slots, host_slots=None):
        return logits + self.mark[row_slots][:, None]


class Plugin:
    from tts_plugins.hookspecs import hookimpl

    @hookimpl
    def tts_register_techniques(self, register):
        register(Recorder)


class RowMachine(RuleBasedStateMachine):
    """Model: row -> (request id, opted in?, live outputs). The real map must agree."""

    def __init__(self):
        super().__init__()
        reg = build_registry(plugin_manager(load_entry_points=False, extra_plugins=[Plugin()], builtin_techniques=False))
        self.info = EngineInfo(vocab_size=3, max_slots=ROWS, device=torch.device("cpu"))
        self.state = SlotState(reg, self.info)
        self.rows = RowMap(ROWS, self.info)
        self.model: dict[int, tuple[int, bool, list[int]]] = {}
        self.next_id = 1

    def _remove(self, row):
        self.state.release(self.rows.clear(row))
        self.model.pop(row, None)

    @rule(row=st.integers(0, ROWS - 1), opted=st.booleans(), prefix=st.lists(st.integers(0, 9), max_size=2))
    def add(self, row, opted, prefix):
        self._remove(row)  # vLLM may add over an index whose request left this step
        rid, self.next_id = self.next_id, self.next_id + 1
        outputs = list(prefix)  # a resumed request arrives with tokens already produced
        if opted:
            self.state.admit(self.rows.take(row), {"recorder": rid}, SlotRequest([1, 2]), outputs)
        self.model[row] = (rid, opted, outputs)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data):
        self._remove(data.draw(st.sampled_from(sorted(self.model))))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), dst=st.integers(0, ROWS - 1))
    def move(self, data, dst):
        """V1 condenses by moving a request onto the index of one that left (reported by the move alone)."""
        src = data.draw(st.sampled_from(sorted(self.model)))
        if dst == src:
            return
        self.state.release(self.rows.move(src, dst, swap=False))
        self.model.pop(dst, None)
        self.model[dst] = self.model.pop(src)

    @rule(a=st.integers(0, ROWS - 1), b=st.integers(0, ROWS - 1))
    def swap(self, a, b):
        if a == b:
            return
        self.rows.move(a, b, swap=True)
        ma, mb = self.model.pop(a, None), self.model.pop(b, None)
        if ma:
            self.model[b] = ma
        if mb:
            self.model[a] = mb

    @rule(tokens=st.lists(st.integers(0, 9), min_size=1, max_size=3))
    def decode_step(self, tokens):
        for _, _, outputs in self.model.values():
            outputs.extend(tokens)
        self.state.observe()

    @invariant()
    def rows_map_to_their_own_requests(self):
        rec = self.state.techniques[0]
        mapped = self.rows.mapped()
        assert set(mapped) == {r for r, (_, opted, _) in self.model.items() if opted}
        for row, slot in mapped.items():
            rid, _, outputs = self.model[row]
            assert rec.owner[slot] == rid
            assert rec.seen[slot] == outputs
        assert len(set(mapped.values())) == len(mapped), "two rows share a slot"
        assert self.state.num_active == len(mapped) == rec.num_active
        assert self.rows.slots.available + len(mapped) == ROWS, "every slot is either mapped or free: none leaks"

    @invariant()
    def apply_touches_only_opted_in_rows(self):
        logits = torch.zeros(ROWS, 3)
        out = self.state.apply(logits.clone(), self.rows.device_view(ROWS))
        for row in range(ROWS):
            entry = self.model.get(row)
            want = float(entry[0]) if entry and entry[1] else 0.0
            assert torch.all(out[row] == want), f"row {row}: {out[row].tolist()} != {want}"


TestRowMachine = RowMachine.TestCase


def test_nobody_opted_in_returns_the_same_tensor(dense_tokenizer):
    reg = build_registry(plugin_manager(load_entry_points=False))
    info = EngineInfo(vocab_size=len(dense_tokenizer), max_slots=4, device=torch.device("cpu"), tokenizer=dense_tokenizer)
    state, rows = SlotState(reg, info), RowMap(4, info)
    logits = torch.randn(4, info.vocab_size)
    before = logits.clone()
    assert state.apply(logits, rows.device_view(4)) is logits
    assert torch.equal(logits, before)
    # and once a request came and went, the technique is idle again
    state.admit(rows.take(1), reg.parse({"tts_think_max": 1}), SlotRequest([3]), [])
    state.release(rows.clear(1))
    assert state.apply(logits, rows.device_view(4)) is logits and torch.equal(logits, before)
