"""Precision and recall of each PII detector on the labelled sample the tests ship, and
how fast the detectors scan (the cost a worker pays per job when a team's policy is on).

    .venv/bin/python -m bench.pii [tests/data/pii_sample.jsonl]

A finding counts as a true positive when its text equals a labelled value of its family;
prints a table and one JSON line. Scan speed is measured on the sample's text (dense with
PII) and on plain prose, each repeated to about 500 KB, best of 3 rounds; it is CPU-bound,
so other processes on the host slow it.
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


PROSE = (
    "Summarise the attached meeting notes for the team. Keep the decisions, the owners "
    "and the open questions; leave out the small talk and anything already agreed last week. "
)
"""Ordinary prompt text without personal data: what most jobs look like."""


def scan_speed(text: str, *, target_bytes: int = 500_000, rounds: int = 3) -> dict[str, float]:
    """MB/s of ``scan`` over ``text`` repeated to about ``target_bytes``, and µs per 2 KB."""
    corpus = text * max(1, target_bytes // max(1, len(text)))
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        scan(corpus)
        best = min(best, time.perf_counter() - started)
    prompt = (text * (1 + 2048 // max(1, len(text))))[:2048]
    started = time.perf_counter()
    for _ in range(200):
        scan(prompt)
    per_prompt = (time.perf_counter() - started) / 200
    return {"mb_per_s": len(corpus) / best / 1e6, "us_per_2kb_prompt": per_prompt * 1e6}


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
    sample_text = "\n".join(
        json.loads(line)["text"] for line in path.read_text("utf-8").splitlines()
    )
    speed = {"sample": scan_speed(sample_text), "prose": scan_speed(PROSE)}
    console = Console()
    console.print(table)
    for name, figure in speed.items():
        console.print(
            f"scan of {name}: {figure['mb_per_s']:.1f} MB/s, "
            f"{figure['us_per_2kb_prompt']:.0f} µs per 2 KB prompt"
        )
    print(json.dumps({"bench": "pii", "lines": lines, "detectors": figures, "scan": speed}))


if __name__ == "__main__":
    main()
