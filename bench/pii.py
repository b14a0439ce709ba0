"""Precision and recall of each PII detector on the labelled sample the tests ship.

    .venv/bin/python -m bench.pii [tests/data/pii_sample.jsonl]

A finding counts as a true positive when its text equals a labelled value of its family;
prints a table and one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from workers.pii import KINDS, scan

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "pii_sample.jsonl"


def measure(path: Path = SAMPLE) -> dict[str, dict[str, float]]:
    """Per family: tp, fp, fn, precision and recall over the sample."""
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for line in path.read_text("utf-8").splitlines():
        item = json.loads(line)
        text = item["text"]
        expected = Counter((p["kind"], p["value"]) for p in item["pii"])
        found = Counter((f.kind, text[f.start : f.end]) for f in scan(text))
        for kind in KINDS:
            exp = Counter({k: n for k, n in expected.items() if k[0] == kind})
            got = Counter({k: n for k, n in found.items() if k[0] == kind})
            hits = sum((exp & got).values())
            tp[kind] += hits
            fp[kind] += sum(got.values()) - hits
            fn[kind] += sum(exp.values()) - hits
    return {
        kind: {
            "tp": tp[kind],
            "fp": fp[kind],
            "fn": fn[kind],
            "precision": tp[kind] / (tp[kind] + fp[kind]) if tp[kind] + fp[kind] else 1.0,
            "recall": tp[kind] / (tp[kind] + fn[kind]) if tp[kind] + fn[kind] else 1.0,
        }
        for kind in KINDS
    }


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else SAMPLE
    started = time.perf_counter()
    figures = measure(path)
    elapsed = time.perf_counter() - started
    lines = len(path.read_text("utf-8").splitlines())
    table = Table(title=f"PII detectors on {path.name} ({lines} lines, {elapsed * 1000:.0f} ms)")
    for column in ("family", "TP", "FP", "FN", "precision", "recall"):
        table.add_column(column, justify="left" if column == "family" else "right")
    for kind, f in figures.items():
        table.add_row(
            kind,
            str(f["tp"]),
            str(f["fp"]),
            str(f["fn"]),
            f"{f['precision']:.3f}",
            f"{f['recall']:.3f}",
        )
    Console().print(table)
    print(json.dumps({"bench": "pii", "lines": lines, "detectors": figures}))


if __name__ == "__main__":
    main()
