#!/usr/bin/env python3
"""Summarize a sweep: one table of train_gpt.py runs, seeds of one configuration grouped as mean ± std.

Columns are the knobs that differ between the runs (as their environment variable names), then the
chosen metric, its delta to a baseline run's configuration, the other metrics, the submission bytes,
the steps and the training seconds. Rows are sorted by the chosen metric, lowest first. A run without
that metric (failed, still running, killed) gets a row of its own at the bottom with its status.

    python3 tools/summarize_runs.py logs/ --metric final --baseline base_s1337 --tsv sweep.tsv
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from runlogs import METRICS, Run, RunLogError, differing_knobs, format_value, group_by_configuration, load_runs, mean_std

METRIC_CHOICES = ["final", *METRICS]


def mean_or_none(values: list) -> Optional[float]:
    """The mean, or None when any run lacks the value."""
    return None if not values or None in values else mean_std(values)[0]


def group_row(group: list[Run], knobs: list[str], metric: str, status: Optional[str] = None) -> dict:
    """One table row for the seeds of a configuration (or for one unfinished run, with its status)."""
    scores = [run.metric(metric) for run in group]
    mean, std = (None, None) if None in scores else mean_std(scores)
    train_ms = [r.result.get("train_time_ms") for r in group]
    sizes = [r.result.get("total_bytes") for r in group]
    return {"knobs": {k: group[0].knobs.get(k) for k in knobs}, "code": group[0].code[:10],
            "run_ids": [r.run_id for r in group], "seeds": [r.seed for r in group],
            "mean": mean, "std": std, "delta": None,
            "status": status or "/".join(sorted({r.status for r in group})),
            **{name: mean_or_none([r.metric(name) for r in group]) for name in METRICS},
            "total_bytes": None if None in sizes else max(sizes),
            "steps": mean_or_none([r.result.get("steps") for r in group]),
            "train_s": None if None in train_ms else mean_std(train_ms)[0] / 1000}


def build_table(runs: list[Run], metric: str, baseline: Optional[str]) -> tuple[list[str], bool, list[dict]]:
    """(differing knobs, whether scripts differ, rows): grouped finished runs sorted, then unfinished runs."""
    knobs = differing_knobs(runs)
    finished = [r for r in runs if r.metric(metric) is not None]
    rows = sorted((group_row(g, knobs, metric) for g in group_by_configuration(finished)), key=lambda r: r["mean"])
    if baseline is not None:
        base = next((r for r in rows if baseline in r["run_ids"]), None)
        if base is None:
            known = ", ".join(r.run_id for r in finished)
            raise RunLogError(f"--baseline {baseline}: no finished run with that RUN_ID (finished: {known})")
        for row in rows:
            row["delta"] = row["mean"] - base["mean"]
    rows += [group_row([r], knobs, metric, r.describe_unfinished()) for r in runs if r.metric(metric) is None]
    return knobs, len({r.code for r in runs}) > 1, rows


def number(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(knobs: list[str], show_code: bool, rows: list[dict], metric: str) -> str:
    head = [k.upper() for k in knobs] + (["code"] if show_code else []) + \
        ["runs", "seeds", f"{metric} bpb (mean ± std)", "Δ baseline", *METRICS, "bytes", "steps", "train s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [format_value(row["knobs"][k]) for k in knobs] + ([row["code"]] if show_code else [])
        score = "—" if row["mean"] is None else f"{row['mean']:.5f} ± {row['std']:.5f}"
        delta = "—" if row["delta"] is None else f"{row['delta']:+.5f}"
        cells += [",".join(row["run_ids"]), ",".join(map(str, row["seeds"])), score, delta, *(number(row[m], 5) for m in METRICS),
                  format_value(row["total_bytes"]), number(row["steps"], 0), number(row["train_s"], 1), row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tsv(knobs: list[str], rows: list[dict], metric: str) -> str:
    head = [k.upper() for k in knobs] + ["code", "run_ids", "seeds", f"{metric}_mean", f"{metric}_std", "delta",
                                         *METRICS, "total_bytes", "steps", "train_s", "status"]
    lines = ["\t".join(head)]
    for row in rows:
        cells = [format_value(row["knobs"][k]) for k in knobs] + [row["code"], ",".join(row["run_ids"]),
                                                                  ",".join(map(str, row["seeds"]))]
        cells += ["" if row[k] is None else repr(row[k]) for k in ("mean", "std", "delta", *METRICS, "total_bytes")]
        cells += [number(row["steps"], 1), number(row["train_s"], 1), row["status"]]
        lines.append("\t".join(cells).replace("—", ""))
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["logs"],
                        help="result files, or directories searched for logs/*.json (default: logs)")
    parser.add_argument("--metric", choices=METRIC_CHOICES, default="final",
                        help="sort metric (final = TTT if run, else sliding, else post-quantization)")
    parser.add_argument("--baseline", metavar="RUN_ID", help="report each row's delta to this run's configuration")
    parser.add_argument("--markdown", metavar="FILE", help="also write the Markdown table here")
    parser.add_argument("--tsv", metavar="FILE", help="write the table as tab-separated values here")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.paths)
        knobs, show_code, rows = build_table(runs, args.metric, args.baseline)
    except RunLogError as exc:
        print(f"summarize_runs.py: {exc}", file=sys.stderr)
        return 2
    table = markdown(knobs, show_code, rows, args.metric)
    print(table, end="")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table)
    if args.tsv:
        with open(args.tsv, "w", encoding="utf-8") as f:
            f.write(tsv(knobs, rows, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
