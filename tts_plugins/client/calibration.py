"""CarBoN's fit: an input-specific temperature T and a sparse logit shift b from the kept samples.

Paper: "CarBoN: Calibrated Best-of-N Sampling" (arXiv 2510.15674; no public
code; reported). Phase 2 fits T and a shift so that the calibrated
distribution ``softmax((z + b) / T)`` raises the likelihood of the kept
(highest-reward) samples, with an L2 penalty ``lambda * ||b||^2`` on the shift.

Our choices, where the paper is not specific or not reachable from a client:

* ``z`` is what an OpenAI-compatible server returns: each position's top-k
  log-probabilities (raw, before temperature, in vLLM) plus the chosen token.
  The softmax is taken over that support, which is exact up to the mass
  outside the top-k.
* ``b`` lives in vocabulary space and only on tokens the kept samples chose
  (the paper shifts the final hidden state, ``b = W delta``); it is sparse, so
  it travels per request as ``tts_carbon_bias_ids`` / ``tts_carbon_bias_values``.
* T is parametrized as ``exp(s)`` (reported clamped to [0.05, 20]); the
  optimizer is L-BFGS on the exact negative log-likelihood.

The result is sent back with :meth:`Calibration.request_params`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Position:
    """One generated position: the candidate ids, their log-probabilities, and the token the sample chose."""

    ids: Sequence[int]
    logprobs: Sequence[float]
    chosen: int


@dataclass(frozen=True)
class Calibration:
    temperature: float
    bias: dict[int, float]
    nll_before: float
    nll_after: float

    def request_params(self, max_bias: int = 256) -> dict[str, object]:
        """The flat request keys of the in-engine technique (largest shifts first, at most ``max_bias``)."""
        top = sorted(self.bias.items(), key=lambda kv: -abs(kv[1]))[:max_bias]
        return {"tts_carbon_temperature": float(self.temperature), "tts_carbon_bias_ids": [int(i) for i, _ in top],
                "tts_carbon_bias_values": [float(v) for _, v in top]}


def fit_calibration(positions: Sequence[Position], l2: float = 1e-2, steps: int = 100, min_bias: float = 1e-3) -> Calibration:
    """Fit T and the sparse bias by maximum likelihood of the chosen tokens with an L2 penalty on b."""
    if not positions:
        raise ValueError("fit_calibration needs at least one position")
    vocab = sorted({i for p in positions for i in (*p.ids, p.chosen)})
    col = {t: j for j, t in enumerate(vocab)}
    k = max(len(p.ids) + 1 for p in positions)
    n = len(positions)
    ids = torch.zeros(n, k, dtype=torch.int64)
    z = torch.zeros((n, k), dtype=torch.float64)
    valid = torch.zeros((n, k), dtype=torch.bool)
    target = torch.zeros(n, dtype=torch.int64)
    for r, p in enumerate(positions):
        cand = list(p.ids)
        vals = list(p.logprobs)
        if p.chosen not in cand:  # a sample outside the returned top-k: give it the smallest seen log-prob
            cand.append(p.chosen)
            vals.append(min(vals) if vals else 0.0)
        ids[r, : len(cand)] = torch.tensor([col[c] for c in cand])
        z[r, : len(cand)] = torch.tensor(vals, dtype=torch.float64)
        valid[r, : len(cand)] = True
        target[r] = cand.index(p.chosen)
    chosen_cols = sorted({col[p.chosen] for p in positions})
    free = torch.zeros(len(vocab), dtype=torch.bool)
    free[chosen_cols] = True
    s = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(vocab), dtype=torch.float64, requires_grad=True)

    def nll(s_: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:
        t = s_.exp()
        # padding is masked after the arithmetic: -inf inside it would make the gradient in T NaN
        logits = ((z + (b_ * free)[ids]) / t).masked_fill(~valid, float("-inf"))
        return -torch.log_softmax(logits, dim=-1).gather(1, target.unsqueeze(1)).mean()

    with torch.no_grad():
        before = float(nll(torch.zeros(1, dtype=torch.float64), torch.zeros(len(vocab), dtype=torch.float64)))
    opt = torch.optim.LBFGS([s, b], lr=1.0, max_iter=steps, history_size=20, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll(s, b) + l2 * ((b * free) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        after = float(nll(s, b))
        t = float(s.exp())
        bias = {vocab[j]: float(b[j]) for j in chosen_cols if abs(float(b[j])) >= min_bias}
    return Calibration(temperature=min(max(t, 0.05), 20.0), bias=bias, nll_before=before, nll_after=after)
