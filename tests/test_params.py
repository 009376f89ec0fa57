"""Request parameters: parsed once, bad values named precisely."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tts_plugins.logits_processors.think import ThinkParams
from tts_plugins.manager import build_registry, plugin_manager

REG = build_registry(plugin_manager(load_entry_points=False))

INT_KEYS = ["tts_think_max", "tts_think_min", "tts_think_extend"]


def test_no_tts_keys_means_no_technique():
    assert REG.parse(None) == {}
    assert REG.parse({}) == {}
    assert REG.parse({"other_processor_key": 3}) == {}


def test_neutral_values_opt_out():
    assert REG.parse({"tts_think_min": 0}) == {}
    assert REG.parse({"tts_no_think": False}) == {}


def test_valid_request_parses_to_frozen_params():
    parsed = REG.parse({"tts_think_max": 10, "tts_think_min": 3, "tts_think_wait": "Hmm", "unrelated": 1})
    assert parsed == {"think": ThinkParams(max_tokens=10, min_tokens=3, wait="Hmm")}
    with pytest.raises(AttributeError):
        parsed["think"].max_tokens = 3  # type: ignore[misc]


def test_unknown_tts_key_is_an_error_naming_it():
    with pytest.raises(ValueError, match="tts_think_maxx"):
        REG.parse({"tts_think_maxx": 3})


@given(key=st.sampled_from(INT_KEYS),
       value=st.one_of(st.integers(max_value=-1), st.text(max_size=5), st.booleans(),
                       st.floats(allow_nan=True).filter(lambda f: not (math.isfinite(f) and f.is_integer() and f >= 0)),
                       st.lists(st.integers(), max_size=2)))
def test_bad_int_values_name_key_value_and_expectation(key, value):
    with pytest.raises(ValueError) as err:
        REG.parse({key: value})
    msg = str(err.value)
    assert key in msg and ("int" in msg), msg


@given(key=st.sampled_from(INT_KEYS), value=st.integers(min_value=2**31))
def test_huge_ints_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        REG.parse({key: value})


@given(value=st.one_of(st.integers(min_value=2), st.text(min_size=1, max_size=4).filter(lambda s: s.lower() not in ("true", "false")), st.floats()))
def test_bad_bool_is_named(value):
    with pytest.raises(ValueError, match="tts_no_think"):
        REG.parse({"tts_no_think": value})


@given(lo=st.integers(0, 1000), hi=st.integers(0, 1000))
def test_min_above_max_is_refused(lo, hi):
    flat = {"tts_think_min": lo, "tts_think_max": hi}
    if lo > hi:
        with pytest.raises(ValueError, match="tts_think_min"):
            REG.parse(flat)
    else:
        p = REG.parse(flat)["think"]
        assert (p.min_tokens, p.max_tokens) == (lo, hi)


@pytest.mark.parametrize(
    "flat, key",
    [
        ({"tts_think_max": 4, "tts_think_wait": ""}, "tts_think_wait"),
        ({"tts_think_max": 4, "tts_think_wait": 5}, "tts_think_wait"),
        ({"tts_think_max": 4, "tts_think_conclusion": "x" * 5000}, "tts_think_conclusion"),
        ({"tts_think_wait": "Hmm"}, "tts_think_wait"),
        ({"tts_no_think": True, "tts_think_min": 3}, "tts_no_think"),
        ({"tts_think_max": 3, "tts_no_think_text": "done"}, "tts_no_think_text"),
        ({"tts_think_max": 3, "tts_think_wait": "a\x00b"}, "tts_think_wait"),
        ({"tts_think_min": 3, "tts_think_wait": "ok</think>"}, "tts_think_wait"),
    ],
)
def test_bad_combinations_are_named(flat, key):
    with pytest.raises(ValueError, match=key):
        REG.parse(flat)


def test_integral_floats_and_stringified_bools_are_accepted():
    # JSON transports turn 5 into 5.0 and true into "true" more often than one would like.
    assert REG.parse({"tts_think_max": 5.0})["think"].max_tokens == 5
    assert REG.parse({"tts_no_think": "true"})["think"].no_think is True
    assert REG.parse({"tts_no_think": 1})["think"].no_think is True


def test_extra_args_must_be_a_mapping():
    with pytest.raises(ValueError, match="JSON object"):
        REG.parse(["tts_think_max"])  # type: ignore[arg-type]


def test_group_id_refuses_nul():
    """Found by the server fuzzer: text keys refused NUL, the group id did not."""
    import pytest

    from tts_plugins.logits_processors.group import GroupParams

    with pytest.raises(ValueError, match="tts_group"):
        GroupParams.parse({"tts_group": "a\x00b"})


def test_carbon_params():
    import pytest

    from tts_plugins.logits_processors.carbon import CarbonParams

    assert CarbonParams.parse({}) is None
    p = CarbonParams.parse({"tts_carbon_temperature": 0.8, "tts_carbon_bias_ids": [4, 2], "tts_carbon_bias_values": [1.5, -2]})
    assert p == CarbonParams(0.8, ((4, 1.5), (2, -2.0)))
    for bad, key in [
        ({"tts_carbon_temperature": 0}, "tts_carbon_temperature"),
        ({"tts_carbon_bias_ids": [1, 2], "tts_carbon_bias_values": [1.0]}, "tts_carbon_bias_values"),
        ({"tts_carbon_bias_ids": [1, 1], "tts_carbon_bias_values": [1.0, 2.0]}, "tts_carbon_bias_ids"),
        ({"tts_carbon_bias_ids": [-1], "tts_carbon_bias_values": [1.0]}, "tts_carbon_bias_ids"),
        ({"tts_carbon_bias_ids": [1], "tts_carbon_bias_values": [float("nan")]}, "tts_carbon_bias_values"),
        ({"tts_carbon_bias_ids": list(range(300)), "tts_carbon_bias_values": [0.0] * 300}, "tts_carbon_bias_ids"),
    ]:
        with pytest.raises(ValueError, match=key):
            CarbonParams.parse(bad)


def test_carbon_refuses_ids_outside_the_engine_vocabulary():
    import pytest
    import torch

    from tts_plugins.logits_processors.carbon import CarbonCalibration, CarbonParams
    from tts_plugins.technique import EngineInfo, SlotRequest

    tech = CarbonCalibration(EngineInfo(vocab_size=10, max_slots=2, device=torch.device("cpu")))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tech.set_slot(0, CarbonParams(1.0, ((12, 1.0),)), SlotRequest())
    assert tech.num_active == 0


def test_roe_tau_is_a_bounded_non_negative_float_and_zero_is_plain():
    from tts_plugins.logits_processors.roe import RoEParams

    assert RoEParams.parse({}) is None and RoEParams.parse({"tts_roe_tau": 0}) is None
    assert RoEParams.parse({"tts_roe_tau": 1.5}).tau == 1.5
    for bad in (-0.1, 100.5, float("nan"), "1", True, [1.0]):
        with pytest.raises(ValueError, match="tts_roe_tau must be a finite number >= 0 and <= 100"):
            RoEParams.parse({"tts_roe_tau": bad})


def test_roe_tau_layers_is_a_list_of_bounded_taus_one_per_moe_layer():
    from tts_plugins.logits_processors.roe import RoEParams

    p = RoEParams.parse({"tts_roe_tau_layers": [0, 2.5, 1]})
    assert p.layers == (0.0, 2.5, 1.0) and p.taus(3) == [0.0, 2.5, 1.0] and p.taus(2) is None
    assert RoEParams.parse({"tts_roe_tau_layers": [0, 0.0]}) is None, "all zero: the model's own routing"
    assert RoEParams.parse({"tts_roe_tau": 2.0}).taus(4) == [2.0] * 4
    assert RoEParams.parse({"tts_roe_tau_layers": [1.0]}).salt() != RoEParams.parse({"tts_roe_tau_layers": [2.0]}).salt()
    for bad, fragment in [([], "must be a list of 1 to"), ([1.0, -1.0], "must hold taus in"), ([float("nan")], "must hold taus in"),
                          ([True], "must hold taus in"), ("1.0", "must be a list"), ([101.0], "must hold taus in"), ([0.5] * 1025, "must be a list")]:
        with pytest.raises(ValueError, match=f"tts_roe_tau_layers {fragment}"):
            RoEParams.parse({"tts_roe_tau_layers": bad})
    with pytest.raises(ValueError, match="not both"):
        RoEParams.parse({"tts_roe_tau": 1.0, "tts_roe_tau_layers": [1.0]})


def test_a_group_stop_at_eos_is_refused_with_tools_that_may_be_called():
    from tts_plugins.admission import refuse_tools

    tools = [{"type": "function", "function": {"name": "add"}}]
    with pytest.raises(ValueError, match='tts_group_finish="eos" cannot be combined with tools'):
        refuse_tools({"tts_group": "g", "tts_group_finish": "eos"}, tools, "auto")
    refuse_tools({"tts_group": "g", "tts_group_finish": "eos"}, tools, "none")  # no call can be cut
    refuse_tools({"tts_group": "g", "tts_group_finish": "eos"}, None, "auto")
    refuse_tools({"tts_group": "g", "tts_think_max": 4}, tools, "auto")  # stops and caps land in the thinking
