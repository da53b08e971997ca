"""Reading train_gpt.py's run results (logs/{RUN_ID}.json) for the sweep and record tools.

Every run writes one JSON result: its status, the SHA-256 of the script, every hyperparameter,
the validation curve and the final metrics. The tools group runs that share a script and all
knobs but the seed, and never drop a run that did not finish: it is reported with its status.
"""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Short metric names used on the command line -> key in the result's "metrics".
METRICS = {
    "pre": "pre_quant_val_bpb",
    "post": "post_quant_val_bpb",
    "sliding": "sliding_val_bpb",
    "ttt": "ttt_val_bpb",
}
# "final" is the last evaluation a run made of its artifact: TTT if on, else sliding, else plain.
FINAL_PREFERENCE = ("ttt", "sliding", "post")
# Knobs that differ between the seeds of one configuration.
PER_SEED_KNOBS = ("seed", "run_id")


class RunLogError(Exception):
    """A result file that cannot be used, or a request the runs cannot answer."""


@dataclass
class Run:
    path: Path
    result: dict

    @property
    def run_id(self) -> str:
        return self.result["run_id"]

    @property
    def seed(self) -> int:
        return self.result["hyperparameters"]["seed"]

    @property
    def status(self) -> str:
        return self.result.get("status", "unknown")

    @property
    def code(self) -> str:
        return self.result.get("code_sha256", "")

    @property
    def knobs(self) -> dict:
        return {k: v for k, v in self.result["hyperparameters"].items() if k not in PER_SEED_KNOBS}

    def metric(self, name: str) -> Optional[float]:
        if name == "final":
            name = self.final_metric_name()
            if name is None:
                return None
        return self.result.get("metrics", {}).get(METRICS[name])

    def loop_scores(self) -> dict[int, float]:
        """val_bpb of the artifact at each EVAL_LOOPS count."""
        found = (re.fullmatch(r"loops(\d+)_val_bpb", k) for k in self.result.get("metrics", {}))
        return {int(m.group(1)): self.result["metrics"][m.group(0)] for m in found if m}

    def final_metric_name(self) -> Optional[str]:
        return next((n for n in FINAL_PREFERENCE if METRICS[n] in self.result.get("metrics", {})), None)

    def describe_unfinished(self) -> str:
        """Why a run has no final metric: its status, and its error or last training step."""
        detail = self.result.get("error") or f"last step {self.result.get('steps', 'unknown')}"
        return f"{self.status} ({detail})"


def result_files(paths: list[str]) -> list[Path]:
    """JSON results named directly, or found in logs/ folders anywhere under a directory."""
    found = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*.json") if p.parent.name == "logs"))
        elif path.is_file():
            found.append(path)
        else:
            raise RunLogError(f"{path}: no such file or directory")
    return found


def load_run(path: Path) -> Run:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunLogError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(result, dict) or not {"run_id", "hyperparameters"} <= result.keys():
        raise RunLogError(f"{path}: not a train_gpt.py result (want a JSON object with run_id and hyperparameters)")
    return Run(path, result)


def load_runs(paths: list[str]) -> list[Run]:
    runs = [load_run(p) for p in result_files(paths)]
    if not runs:
        raise RunLogError(f"no run results (logs/*.json) under {' '.join(paths)}")
    return runs


def configuration_key(run: Run) -> str:
    """Runs with equal keys are seeds of one configuration: same script, same knobs but the seed."""
    return json.dumps([run.code, run.knobs], sort_keys=True, default=str)


def group_by_configuration(runs: list[Run]) -> list[list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(configuration_key(run), []).append(run)
    return [sorted(g, key=lambda r: r.seed) for g in groups.values()]


def differing_knobs(runs: list[Run]) -> list[str]:
    """Knobs whose value is not the same in every run, in the scripts' order."""
    names = list(dict.fromkeys(k for run in runs for k in run.knobs))
    return [k for k in names if len({json.dumps(run.knobs.get(k), default=str) for run in runs}) > 1]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_value(value) -> str:
    """A knob value for a table or legend: lists as the environment writes them, unset as "none"."""
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)
