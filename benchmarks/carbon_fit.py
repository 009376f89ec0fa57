"""CarBoN's fit: how well it recovers a known calibration (T, sparse bias) from samples drawn from it.

Synthetic positions as in tests/test_carbon_fit.py (30-token vocabulary, random raw logits), sampled from
``softmax((z + b) / T)``; prints the relative error on T and the max error on the centered bias, per size.

    python benchmarks/carbon_fit.py [--seeds 5] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_carbon_fit  # noqa: E402
from test_carbon_fit import V, synthetic  # noqa: E402

from tts_plugins.client.calibration import fit_calibration  # noqa: E402


def one(t_true: float, bias_true: dict[int, float], n: int, seed: int) -> tuple[float, float]:
    test_carbon_fit.N = n
    cal = fit_calibration(synthetic(t_true, bias_true, seed), l2=1e-4)
    fitted = [cal.bias.get(i, 0.0) for i in range(V)]
    true = [bias_true.get(i, 0.0) for i in range(V)]
    fm, tm = sum(fitted) / V, sum(true) / V
    return abs(cal.temperature - t_true) / t_true, max(abs((f - fm) - (t - tm)) for f, t in zip(fitted, true))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 seeds")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.quick:
        a.seeds = 2
    rows = []
    for n in (500, 2000, 6000):
        for t_true in (0.6, 1.0, 1.8):
            errs = [one(t_true, {2: 1.5, 7: -1.0, 11: 0.5}, n, s) for s in range(a.seeds)]
            rows.append({"positions": n, "T": t_true, "T_rel_err_mean": statistics.mean(e[0] for e in errs), "T_rel_err_max": max(e[0] for e in errs),
                         "bias_err_mean": statistics.mean(e[1] for e in errs), "bias_err_max": max(e[1] for e in errs)})
            r = rows[-1]
            print(f"positions {n:5d}  T {t_true:.1f}:  T rel. error mean {r['T_rel_err_mean']:.3f} max {r['T_rel_err_max']:.3f};  "
                  f"bias error mean {r['bias_err_mean']:.3f} max {r['bias_err_max']:.3f}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
