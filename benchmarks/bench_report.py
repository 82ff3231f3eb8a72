"""The ending every benchmark shares: its JSON report written under benchmarks/results/, then the RESULT line."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path | str, report: dict) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out


def result_line(name: str, ratio: float, target: float, passed: bool) -> str:
    return f"RESULT {name}: ratio={ratio:.4f} (target {target}) {'PASS' if passed else 'FAIL'}"
