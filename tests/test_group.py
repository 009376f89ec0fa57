"""Group early stop: group bookkeeping against a model, and the stop delivered in a decode loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tts_plugins.logits_processors.group import GroupParams, GroupStop
from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.technique import EngineInfo, SlotRequest

from sim import Request, Sim, random_model

REG = build_registry(plugin_manager(load_entry_points=False))


def test_group_params():
    assert REG.parse({"tts_group": "q1"})["group"] == GroupParams("q1")
    with pytest.raises(ValueError, match="tts_group_stop_after"):
        REG.parse({"tts_group": "q1", "tts_group_stop_after": 0})
    with pytest.raises(ValueError, match="tts_group_finish"):
        REG.parse({"tts_group": "q1", "tts_group_finish": "answer"})
    with pytest.raises(ValueError, match="tts_group"):
        REG.parse({"tts_group_stop_after": 2})
    with pytest.raises(ValueError, match="tts_group"):
        REG.parse({"tts_group": ""})


class GroupMachine(RuleBasedStateMachine):
    """Members join, finish, leave (finish or abort) in any order; the technique must agree with a model."""

    SLOTS = 6

    def __init__(self):
        super().__init__()
        from transformers import AutoTokenizer

        from models import tiny_model

        tok = AutoTokenizer.from_pretrained(str(tiny_model("dense")))
        self.eos = tok.eos_token_id
        self.tech = GroupStop(EngineInfo(vocab_size=len(tok), max_slots=self.SLOTS, device=torch.device("cpu"), tokenizer=tok,
                                         eos_token_ids=(self.eos,)))
        self.model: dict[int, dict] = {}  # slot -> {"group", "m", "finished"}

    def _group_state(self, gid):
        members = [s for s, v in self.model.items() if v["group"] == gid]
        finished = sum(self.model[s]["finished"] for s in members)
        return members, finished

    @rule(slot=st.integers(0, SLOTS - 1), gid=st.sampled_from(["a", "b"]), m=st.integers(1, 3))
    def join(self, slot, gid, m):
        if slot in self.model:
            return
        members, _ = self._group_state(gid)
        m_eff = self.model[members[0]]["m"] if members else m  # the group keeps the m it was created with
        self.tech.set_slot(slot, GroupParams(gid, stop_after=m, finish="eos"), SlotRequest([1]))
        self.model[slot] = {"group": gid, "m": m_eff, "finished": False, "stopped_at_join": False}

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def finish(self, data):
        slot = data.draw(st.sampled_from(sorted(self.model)))
        queue = list(self.tech.members[slot].queue)
        if queue:  # being stopped: it emits the forced tokens, ends with EOS, and the engine lets it go
            self.tech.on_tokens(slot, queue)
            assert self.tech.forced.np[slot] == -1 and not self.tech.members[slot].finished
            self.tech.set_slot(slot, None, SlotRequest())
            del self.model[slot]
            return
        self.tech.on_tokens(slot, [self.eos])
        self.model[slot]["finished"] = True

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def leave(self, data):
        slot = data.draw(st.sampled_from(sorted(self.model)))
        self.tech.set_slot(slot, None, SlotRequest())
        del self.model[slot]

    @invariant()
    def agrees_with_model(self):
        assert set(self.tech.members) == set(self.model)
        gids = {v["group"] for v in self.model.values()}
        assert set(self.tech.groups) == gids, "empty groups must be deleted, live ones kept"
        for slot, v in self.model.items():
            member = self.tech.members[slot]
            assert member.finished == v["finished"]
            g = member.group
            if g.stopped and not v["finished"]:
                assert member.queue, f"slot {slot} should be being stopped"
                assert self.tech.forced.np[slot] == member.queue[0]
        for slot in range(self.SLOTS + 1):
            if slot not in self.model:
                assert self.tech.forced.np[slot] == -1, "slots without a member force nothing"
        assert self.tech.forced.count == int((self.tech.forced.np >= 0).sum())


TestGroupMachine = GroupMachine.TestCase


@given(k=st.integers(2, 6), m=st.integers(1, 3), seed=st.integers(0, 500))
def test_first_m_to_finish_thinking_stop_the_rest(dense_tokenizer, k, m, seed):
    tok = dense_tokenizer
    sim = Sim(tok, max_slots=8)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    caps = [2 + 3 * i for i in range(k)]  # member i closes its thinking after caps[i] tokens
    reqs = [Request(prompt, {"tts_group": "g", "tts_group_stop_after": m, "tts_think_max": c}) for c in caps]
    banned = [i for i in range(len(tok)) if ">" in tok.decode([i])] + [tok.eos_token_id]
    outs = sim.run(reqs, random_model(len(tok), seed, banned=banned), 60)
    m = min(m, k)
    close = len(tok.encode("\n</think>", add_special_tokens=False))
    stop_step = caps[m - 1] + close  # the step at which the m-th member has closed its thinking
    for i, out in enumerate(outs):
        text = tok.decode(out, skip_special_tokens=False)
        if i < m:
            assert "</think>" in text and len(out) > stop_step, f"finished member {i} must go on answering"
        else:
            assert out[-1] == tok.eos_token_id and len(out) == stop_step + 1, f"member {i}: {len(out)} tokens, expected {stop_step + 1}"
    assert sim.state.num_active == 0


def test_groups_do_not_leak_into_each_other(dense_tokenizer):
    tok = dense_tokenizer
    sim = Sim(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    reqs = [
        Request(prompt, {"tts_group": "a", "tts_think_max": 1}),
        Request(prompt, {"tts_group": "a"}),
        Request(prompt, {"tts_group": "b"}),
        Request(prompt, {}),
    ]
    banned = [i for i in range(len(tok)) if ">" in tok.decode([i])] + [tok.eos_token_id]
    model = random_model(len(tok), 3, banned=banned)
    outs = sim.run(reqs, model, 20)
    assert outs[1][-1] == tok.eos_token_id and len(outs[1]) <= 5, "group a's other member is stopped"
    assert len(outs[2]) == 20 and len(outs[3]) == 20, "group b and plain requests are untouched"
    alone = Sim(tok).run([Request(prompt, {})] * 4, model, 20)
    assert outs[3] == alone[3]


def test_members_finishing_in_the_same_step_all_count(dense_tokenizer):
    tok = dense_tokenizer
    sim = Sim(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    reqs = [Request(prompt, {"tts_group": "g", "tts_think_max": 2}) for _ in range(3)] + [Request(prompt, {"tts_group": "g", "tts_think_max": 9})]
    banned = [i for i in range(len(tok)) if ">" in tok.decode([i])] + [tok.eos_token_id]
    outs = sim.run(reqs, random_model(len(tok), 4, banned=banned), 20)
    assert all(len(o) == 20 and "</think>" in tok.decode(o) for o in outs[:3]), "three members tied: all finished"
    assert outs[3][-1] == tok.eos_token_id and len(outs[3]) == 5


def _tech():
    from transformers import AutoTokenizer

    from models import tiny_model

    tok = AutoTokenizer.from_pretrained(str(tiny_model("dense")))
    return GroupStop(EngineInfo(vocab_size=len(tok), max_slots=4, device=torch.device("cpu"), tokenizer=tok, eos_token_ids=(tok.eos_token_id,))), tok


def _resume(tech, slot, params, history):
    """What the adapters do for a request re-added after a preemption: set_slot with its history, then feed it."""
    tech.set_slot(slot, params, SlotRequest([1], output_ids=tuple(history)))
    tech.on_tokens(slot, list(history))


def test_a_member_preempted_while_being_stopped_resumes_its_stop_where_it_was_cut():
    tech, tok = _tech()
    params = GroupParams("g", finish="eos", stop_text=" stop now")
    tech.set_slot(0, params, SlotRequest([1]))
    tech.set_slot(1, params, SlotRequest([1]))
    tech.on_tokens(1, [5, 6])
    tech.on_tokens(0, [5, tok.eos_token_id])  # slot 0 finishes: slot 1 is stopped
    seq = list(tech.members[1].queue)
    assert seq[-1] == tok.eos_token_id and len(seq) >= 2
    tech.on_tokens(1, seq[:1])  # one forced token delivered, then both leave (0 finished, 1 preempted)
    tech.set_slot(0, None, SlotRequest())
    tech.set_slot(1, None, SlotRequest())
    assert tech.debug_counts() == {"members": 0, "groups": 0}
    _resume(tech, 2, params, [5, 6, seq[0]])
    assert list(tech.members[2].queue) == seq[1:], "the resumed member must get the rest of its stop, not run free"
    tech.set_slot(2, None, SlotRequest())
    assert tech.debug_counts() == {"members": 0, "groups": 0}


def test_a_new_request_reusing_a_stopped_groups_id_starts_a_new_group():
    tech, tok = _tech()
    params = GroupParams("g", finish="eos")
    tech.set_slot(0, params, SlotRequest([1]))
    tech.set_slot(1, params, SlotRequest([1]))
    tech.on_tokens(0, [tok.eos_token_id])
    tech.set_slot(0, None, SlotRequest())
    tech.set_slot(1, None, SlotRequest())  # the stopped group empties
    tech.set_slot(2, params, SlotRequest([1]))  # a new request (no output yet) with that id
    assert not tech.members[2].queue and not tech.members[2].group.stopped
    tech.set_slot(2, None, SlotRequest())
    _resume(tech, 3, params, [5, 6])  # a later resumption does not inherit the forgotten stop
    assert not tech.members[3].group.stopped


def test_a_resumed_member_counts_its_history_once():
    tech, tok = _tech()
    params = GroupParams("g", stop_after=2, finish="eos")
    tech.set_slot(0, params, SlotRequest([1]))
    _resume(tech, 1, params, [5, 6, 7])  # joins with history: no finish in it
    assert tech.members[1].group.finished == 0 and not tech.members[1].finished
    tech.on_tokens(1, [8])  # new tokens after the history are seen as usual
    tech.on_tokens(0, [tok.eos_token_id])
    assert tech.members[0].group.finished == 1 and not tech.members[1].queue
    tech.on_tokens(1, [tok.eos_token_id])
    assert tech.members[1].group.finished == 2
