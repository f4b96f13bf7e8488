"""Shared by the benchmark scripts: makes `Implementation/` importable (so `python bench/X.py`
works without PYTHONPATH) and writes each script's JSON report."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "Implementation") not in sys.path:
    sys.path.insert(0, str(ROOT / "Implementation"))


def write_report(report: dict, out) -> dict:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report
