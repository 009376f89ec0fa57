"""CarBoN's fit recovers a known calibration from samples drawn from it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_plugins.client.calibration import Position, fit_calibration

V, N = 30, 6000  # about 200 draws per token: the max bias error over 30 tokens stays well inside B_TOL
T_TOL, B_TOL = 0.15, 0.35  # relative error on T; error on the (centered) bias, per unit of T
# (a bias error d moves the calibrated logits by d / T, so the data pin b down to within about T times the noise)


def synthetic(t_true: float, bias_true: dict[int, float], seed: int) -> list[Position]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    logp = torch.log_softmax(z, -1)
    b = torch.zeros(V, dtype=torch.float64)
    for i, v in bias_true.items():
        b[i] = v
    chosen = torch.multinomial(torch.softmax((logp + b) / t_true, -1), 1, generator=g).squeeze(1)
    return [Position(list(range(V)), logp[r].tolist(), int(chosen[r])) for r in range(N)]


@settings(max_examples=6, deadline=None, derandomize=True)  # statistical: fixed draws, stated tolerances
@given(st.floats(0.5, 2.5), st.lists(st.floats(-2, 2), min_size=3, max_size=3), st.integers(0, 10_000))
def test_recovers_a_known_temperature_and_bias(t_true, values, seed):
    bias_true = dict(zip((2, 7, 11), values))
    cal = fit_calibration(synthetic(t_true, bias_true, seed), l2=1e-4)
    assert abs(cal.temperature - t_true) / t_true < T_TOL, (cal.temperature, t_true)
    # a constant added to every token's bias changes nothing (softmax), so compare centered shifts
    fitted = [cal.bias.get(i, 0.0) for i in range(V)]
    true = [bias_true.get(i, 0.0) for i in range(V)]
    fm, tm = sum(fitted) / V, sum(true) / V
    err = max(abs((f - fm) - (t - tm)) for f, t in zip(fitted, true))
    assert err < B_TOL * max(1.0, t_true), (err, t_true)
    assert cal.nll_after <= cal.nll_before + 1e-9


def test_uncalibrated_samples_give_t_near_one_and_little_bias():
    cal = fit_calibration(synthetic(1.0, {}, 3), l2=1e-2)
    assert abs(cal.temperature - 1.0) < 0.1
    assert max((abs(v) for v in cal.bias.values()), default=0.0) < 0.3


def test_request_params_are_the_engine_keys():
    cal = fit_calibration(synthetic(1.3, {4: 1.0}, 5), l2=1e-3)
    keys = cal.request_params(max_bias=5)
    assert set(keys) == {"tts_carbon_temperature", "tts_carbon_bias_ids", "tts_carbon_bias_values"}
    assert len(keys["tts_carbon_bias_ids"]) == len(keys["tts_carbon_bias_values"]) <= 5
    from tts_plugins.logits_processors.carbon import CarbonParams

    assert CarbonParams.parse(keys).temperature == pytest.approx(cal.temperature)
    with pytest.raises(ValueError, match="at least one position"):
        fit_calibration([])
    assert math.isfinite(cal.nll_after)
