#!/usr/bin/env python3
"""Package the runs of one configuration (usually 3 seeds) as a records/ submission folder.

    python3 tools/package_record.py logs/ --name LoopedBirkhoff --author "Ada" --github-id ada \\
        --technique-summary "..." --record-bpb 1.0810 [--track 10min_16mb] [--with-packed]

Writes records/track_<TRACK>/<DATE>_<NAME>/ with the script exactly as run (checked against the
SHA-256 in the logs), optionally its packed form, the logs, requirements.txt, submission.json and a
README. Refuses runs from different scripts, runs whose knobs differ other than SEED/RUN_ID, repeated
seeds, and runs that did not finish. Every compliance field is computed from the logs.

Significance: with --record-bpb, a one-sided t-test over seeds of H0 "the improvement over the record
is at most 0.005 nats" (per token, converted from bpb with each run's own logged val_loss/val_bpb,
i.e. ln 2 x bytes per token); a record needs p < 0.01. The record track is refused without it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

from pack_code import is_packed, pack
from runlogs import METRICS, Run, RunLogError, differing_knobs, load_runs, mean_std

REPO = Path(__file__).resolve().parent.parent
TRACKS = ("10min_16mb", "non_record_16mb")
LIMIT_SECONDS = 600.0
LIMIT_BYTES = 16_000_000
MIN_IMPROVEMENT_NATS = 0.005
SIGNIFICANCE_LEVEL = 0.01
# train_gpt.py's SCORED_EVAL_PHASES (for logs without their own verdict; a phase a run did not log counts 0)
EVAL_PHASES = ("artifact_load_ms", "post_quant_eval_ms", "ngram_hint_ms", "sliding_eval_ms", "ttt_reload_ms",
               "ttt_eval_ms")
# Checks the record track needs passed outright: a run that did not record one is refused as if it failed.
REQUIRED_CHECKS = ("no_train_val_overlap",)


# --- checks ------------------------------------------------------------------------------------


def check_runs(runs: list[Run], script: Path) -> None:
    """One finished configuration of one script, each seed once, and that script is `script`."""
    unfinished = [f"{r.run_id}: {r.describe_unfinished()}" for r in runs if r.status not in ("completed", "over_budget")]
    if unfinished:
        raise RunLogError("runs that did not finish: " + "; ".join(unfinished))
    eval_only = [r.run_id for r in runs if r.result.get("eval_artifact")]
    if eval_only:  # no training, GPTQ or artifact size of their own: the record is the runs that made the file
        raise RunLogError("eval-only runs (EVAL_ARTIFACT) are not a submission; package the training runs: " +
                          ", ".join(eval_only))
    codes = {r.code for r in runs}
    if len(codes) > 1:
        raise RunLogError("the runs come from different scripts: " +
                          ", ".join(f"{r.run_id}={r.code[:12]}" for r in runs))
    knobs = differing_knobs(runs)
    if knobs:
        detail = "; ".join(f"{k.upper()}: " + ", ".join(f"{r.run_id}={r.knobs.get(k)}" for r in runs) for k in knobs)
        raise RunLogError(f"the runs differ in knobs other than SEED/RUN_ID: {detail}")
    seeds = [r.seed for r in runs]
    if len(set(seeds)) < len(seeds):
        raise RunLogError(f"a seed appears more than once: {sorted(seeds)}")
    digest = hashlib.sha256(script.read_bytes()).hexdigest()
    if digest not in codes:
        raise RunLogError(f"{script} (sha256 {digest[:12]}) is not the script the logs ran (sha256 {codes.pop()[:12]})")
    finals = {r.final_metric_name() for r in runs}
    if len(finals) > 1 or None in finals:
        raise RunLogError(f"the runs do not share a final metric: {sorted(map(str, finals))}")


def eval_seconds(run: Run) -> float:
    return sum(run.result["metrics"].get(k, 0) for k in EVAL_PHASES) / 1000


def train_seconds(run: Run) -> float:
    """Training plus GPTQ: both must happen inside the training budget."""
    return run.result.get("train_time_ms", 0) / 1000 + (run.result.get("gptq_total_s") or 0)


def no_train_val_overlap(runs: list[Run]) -> Optional[bool]:
    """Whether every run's data check found no val document among the training documents (None: not recorded)."""
    counts = [(r.result.get("data_check") or {}).get("overlap_docs") for r in runs]
    return None if None in counts else all(c == 0 for c in counts)


def failed_checks(checks: dict) -> list[str]:
    """The compliance checks that refuse the record track."""
    return [k if v is False else f"{k} (not recorded by every run)" for k, v in checks.items()
            if v is False or (v is None and k in REQUIRED_CHECKS)]


def own_verdict(run: Run, key: str, recomputed: bool) -> bool:
    """The run's own compliance verdict (train_gpt.py writes them), or the one recomputed from its log."""
    return (run.result.get("compliance") or {}).get(key, recomputed)


def compliance(runs: list[Run]) -> dict:
    ttt = all("ttt_val_bpb" in r.result["metrics"] for r in runs)
    return {
        "train_plus_gptq_under_600s": all(own_verdict(r, "train_plus_gptq_under_600s",
                                                      train_seconds(r) <= LIMIT_SECONDS) for r in runs),
        "artifact_under_16mb": all(own_verdict(r, "artifact_under_16mb",
                                               (r.result.get("total_bytes") or math.inf) <= LIMIT_BYTES) for r in runs),
        "eval_under_600s": all(own_verdict(r, "eval_under_600s", eval_seconds(r) <= LIMIT_SECONDS) for r in runs),
        "no_train_val_overlap": no_train_val_overlap(runs),
        # This script's TTT scores every chunk before it trains on it; null when TTT did not run.
        "score_first_ttt": True if ttt else None,
        "three_seeds": len(runs) >= 3,
        "same_script_and_config": True,
        "hardware_8xh100": all(r.result.get("world_size") == 8 and "H100" in r.result.get("device", "") for r in runs),
        "max_train_plus_gptq_s": round(max(train_seconds(r) for r in runs), 1),
        "max_eval_s": round(max(eval_seconds(r) for r in runs), 1),
        "max_total_bytes": max(r.result.get("total_bytes") or 0 for r in runs),
    }


# --- significance ------------------------------------------------------------------------------


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), by the continued fraction on whichever side of the mean it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * beta_continued_fraction(x, a, b) / a
    return 1.0 - front * beta_continued_fraction(1.0 - x, b, a) / b


def beta_continued_fraction(x: float, a: float, b: float) -> float:
    """Modified Lentz evaluation of the incomplete beta function's continued fraction."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def student_t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2, 0.5)
    return tail if t >= 0 else 1.0 - tail


def significance(runs: list[Run], metric: str, record_bpb: float) -> dict:
    """One-sided t-test of H0: mean improvement over the record <= MIN_IMPROVEMENT_NATS nats per token."""
    key = METRICS[metric]
    improvements = []
    for run in runs:
        m = run.result["metrics"]
        nats_per_bpb = m[key.replace("_bpb", "_loss")] / m[key]  # ln 2 x bytes per token of this evaluation
        improvements.append((record_bpb - m[key]) * nats_per_bpb)
    n = len(improvements)
    mean, std = mean_std(improvements)
    out = {"record_val_bpb": record_bpb, "threshold_nats": MIN_IMPROVEMENT_NATS, "level": SIGNIFICANCE_LEVEL,
           "improvement_nats_per_seed": improvements, "mean_improvement_nats": mean, "std_nats": std,
           "t": None, "df": n - 1, "p_value": None, "significant": False}
    if n < 2:
        return out
    excess = mean - MIN_IMPROVEMENT_NATS
    if std == 0:  # identical seeds: no spread to test against
        out.update(p_value=0.0 if excess > 0 else 1.0, significant=excess > 0)
        return out
    t = excess / (std / math.sqrt(n))
    p = student_t_sf(t, n - 1)
    out.update(t=t, p_value=p, significant=p < SIGNIFICANCE_LEVEL)
    return out


def verdict(sig: dict) -> str:
    head = (f"vs record {sig['record_val_bpb']:.5f}: mean improvement {sig['mean_improvement_nats']:.5f} nats "
            f"(std {sig['std_nats']:.5f}, {sig['df'] + 1} seeds); H0 improvement <= {MIN_IMPROVEMENT_NATS} nats: ")
    if sig["p_value"] is None:
        return head + "no t-test with one seed -> NOT a record"
    t = "no spread" if sig["t"] is None else f"t = {sig['t']:.3f}"
    test = f"{t}, df = {sig['df']}, one-sided p = {sig['p_value']:.3g}"
    if sig["significant"]:
        return head + test + f" -> significant record (p < {SIGNIFICANCE_LEVEL})"
    return head + test + f" -> NOT a record (needs p < {SIGNIFICANCE_LEVEL})"


# --- folder ------------------------------------------------------------------------------------


def import_script(script: Path, name: str):
    """A script imported as module `name` (not run: its main() stays uncalled)."""
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def script_defaults(script: Path) -> dict:
    """The recorded script's own knob defaults."""
    module = import_script(script, "recorded_train_gpt")
    return {f.name: f.default for f in dataclasses.fields(module.Hyperparameters)}


def env_value(value) -> str:
    """A knob value as its environment variable is written."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):  # LOOP_SAMPLE's counts, or TRAIN_SEQ_SCHEDULE's LENGTH@FRACTION pairs
        return ",".join("@".join(map(str, item)) if isinstance(item, (list, tuple)) else str(item) for item in value)
    return str(int(value)) if isinstance(value, bool) else str(value)


def reproduction_command(run: Run, defaults: dict) -> str:
    changed = [f"{k.upper()}={env_value(v)}" for k, v in run.knobs.items()
               if json.dumps(defaults.get(k)) != json.dumps(v)]
    return " ".join(changed + ["SEED=<seed>", f"torchrun --standalone --nproc_per_node={run.result['world_size']}",
                               "train_gpt.py"])


def submission(args, runs: list[Run], metric: str, checks: dict, sig: Optional[dict]) -> dict:
    scores = [r.metric(metric) for r in runs]
    mean, std = mean_std(scores)
    first = runs[0].result
    return {
        "author": args.author, "github_id": args.github_id, "name": args.name, "date": args.date,
        "track": f"track_{args.track}", "val_bpb": mean, "val_bpb_std": std, "metric": METRICS[metric],
        "seeds": [r.seed for r in runs],
        "seed_results": {str(r.seed): {"val_bpb": r.metric(metric), "artifact_bytes": r.result.get("total_bytes")}
                         for r in runs},
        "hardware": f"{first['world_size']}x {first['device']}", "pytorch_version": first["torch_version"],
        "technique_summary": args.technique_summary, "code_sha256": runs[0].code, "code_bytes": first["code_bytes"],
        "code_method": first.get("code_method", "file (log predates code_method)"),
        "compliance": checks, "significance": sig,
    }


def readme(sub: dict, runs: list[Run], command: str, sig_line: str, packed_bytes: Optional[int]) -> str:
    lines = [f"# {sub['name']}", "", sub["technique_summary"], "",
             f"{sub['track']}, {sub['date']}, {sub['hardware']}, PyTorch {sub['pytorch_version']}. "
             f"Score: **{sub['metric']} {sub['val_bpb']:.5f} ± {sub['val_bpb_std']:.5f}** (mean ± std over "
             f"{len(runs)} seeds).", "",
             "| seed | steps | train s | pre-quant bpb | post-quant bpb | sliding bpb | TTT bpb | total bytes |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        cells = [str(r.seed), str(r.result.get("steps")), f"{r.result.get('train_time_ms', 0) / 1000:.1f}"]
        cells += ["—" if r.metric(m) is None else f"{r.metric(m):.5f}" for m in METRICS]
        lines.append("| " + " | ".join(cells + [str(r.result.get("total_bytes"))]) + " |")
    checks = sub["compliance"]
    lines += ["", f"Significance: {sig_line}", "", "## Configuration and reproduction", "",
              "Knobs that differ from the script's defaults, as the runs set them:", "", "```", command, "```", "",
              "## Compliance (computed from the logs by tools/package_record.py)", ""]
    lines += [f"- {k}: {v}" for k, v in checks.items()]
    code_line = (f"- `train_gpt.py`: the script exactly as run (sha256 {sub['code_sha256']}); counted code size "
                 f"{sub['code_bytes']} bytes (method: {sub['code_method']}, as the runs logged)")
    lines += ["", "## Files", "", code_line]
    if packed_bytes is not None:
        lines.append(f"- `train_gpt.packed.py`: the counted self-extracting wrapper (minified, brotli + base85), "
                     f"{packed_bytes} bytes")
    lines += ["- `logs/`: each seed's log and JSON result", "- `requirements.txt`, `submission.json`", ""]
    return "\n".join(lines)


def write_folder(folder: Path, script: Path, runs: list[Run], sub: dict, text: str, packed: Optional[str]) -> None:
    (folder / "logs").mkdir(parents=True)
    shutil.copyfile(script, folder / "train_gpt.py")
    if packed is not None:
        (folder / "train_gpt.packed.py").write_text(packed, encoding="utf-8")
    for run in runs:
        shutil.copyfile(run.path, folder / "logs" / run.path.name)
        log_text = run.path.with_suffix(".txt")
        if log_text.exists():
            shutil.copyfile(log_text, folder / "logs" / log_text.name)
    shutil.copyfile(REPO / "requirements.txt", folder / "requirements.txt")
    (folder / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(text, encoding="utf-8")


def package(args) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        raise RunLogError(f"--name {args.name!r}: want letters, digits, '_', '.', '-'")
    script = Path(args.script)
    if not script.is_file():
        raise RunLogError(f"--script {script}: no such file")
    runs = sorted(load_runs(args.logs), key=lambda r: r.seed)
    check_runs(runs, script)
    metric = runs[0].final_metric_name() if args.metric == "final" else args.metric
    if any(r.metric(metric) is None for r in runs):
        raise RunLogError(f"--metric {args.metric}: not logged by every run")
    checks = compliance(runs)
    sig = significance(runs, metric, args.record_bpb) if args.record_bpb is not None else None
    sig_line = verdict(sig) if sig else "not tested (no --record-bpb)"
    print(f"significance {sig_line}")
    if args.track == "10min_16mb":
        failed = failed_checks(checks)
        if failed or not (sig and sig["significant"]):
            raise RunLogError("refusing track_10min_16mb: " + (f"compliance fails {failed}" if failed else
                              "no significant improvement over --record-bpb") + "; use --track non_record_16mb")
    folder = Path(args.records_dir) / f"track_{args.track}" / f"{args.date}_{args.name}"
    if folder.exists():
        raise RunLogError(f"{folder} exists; remove it or pick another --name")
    source = script.read_text(encoding="utf-8")
    if args.with_packed and is_packed(source):
        raise RunLogError(f"--with-packed: {script} is already packed (it is what the runs ran; drop the flag)")
    packed = pack(source).text if args.with_packed else None
    sub = submission(args, runs, metric, checks, sig)
    text = readme(sub, runs, reproduction_command(runs[0], script_defaults(script)), sig_line,
                  None if packed is None else len(packed.encode("utf-8")))
    write_folder(folder, script, runs, sub, text, packed)
    return folder


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="result files, or directories searched for logs/*.json")
    parser.add_argument("--name", required=True, help="folder name after the date, e.g. LoopedBirkhoff")
    parser.add_argument("--author", required=True)
    parser.add_argument("--github-id", required=True)
    parser.add_argument("--technique-summary", required=True, help="one paragraph on what the submission does")
    parser.add_argument("--track", choices=TRACKS, default="non_record_16mb")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD (default: today)")
    parser.add_argument("--script", default=str(REPO / "train_gpt.py"), help="the script the runs ran")
    parser.add_argument("--with-packed", action="store_true", help="also write train_gpt.packed.py")
    parser.add_argument("--metric", choices=["final", *METRICS], default="final")
    parser.add_argument("--record-bpb", type=float, help="the current record's val_bpb, for the significance test")
    parser.add_argument("--records-dir", default=str(REPO / "records"))
    args = parser.parse_args(argv)
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
        parser.error(f"--date {args.date!r}: want YYYY-MM-DD")
    try:
        folder = package(args)
    except RunLogError as exc:
        print(f"package_record.py: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
