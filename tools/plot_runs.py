#!/usr/bin/env python3
"""Plot train_gpt.py runs (PNG): a metric against one swept knob, or validation curves.

    python3 tools/plot_runs.py knob TIMESTEP_CAP logs/ --metric final -o cap.png
    python3 tools/plot_runs.py curve logs/ --runs base_s1337,cap8_s1337 -o curves.png
    python3 tools/plot_runs.py eval-loops logs/ -o loops.png

`knob`: one point per value of the knob, the mean over seeds with their standard deviation as error
bars and each seed as a faint dot; one line per setting of the other knobs that differ. Values that
are not all numbers (e.g. `none`) are placed as categories. Runs without the metric are named on
stderr and left out of the plot. `curve`: validation bpb against step and against training time.
`eval-loops`: the artifact's val_bpb at each EVAL_LOOPS count, one line per configuration (seeds
grouped), and the same numbers printed as a Markdown table.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from runlogs import (METRICS, Run, RunLogError, differing_knobs, format_value, group_by_configuration,  # noqa: E402
                     load_runs, mean_std)


def knob_label(run: Run, knobs: list[str]) -> str:
    """A legend entry: the run's values of the knobs that tell the lines apart."""
    return ", ".join(f"{k.upper()}={format_value(run.knobs.get(k))}" for k in knobs) or "runs"


def x_positions(values: list) -> tuple[dict, Optional[list[str]]]:
    """Numeric values stand for themselves; otherwise categories in sorted order, `none` last."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return {v: v for v in values}, None
    ordered = sorted(set(values), key=lambda v: (v is None, str(v)))
    return {v: i for i, v in enumerate(ordered)}, [format_value(v) for v in ordered]


def plot_knob(runs: list[Run], knob: str, metric: str, out: str) -> None:
    name = knob.lower()
    if not any(name in r.knobs for r in runs):
        raise RunLogError(f"knob {knob}: not a hyperparameter of these runs")
    finished = [r for r in runs if r.metric(metric) is not None]
    for run in runs:
        if run.metric(metric) is None:
            print(f"plot_runs.py: left out {run.run_id}: no {metric} metric, {run.describe_unfinished()}", file=sys.stderr)
    if not finished:
        raise RunLogError(f"no run has the {metric} metric")
    others = [k for k in differing_knobs(finished) if k != name]
    positions, labels = x_positions([r.knobs.get(name) for r in finished])
    lines: dict[str, list[Run]] = {}
    for run in finished:
        label = knob_label(run, others)
        lines.setdefault(label, []).append(run)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, members in sorted(lines.items()):
        by_x: dict = {}
        for run in members:
            by_x.setdefault(positions[run.knobs.get(name)], []).append(run.metric(metric))
        xs = sorted(by_x)
        stats = [mean_std(by_x[x]) for x in xs]
        bar = ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=4, label=label)
        for x in xs:
            ax.scatter([x] * len(by_x[x]), by_x[x], color=bar[0].get_color(), alpha=0.3, s=12)
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(knob.upper())
    ax.set_ylabel(f"{metric} val_bpb (mean ± std over seeds)")
    seeds = sorted({r.seed for r in finished})
    ax.set_title(f"{metric} val_bpb vs {knob.upper()} ({len(finished)} runs, seeds {', '.join(map(str, seeds))})")
    if len(lines) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_curves(runs: list[Run], out: str) -> None:
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    plotted = 0
    for run in runs:
        curve = run.result.get("val_curve") or []
        if not curve:
            print(f"plot_runs.py: {run.run_id} has no validation points ({run.status})", file=sys.stderr)
            continue
        bpb = [p["val_bpb"] for p in curve]
        label = run.run_id if run.status == "completed" else f"{run.run_id} ({run.status})"
        by_step.plot([p["step"] for p in curve], bpb, marker=".", label=label)
        by_time.plot([p["train_time_ms"] / 1000 for p in curve], bpb, marker=".", label=label)
        plotted += 1
    if not plotted:
        raise RunLogError("none of the chosen runs has validation points (set VAL_LOSS_EVERY)")
    by_step.set_xlabel("step")
    by_time.set_xlabel("training time (s)")
    by_step.set_ylabel("val_bpb (pre-quantization, live weights)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_eval_loops(runs: list[Run], out: str, relative_to: Optional[int] = None) -> str:
    """val_bpb against the EVAL_LOOPS count, one line per configuration; returns the table it plots.

    With `relative_to`, each run's scores are taken minus its own score at that count, which removes
    the run-to-run offset (e.g. from the number of steps a wall-clock-capped run managed)."""
    groups = [g for g in group_by_configuration(runs) if g[0].loop_scores()]
    if not groups:
        raise RunLogError("no run has EVAL_LOOPS scores (quantized_loops{n} metrics)")
    if relative_to is not None and any(relative_to not in r.loop_scores() for g in groups for r in g):
        raise RunLogError(f"--relative-to {relative_to}: not among every run's EVAL_LOOPS counts")

    def scores(run: Run) -> dict[int, float]:
        base = 0.0 if relative_to is None else run.loop_scores()[relative_to]
        return {n: v - base for n, v in run.loop_scores().items()}

    knobs = differing_knobs([r for g in groups for r in g])
    counts = sorted({n for g in groups for r in g for n in r.loop_scores()})
    rows = ["| configuration | seeds | " + " | ".join(f"loops {n}" for n in counts) + " |",
            "|---|---|" + "---|" * len(counts)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group in groups:
        label = knob_label(group[0], knobs)
        stats = {}
        for n in counts:
            values = [scores(r)[n] for r in group if n in r.loop_scores()]
            if values:
                stats[n] = mean_std(values)
        xs = sorted(stats)
        ax.errorbar(xs, [stats[n][0] for n in xs], yerr=[stats[n][1] for n in xs], marker="o", capsize=4, label=label)
        sign = "+" if relative_to is not None else ""
        cells = [f"{stats[n][0]:{sign}.4f} ± {stats[n][1]:.4f}" if n in stats else "—" for n in counts]
        rows.append(f"| {label} | {','.join(str(r.seed) for r in group)} | " + " | ".join(cells) + " |")
    ax.set_xlabel("loop count at evaluation (extra passes of the band)")
    what = "post-quantization val_bpb" if relative_to is None else f"val_bpb minus the run's own at {relative_to}"
    ax.set_ylabel(f"{what} (mean ± std over seeds)", fontsize=9)
    ax.set_xticks(counts)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return "\n".join(rows) + "\n"


def select(runs: list[Run], ids: Optional[str]) -> list[Run]:
    if ids is None:
        return runs
    by_id = {r.run_id: r for r in runs}
    missing = [i for i in ids.split(",") if i not in by_id]
    if missing:
        raise RunLogError(f"--runs: no result for {', '.join(missing)} (found: {', '.join(sorted(by_id))})")
    return [by_id[i] for i in ids.split(",")]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    knob = sub.add_parser("knob", help="a metric against one knob, seeds as error bars")
    knob.add_argument("knob", help="environment variable name of the swept knob, e.g. TIMESTEP_CAP")
    knob.add_argument("--metric", choices=["final", *METRICS], default="final")
    curve = sub.add_parser("curve", help="validation bpb against step and training time")
    curve.add_argument("--runs", metavar="ID,ID", help="RUN_IDs to draw (default: every run found)")
    loops = sub.add_parser("eval-loops", help="val_bpb against the EVAL_LOOPS count, one line per configuration")
    loops.add_argument("--relative-to", type=int, metavar="N", help="plot each run's bpb minus its own at count N")
    for p in (knob, curve, loops):
        p.add_argument("paths", nargs="*", default=["logs"], help="result files or directories (default: logs)")
        p.add_argument("-o", "--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.paths)
        if args.command == "knob":
            plot_knob(runs, args.knob, args.metric, args.out)
        elif args.command == "curve":
            plot_curves(select(runs, args.runs), args.out)
        else:
            print(plot_eval_loops(runs, args.out, args.relative_to), end="")
    except RunLogError as exc:
        print(f"plot_runs.py: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
