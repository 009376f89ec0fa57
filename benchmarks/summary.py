"""Summarize the JSON results of benchmarks/*.py: one table, and every missed target said plainly."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> int:
    misses = []
    for path in sorted(Path(folder).glob("*.json")):
        rows = json.loads(path.read_text())
        if isinstance(rows, dict):  # a report: its settings, then its rows
            print(f"\n{path.name}: " + "  ".join(f"{k}={v}" for k, v in rows.items() if k != "results"))
            rows = rows.get("results", [])
        print(f"\n{path.name}")
        for r in rows:
            fields = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items() if k not in ("vocab",)}
            print("  " + "  ".join(f"{k}={v}" for k, v in fields.items()))
            if r.get("meets_target") is False:
                misses.append((path.name, r))
    print(f"\n{len(misses)} missed target(s)")
    for name, r in misses:
        what = r.get("technique") or r.get("engine")
        value = r.get("ratio_to_copy", r.get("ratio"))
        print(f"  MISSED {name}: {what} {r.get('case')} batch={r.get('batch', '')} dtype={r.get('dtype', '')}: {value:.3f} vs target {r['target']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench-results"))
