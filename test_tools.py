"""Tests of tools/: the sweep summarizer and plots, the record packager and the code packer.

They run the real train_gpt.py (one process on CPU, a fixed step count so that runs are repeatable)
to make the logs the tools read.
"""

import csv
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import E2E, REPO, SCRIPT, hparams, run_script

TOOLS = Path(__file__).resolve().parent / "tools"
sys.path.insert(0, str(TOOLS))

import compressor_bench  # noqa: E402
import gpu_doctor  # noqa: E402
import knob_table  # noqa: E402
import pack_code  # noqa: E402
import phased_ttt_cost  # noqa: E402
import package_record  # noqa: E402
import plot_runs  # noqa: E402
import summarize_runs  # noqa: E402
from runlogs import Run, RunLogError  # noqa: E402

# A fixed number of steps with the loop switch at a step: no clock in the schedule, so reruns repeat.
FIXED = dict(E2E, ITERATIONS=12, MAX_WALLCLOCK_SECONDS=0, ENABLE_LOOPING_AT_STEP=6, WARMUP_STEPS=0,
             VAL_LOSS_EVERY=4, GPTQ_CALIBRATION_BATCHES=2, SLIDING_WINDOW_ENABLED=1, EVAL_STRIDE=32, EVAL_LOOPS="0,1,3")


def train(script: Path, cwd: Path, data: Path, **env) -> subprocess.CompletedProcess:
    return run_script([sys.executable, str(script)], dict(FIXED, DATA_DIR=data, **env), cwd)


@pytest.fixture(scope="module")
def sweep(tiny_data, tmp_path_factory) -> Path:
    """Three seeds of one configuration, one run of another, and a run that failed."""
    root = tmp_path_factory.mktemp("sweep")
    for seed in (1, 2, 3):
        result = train(SCRIPT, root, tiny_data["root"], SEED=seed, RUN_ID=f"a_s{seed}")
        assert result.returncode == 0, result.stderr[-3000:]
    assert train(SCRIPT, root, tiny_data["root"], SEED=1, RUN_ID="b_s1", QK_GAIN_INIT=3.0).returncode == 0
    assert train(SCRIPT, root, root / "missing", SEED=1, RUN_ID="broken").returncode != 0
    return root


def result(root: Path, run_id: str) -> dict:
    return json.loads((root / "logs" / f"{run_id}.json").read_text())


def final(record: dict) -> float:
    return record["metrics"]["sliding_val_bpb"]


# --- summarizer ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_summary_groups_seeds_sorts_and_keeps_the_failed_run(sweep, tmp_path, capsys):
    out = tmp_path / "s.tsv"
    assert summarize_runs.main([str(sweep), "--baseline", "a_s2", "--tsv", str(out)]) == 0
    rows = list(csv.DictReader(out.open(), delimiter="\t"))
    assert sorted(r["run_ids"] for r in rows if r["status"] == "completed") == ["a_s1,a_s2,a_s3", "b_s1"]
    a = next(r for r in rows if r["run_ids"] == "a_s1,a_s2,a_s3")
    b = next(r for r in rows if r["run_ids"] == "b_s1")
    a_scores = [final(result(sweep, f"a_s{s}")) for s in (1, 2, 3)]
    assert float(a["final_mean"]) == pytest.approx(statistics.fmean(a_scores), abs=1e-12)
    assert float(a["final_std"]) == pytest.approx(statistics.stdev(a_scores), abs=1e-12)
    assert float(a["delta"]) == 0.0
    assert float(b["delta"]) == pytest.approx(final(result(sweep, "b_s1")) - statistics.fmean(a_scores), abs=1e-12)
    assert a["seeds"] == "1,2,3" and a["QK_GAIN_INIT"] == "5.25" and b["QK_GAIN_INIT"] == "3.0"
    assert float(rows[0]["final_mean"]) <= float(rows[1]["final_mean"])
    assert rows[-1]["run_ids"] == "broken" and rows[-1]["status"].startswith("failed (DataError")
    assert "DATA_DIR" in rows[0] and "SEED" not in rows[0] and "RUN_ID" not in rows[0]
    markdown = capsys.readouterr().out
    assert "| broken |" in markdown and "failed (DataError" in markdown and "± " in markdown


@pytest.mark.slow
def test_summary_lists_a_run_that_was_killed(sweep, tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    killed = result(sweep, "a_s1")
    killed.update(run_id="killed", status="running", metrics={}, steps=7)
    (logs / "killed.json").write_text(json.dumps(killed))
    shutil.copy(sweep / "logs" / "a_s2.json", logs)
    assert summarize_runs.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"\| killed \| 1 \| — \| — \|.*\| running \(last step 7\) \|$", table, re.M), table


@pytest.mark.slow
def test_summary_errors_name_the_problem(sweep, tmp_path, capsys):
    assert summarize_runs.main([str(sweep), "--baseline", "nope"]) == 2
    assert "--baseline nope: no finished run" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("[1, 2]")
    assert summarize_runs.main([str(tmp_path / "x.json")]) == 2
    assert "not a train_gpt.py result" in capsys.readouterr().err
    assert summarize_runs.main([str(tmp_path / "absent")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


# --- plots --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plots_are_written_and_left_out_runs_named(sweep, tmp_path, capsys):
    knob_png, curve_png = tmp_path / "k.png", tmp_path / "c.png"
    assert plot_runs.main(["knob", "QK_GAIN_INIT", str(sweep), "-o", str(knob_png)]) == 0
    assert "left out broken: no final metric, failed" in capsys.readouterr().err
    assert plot_runs.main(["curve", str(sweep), "--runs", "a_s1,b_s1", "-o", str(curve_png)]) == 0
    for png in (knob_png, curve_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert plot_runs.main(["knob", "NOT_A_KNOB", str(sweep), "-o", str(knob_png)]) == 2
    assert "knob NOT_A_KNOB: not a hyperparameter" in capsys.readouterr().err
    assert plot_runs.main(["curve", str(sweep), "--runs", "zzz", "-o", str(curve_png)]) == 2
    assert "--runs: no result for zzz" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_loops_plot_and_its_table(sweep, tmp_path, capsys):
    png = tmp_path / "loops.png"
    assert plot_runs.main(["eval-loops", str(sweep), "--relative-to", "1", "-o", str(png)]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| QK_GAIN_INIT=5.25 | 1,2,3 |"))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    assert len(cells) == 3 and cells[1] == "+0.0000 ± 0.0000"
    gaps = [result(sweep, f"a_s{s}")["metrics"] for s in (1, 2, 3)]
    gaps = [m["loops3_val_bpb"] - m["loops1_val_bpb"] for m in gaps]
    assert cells[2] == f"{statistics.fmean(gaps):+.4f} ± {statistics.stdev(gaps):.4f}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_runs.main(["eval-loops", str(sweep), "--relative-to", "7", "-o", str(png)]) == 2
    assert "--relative-to 7: not among every run's EVAL_LOOPS counts" in capsys.readouterr().err


def test_categorical_knob_values_put_none_last():
    positions, labels = plot_runs.x_positions([4.0, None, 2.0, None])
    assert labels == ["2.0", "4.0", "none"] and positions[None] == 2
    assert plot_runs.x_positions([1, 3]) == ({1: 1, 3: 3}, None)


# --- code packer --------------------------------------------------------------------------------


def test_packed_script_is_the_two_line_wrapper_of_the_minified_source():
    source = SCRIPT.read_text()
    counted = pack_code.pack(source)
    packed = counted.text
    assert counted.method == tg.CODE_MINIFIED and counted.size == len(packed.encode())
    assert packed.count("\n") == 2 and len(packed) < len(source) / 3
    minified = pack_code.unpack(packed)
    assert minified == tg.minify_source(source) and len(minified) < 0.7 * len(source)
    assert '"""' not in minified  # docstrings are gone
    with pytest.raises(pack_code.PackError, match="not a wrapper written by pack_code.py"):
        pack_code.unpack(source)
    with pytest.raises(pack_code.PackError, match="already a packed wrapper"):
        pack_code.pack(packed)
    assert pack_code.is_packed(packed) and not pack_code.is_packed(source)
    assert tg.counted_code(packed) == tg.CountedCode(packed, tg.CODE_WRAPPER)  # a wrapper counts itself


def test_packed_script_imports_with_the_same_hyperparameters_and_module_identity(tmp_path):
    packed = tmp_path / "wrapped.py"
    assert pack_code.main([str(SCRIPT), "-o", str(packed)]) == 0
    module = package_record.import_script(packed, "wrapped_train_gpt")
    assert module.__name__ == "wrapped_train_gpt" and module.__file__ == str(packed)
    assert module.Hyperparameters.__module__ == "wrapped_train_gpt"

    def fields(cls):
        return [(f.name, f.type, f.default, dict(f.metadata)) for f in dataclasses.fields(cls)]
    assert fields(module.Hyperparameters) == fields(tg.Hyperparameters) and len(fields(tg.Hyperparameters)) > 40
    env = {"NUM_LOOPS": "3", "LOOP_SAMPLE": "3,1", "EMA_DECAY": "0.5", "ENABLE_LOOPING_AT_STEP": "none", "RUN_ID": "x"}
    assert module.Hyperparameters.from_env(env).as_dict() == tg.Hyperparameters.from_env(env).as_dict()
    with pytest.raises(module.ConfigError, match="NUM_LOOPS"):
        module.Hyperparameters.from_env({"NUM_LOOPS": "two"})
    assert module.counted_code(packed.read_text()).method == tg.CODE_WRAPPER


def test_minifier_output_is_the_same_in_every_process():
    # set iteration order differs between hash seeds; the renaming must not depend on it
    seed = "1" if os.environ.get("PYTHONHASHSEED") == "0" else "0"  # not this process's seed
    program = "import sys, train_gpt; sys.stdout.write(train_gpt.minify_source(open(train_gpt.__file__).read()))"
    other = subprocess.run([sys.executable, "-c", program], env=dict(os.environ, PYTHONHASHSEED=seed),
                           cwd=SCRIPT.parent, capture_output=True, text=True, check=True).stdout
    assert other == tg.minify_source(SCRIPT.read_text())


class ListLog(list):
    """Stands in for RunLog: keeps the lines and the JSON fields."""

    def __call__(self, message: str) -> None:
        self.append(message)

    def update(self, **fields) -> None:
        self.fields = fields


def test_without_the_minifier_the_unminified_wrapper_is_counted_with_a_warning(monkeypatch, tmp_path, capsys):
    source = SCRIPT.read_text()
    minified_size = tg.counted_code(source).size
    monkeypatch.setitem(sys.modules, "python_minifier", None)  # `import python_minifier` now raises ImportError
    assert tg.minify_source(source) is None
    counted = tg.counted_code(source)
    assert counted.method == tg.CODE_UNMINIFIED and pack_code.unpack(counted.text) == source
    assert counted.size > minified_size
    log = ListLog()
    tg.log_counted_code(counted, len(source.encode()), log)
    assert log[0].startswith("WARNING: python-minifier is not installed (pip install python-minifier)")
    assert f"counted {counted.size} bytes: brotli-11 + base85 self-extracting wrapper of the UNMINIFIED" in log[1]
    assert log.fields == {"code_bytes": counted.size, "code_method": "unminified"}
    out = tmp_path / "packed.py"
    assert pack_code.main([str(SCRIPT), "-o", str(out)]) == 0
    assert "WARNING: python-minifier is not installed" in capsys.readouterr().err
    assert out.read_text() == counted.text


def train_lines(log: str) -> list[str]:
    """The lines that must agree between two runs of the same code: losses, scores, model bytes."""
    keep = r"^(\d+/\d+ (train_loss|val_loss)|layer_loop|Serialized model|quantized)"
    return [re.sub(r"( train_time| eval_time| tok/s).*$", "", line) for line in log.splitlines() if re.match(keep, line)]


@pytest.mark.slow
def test_packed_script_runs_end_to_end_like_the_source_and_counts_the_same_bytes(sweep, tiny_data, tmp_path):
    packed = tmp_path / "train_gpt.py"
    assert pack_code.main([str(SCRIPT), "-o", str(packed)]) == 0
    run = train(packed, tmp_path, tiny_data["root"], SEED=1, RUN_ID="packed")
    assert run.returncode == 0, run.stderr[-3000:]
    ours, theirs = (tmp_path / "logs" / "packed.txt").read_text(), (sweep / "logs" / "a_s1.txt").read_text()
    assert len(train_lines(ours)) > 10 and train_lines(ours) == train_lines(theirs)
    size = packed.stat().st_size
    # the readable run counted exactly the file the packer wrote, and the wrapper counts itself the same
    assert f"Code size: {size} bytes" in ours and f"Code size: {size} bytes" in theirs
    assert f"counted {size} bytes: this file is the self-extracting wrapper" in ours
    assert f"code: {SCRIPT.stat().st_size} bytes of source; counted {size} bytes: python-minifier" in theirs
    packed_result, source_result = result(tmp_path, "packed"), result(sweep, "a_s1")
    assert packed_result["metrics"]["sliding_val_bpb"] == source_result["metrics"]["sliding_val_bpb"]
    untimed = [[{k: v for k, v in p.items() if k != "train_time_ms"} for p in r["val_curve"]]
               for r in (packed_result, source_result)]
    assert len(untimed[0]) == 4 and untimed[0] == untimed[1]
    assert packed_result["artifact_bytes"] == source_result["artifact_bytes"]
    assert packed_result["code_bytes"] == source_result["code_bytes"] == size < SCRIPT.stat().st_size / 3
    assert (packed_result["code_method"], source_result["code_method"]) == ("wrapper", "minified")
    assert source_result["source_bytes"] == SCRIPT.stat().st_size
    assert packed_result["total_bytes"] == source_result["total_bytes"] == size + source_result["artifact_bytes"]


# --- record packager ----------------------------------------------------------------------------


def package_args(sweep: Path, records: Path, *extra: str) -> list[str]:
    logs = [str(sweep / "logs" / f"a_s{s}.json") for s in (1, 2, 3)]
    return [*logs, "--name", "TinyTest", "--author", "Tester", "--github-id", "tester", "--date", "2026-11-23",
            "--technique-summary", "tiny test model", "--records-dir", str(records), *extra]


@pytest.mark.slow
def test_package_writes_a_complete_folder(sweep, tmp_path, capsys):
    a_scores = [final(result(sweep, f"a_s{s}")) for s in (1, 2, 3)]
    record_bpb = statistics.fmean(a_scores) + 0.5
    assert package_record.main(package_args(sweep, tmp_path, "--with-packed", "--record-bpb", str(record_bpb))) == 0
    assert "-> significant record (p < 0.01)" in capsys.readouterr().out
    folder = tmp_path / "track_non_record_16mb" / "2026-11-23_TinyTest"
    assert (folder / "train_gpt.py").read_bytes() == SCRIPT.read_bytes()
    assert pack_code.unpack((folder / "train_gpt.packed.py").read_text()) == tg.minify_source(SCRIPT.read_text())
    assert sorted(p.name for p in (folder / "logs").iterdir()) == [f"a_s{s}.{e}" for s in (1, 2, 3) for e in ("json", "txt")]
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx(statistics.fmean(a_scores), abs=1e-12)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(a_scores), abs=1e-12)
    assert sub["seeds"] == [1, 2, 3] and sub["seed_results"]["2"]["val_bpb"] == a_scores[1]
    assert sub["seed_results"]["1"]["artifact_bytes"] == result(sweep, "a_s1")["total_bytes"]
    assert sub["metric"] == "sliding_val_bpb" and sub["track"] == "track_non_record_16mb"
    checks = sub["compliance"]
    assert checks["three_seeds"] and checks["train_plus_gptq_under_600s"] and checks["artifact_under_16mb"]
    assert checks["hardware_8xh100"] is False and checks["score_first_ttt"] is None
    assert checks["no_train_val_overlap"] is True
    assert sub["significance"]["significant"] and sub["significance"]["df"] == 2
    readme = (folder / "README.md").read_text()
    assert "ITERATIONS=12" in readme and "SEED=<seed> torchrun --standalone --nproc_per_node=1 train_gpt.py" in readme
    assert "| 3 | 12 |" in readme and (folder / "requirements.txt").exists()
    code_bytes = result(sweep, "a_s1")["code_bytes"]
    assert f"counted code size {code_bytes} bytes (method: minified" in readme
    assert (folder / "train_gpt.packed.py").stat().st_size == code_bytes and sub["code_method"] == "minified"


@pytest.mark.slow
def test_package_never_claims_an_unsupported_record(sweep, tmp_path, capsys):
    mean = statistics.fmean(final(result(sweep, f"a_s{s}")) for s in (1, 2, 3))
    assert package_record.main(package_args(sweep, tmp_path, "--record-bpb", str(mean))) == 0
    assert "-> NOT a record (needs p < 0.01)" in capsys.readouterr().out
    sub = json.loads((tmp_path / "track_non_record_16mb" / "2026-11-23_TinyTest" / "submission.json").read_text())
    assert sub["significance"]["significant"] is False and sub["significance"]["p_value"] > 0.5
    assert package_record.main(package_args(sweep, tmp_path, "--name", "Rec", "--track", "10min_16mb",
                                            "--record-bpb", str(mean + 0.5))) == 2
    assert "refusing track_10min_16mb: compliance fails ['hardware_8xh100']" in capsys.readouterr().err
    assert not (tmp_path / "track_10min_16mb").exists()


@pytest.mark.slow
def test_package_refuses_a_record_whose_data_overlapped(sweep, tmp_path, capsys):
    logs = tmp_path / "logs"
    shutil.copytree(sweep / "logs", logs)
    edited = result(sweep, "a_s2")
    edited["data_check"]["overlap_docs"] = 3
    (logs / "a_s2.json").write_text(json.dumps(edited))
    args = [str(logs / f"a_s{s}.json") for s in (1, 2, 3)] + package_args(sweep, tmp_path)[3:]
    assert package_record.main(args + ["--track", "10min_16mb", "--record-bpb", "9.0"]) == 2
    assert "compliance fails ['no_train_val_overlap', 'hardware_8xh100']" in capsys.readouterr().err
    del edited["data_check"]
    (logs / "a_s2.json").write_text(json.dumps(edited))
    assert package_record.main(args + ["--track", "10min_16mb", "--record-bpb", "9.0"]) == 2
    assert "'no_train_val_overlap (not recorded by every run)'" in capsys.readouterr().err
    assert not (tmp_path / "track_10min_16mb").exists()


@pytest.mark.parametrize("runs, message", [
    (["a_s1", "b_s1"], "differ in knobs other than SEED/RUN_ID: QK_GAIN_INIT: a_s1=5.25, b_s1=3.0"),
    (["a_s1", "broken"], "runs that did not finish: broken: failed (DataError"),
    (["a_s1", "a_s1"], "a seed appears more than once"),
])
@pytest.mark.slow
def test_package_refuses_runs_that_are_not_one_configuration(sweep, tmp_path, capsys, runs, message):
    args = [str(sweep / "logs" / f"{r}.json") for r in runs] + package_args(sweep, tmp_path)[3:]
    assert package_record.main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_package_refuses_a_script_the_logs_did_not_run(sweep, tmp_path, capsys):
    other = tmp_path / "train_gpt.py"
    other.write_text(SCRIPT.read_text() + "\n")
    assert package_record.main(package_args(sweep, tmp_path, "--script", str(other))) == 2
    assert "is not the script the logs ran" in capsys.readouterr().err


# --- significance arithmetic --------------------------------------------------------------------


@pytest.mark.parametrize("t", [-1.5, 0.0, 0.4, 2.0, 9.0])
def test_student_t_tail_matches_closed_forms(t):
    assert package_record.student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)
    assert package_record.student_t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), abs=1e-12)


def test_package_refuses_eval_only_runs():
    runs = [Run(Path(f"{seed}.json"), {"run_id": f"s{seed}", "status": "completed", "hyperparameters": {"seed": seed},
                                       "eval_artifact": {"path": "final_model.int6.ptz"} if seed == 42 else None})
            for seed in (1337, 42)]
    with pytest.raises(RunLogError, match=r"eval-only runs \(EVAL_ARTIFACT\) are not a submission.*: s42$"):
        package_record.check_runs(runs, SCRIPT)


def test_significance_converts_bpb_to_nats_with_the_logged_ratio():
    # val_loss/val_bpb = 2.0 nats per bpb; improvements 0.02, 0.03, 0.04 bpb -> 0.04, 0.06, 0.08 nats.
    runs = [Run(Path(f"{i}.json"), {"metrics": {"post_quant_val_bpb": 1.10 - d, "post_quant_val_loss": 2 * (1.10 - d)}})
            for i, d in enumerate((0.02, 0.03, 0.04))]
    sig = package_record.significance(runs, "post", 1.10)
    assert sig["improvement_nats_per_seed"] == pytest.approx([0.04, 0.06, 0.08])
    t = (0.06 - 0.005) / (0.02 / math.sqrt(3))
    assert sig["t"] == pytest.approx(t) and sig["p_value"] == pytest.approx(package_record.student_t_sf(t, 2))
    assert sig["significant"] is (sig["p_value"] < 0.01)


def test_every_tool_has_help():
    for tool in ("summarize_runs.py", "plot_runs.py", "package_record.py", "pack_code.py", "gpu_doctor.py"):
        out = subprocess.run([sys.executable, str(TOOLS / tool), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage:" in out.stdout, tool


# --- the README's knob table ---------------------------------------------------------------------


def test_readme_knob_table_is_the_one_generated_from_the_code():
    readme = (REPO / "README.md").read_text()
    assert knob_table.current_table(readme) == knob_table.render()
    for f in tg.dataclasses.fields(tg.Hyperparameters):
        assert f"| `{f.name.upper()}` | " in readme


def test_knob_table_check_fails_on_a_stale_readme(tmp_path, capsys):
    table = knob_table.render()
    stale = table.replace("| `SEED` | `1337` |", "| `SEED` | `42` |")
    assert stale != table
    (tmp_path / "README.md").write_text("intro\n" + stale + "\nrest\n")
    assert knob_table.main(["--check", str(tmp_path / "README.md")]) == 1
    assert knob_table.main(["--write", str(tmp_path / "README.md")]) == 0
    assert (tmp_path / "README.md").read_text() == "intro\n" + table + "\nrest\n"
    assert knob_table.main(["--check", str(tmp_path / "README.md")]) == 0


# --- the README's env lines for public stacks ---------------------------------------------------

KNOBS = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}


def readme_stack_lines() -> list[dict[str, str]]:
    """The KEY=VALUE settings of each torchrun command under README's "Reproducing public stacks"."""
    section = (REPO / "README.md").read_text().split("### Reproducing public stacks")[1].split("\n## ")[0]
    commands = re.findall(r"^((?:[A-Z0-9_]+=\S+ (?:\\\n)?)+)torchrun", section, flags=re.M)
    return [dict(kv.split("=", 1) for kv in command.split() if "=" in kv) for command in commands]


def test_readme_stack_lines_set_only_real_knobs_to_valid_values():
    stacks = readme_stack_lines()
    assert len(stacks) == 3  # 04-09, #1855, #2135
    for env in stacks:
        assert set(env) <= KNOBS, set(env) - KNOBS
        tg.check_config(hparams(**env), world_size=8)
        assert hparams(**env).birkhoff_mix is False  # our own additions are off in every public stack


# --- tools/issue13_ablation.sh through tools/cpu_ablation.sh, with a stand-in benchmark ------------

FAKE_BENCH = """#!/usr/bin/env bash
# prints what cpu_quality.sh prints for a run that stopped at ITERATIONS (no ms_per_step), and its JSON
shift; export "$@"; mkdir -p "$RUN_DIR/logs"; printf '%s\\n' "$@" > "$RUN_DIR/args"
echo '{"steps": 150, "train_time_ms": 123000}' > "$RUN_DIR/logs/$RUN_ID.json"
echo "details: rc=0 ms_per_step=NA"
echo "steps=150 pre_bpb=2.5 post_bpb=2.6 sliding_bpb=2.55 artifact_bytes=999 wall_s=1.0"
"""


CPU_QUALITY = dict(NUM_LAYERS=4, MODEL_DIM=160, NUM_HEADS=4, NUM_KV_HEADS=2, XSA_LAST_N=4, NUM_LOOPS=2, LOOP_START=1,
                   LOOP_END=2, PARALLEL_RESIDUAL_START=3, TRAIN_SEQ_LEN=128, EVAL_SEQ_LEN=128)  # its small model


def test_issue13_ablation_rows_and_configs(tmp_path):
    bench = tmp_path / "bench.sh"
    bench.write_text(FAKE_BENCH)
    env = dict(os.environ, BENCH=str(bench), RUNS_DIR=str(tmp_path / "runs"), SEEDS="7")
    out = subprocess.run(["bash", str(TOOLS / "issue13_ablation.sh"), str(tmp_path / "t.tsv")], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader((tmp_path / "t.tsv").open(), delimiter="\t"))
    assert [r["label"] for r in rows][:3] == ["new", "old", "new_no_docattn"] and len(rows) == 12
    for r in rows:
        assert (r["seed"], r["steps"], r["ms_per_step"], r["post_bpb"]) == ("7", "150", "820", "2.6")
        assert float(r["load1"]) >= 0
        args = (tmp_path / "runs" / f"{r['label']}_s7" / "args").read_text().split()
        # cpu_quality.sh's 4-layer model, with the driver's settings on top, is a valid configuration
        tg.check_config(hparams(**{**CPU_QUALITY, **dict(a.split("=", 1) for a in args)}), world_size=1)
    old_args = set((tmp_path / "runs" / "old_s7" / "args").read_text().split())
    assert {"DOC_ATTENTION=0", "LQER_ENABLED=0"} <= old_args  # both came after the 04-09 stack
    bad = subprocess.run(["bash", str(TOOLS / "issue13_ablation.sh"), str(tmp_path / "u.tsv"), "nope"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown config 'nope'" in bad.stderr


# --- tools/ttt_deadline_ratio.py ----------------------------------------------------------------------


def test_ttt_deadline_ratio_times_both_modes_and_prints_the_ratio(monkeypatch, capsys):
    sys.path.insert(0, str(TOOLS))
    import ttt_deadline_ratio
    for key, value in dict(VOCAB_SIZE=64, NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=4,
                           XSA_LAST_N=0, NUM_LOOPS=0, PARALLEL_START_LAYER=-1, TRAIN_SEQ_LEN=64, EVAL_SEQ_LEN=64,
                           TTT_CHUNK_SIZE=16, TTT_BATCH_SIZE=2).items():
        monkeypatch.setenv(key, str(value))
    assert ttt_deadline_ratio.main(["--docs", "4", "--log-mean", "3", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"repeat 1 adapting: [\d.]+s .*\nrepeat 1 score-only: [\d.]+s", out)
    ratio = float(re.search(r"ratio score-only / adapting \(best of 1\): ([\d.]+)", out).group(1))
    assert 0 < ratio < 1  # no backward, no optimizer step: always cheaper


# --- the GPU doctor (on CPU: the tiny shape, FA3 skipped) -----------------------------------------


def test_gpu_doctor_runs_the_tiny_shape_end_to_end_and_writes_its_json(tmp_path, capsys, monkeypatch):
    for name in [f.name.upper() for f in tg.dataclasses.fields(tg.Hyperparameters)]:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "doctor.json"
    assert gpu_doctor.main(["--json", str(out), "--warmup-steps", "2", "--timed-steps", "2", "--val-tokens", "1024",
                            "--workdir", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and report["hyperparameters"]["vocab_size"] == gpu_doctor.TINY["VOCAB_SIZE"]
    assert [(c["name"], c["status"]) for c in report["fa3"]] == [
        ("import", "SKIP"), ("matches_sdpa", "SKIP"), ("returns_tensor", "SKIP"), ("compiles", "SKIP"),
        ("varlen", "SKIP"), ("varlen_matches_sdpa", "SKIP"), ("varlen_compiles", "SKIP")]
    assert all("no CUDA device" in c["reason"] for c in report["fa3"])
    training = report["training"]
    assert training["grad_accum_steps"] == 8 and set(training["per_loop_count"]) == {"0", "1"}
    for row in training["per_loop_count"].values():
        assert row["tokens_per_s"] == pytest.approx(2048 / (row["ms_per_step"] / 1000), rel=1e-3)
        assert row["graphs_compiled_after_warmup"] == 0
    # the chunked loss (LOSS_CHUNK_TOKENS) stores no logits-sized tensor: each chunk's are recomputed in backward
    assert report["logits_memory"]["stored_copies"] == 0 and report["logits_memory"]["stored_dtypes"] == []
    assert report["gptq"]["gptq_total_s"] >= 0 and (tmp_path / "work" / tg.ARTIFACT_PATH).is_file()
    assert report["evaluation"]["val_tokens"] == 1024
    assert set(report["evaluation"]["phases"]) == {"quantized", "quantized_phased_ttt"}  # the default scores
    assert [v["name"] for v in report["verdicts"]] == ["train_600s", "gptq_reserve", "eval_600s"]
    table = capsys.readouterr().out
    assert "| fa3 | compiles | SKIP: no CUDA device" in table and "| verdict | eval_600s |" in table


def test_gpu_doctor_fa3_only_fails_without_a_gpu(capsys):
    assert gpu_doctor.main(["--fa3-only"]) == (0 if tg.torch.cuda.is_available() else 1)
    assert "| fa3 | import |" in capsys.readouterr().out


@pytest.mark.parametrize("env, plain_ms, looped_ms, expected", [
    # looping at half of 1000 ms: 50 plain steps of 10 ms, then ceil(500/30) = 17 looped (the last overruns)
    (dict(ENABLE_LOOPING_AT=0.5), 10.0, 30.0, 50 + 17),
    # a step starts while time is left, so the last one overruns: ceil(1000/300) = 4
    (dict(NUM_LOOPS=0), 300.0, 999.0, 4),
    # looping at step 10: 10 plain steps (100 ms), then ceil(900/30) = 30 looped
    (dict(ENABLE_LOOPING_AT_STEP=10), 10.0, 30.0, 40),
    # the step is never reached within the budget: all plain
    (dict(ENABLE_LOOPING_AT_STEP=500), 10.0, 30.0, 100),
])
def test_projected_train_steps_follows_the_looping_schedule(env, plain_ms, looped_ms, expected):
    assert gpu_doctor.projected_train_steps(1000.0, plain_ms, looped_ms, hparams(**env)) == expected


def test_projection_divides_by_eight_and_scales_eval_to_the_fineweb_validation_set():
    hp = hparams(MAX_WALLCLOCK_SECONDS=600, GPTQ_RESERVE_SECONDS=12, ENABLE_LOOPING_AT=0.5, LOOP_SAMPLE="1,3")
    training = {"per_loop_count": {"0": {"ms_per_step": 800.0}, "1": {"ms_per_step": 960.0},
                                   "3": {"ms_per_step": 1280.0}}}
    train = gpu_doctor.project_training(training, hp, gpu_doctor.gptq_reserve(hp, 12.5))
    assert (train["ms_per_step_8x_plain"], train["ms_per_step_8x_looped"]) == (100.0, 140.0)  # mean of 120 and 160
    assert train["train_budget_s"] == 588 and train["steps"] == 2940 + 2100  # 294 s at 100 ms, 294 s at 140 ms
    evals = {"val_tokens": gpu_doctor.FINEWEB_VAL_TOKENS // 10, "artifact_load_s": 2.0,
             "phases": {"quantized": {"compile_s_estimate": 30.0, "warm_s": 4.0},
                        "quantized_sliding_window": {"compile_s_estimate": 20.0, "warm_s": 40.0}}}
    projected = gpu_doctor.project_eval(evals)
    assert projected["phases_s"] == {"quantized": 35.0, "quantized_sliding_window": 70.0}  # compile + warm * 10 / 8
    assert projected["total_s"] == 107.0
    status = {v.name: v.status for v in gpu_doctor.verdicts(train, {"gptq_total_s": 12.5}, projected, hp)}
    assert status == {"train_600s": "PASS", "gptq_reserve": "FAIL", "eval_600s": "PASS"}
    slow = dict(train, steps=gpu_doctor.MIN_STEPS - 1)
    status = {v.name: v.status for v in gpu_doctor.verdicts(slow, {"gptq_total_s": 12.0}, dict(projected, total_s=601), hp)}
    assert status == {"train_600s": "FAIL", "gptq_reserve": "PASS", "eval_600s": "FAIL"}
    measured = hparams(MAX_WALLCLOCK_SECONDS=600, ENABLE_LOOPING_AT=0.5, LOOP_SAMPLE="1,3")  # unset: the run reserves 1.5 x its measurement
    assert gpu_doctor.gptq_reserve(measured, 10.0) == 15.0
    assert gpu_doctor.project_training(training, measured, 15.0)["train_budget_s"] == 585


# --- the compressor bench's contexts -------------------------------------------------------------


def test_contexts_find_planted_column_structure_and_count_their_side_information():
    rng = np.random.default_rng(0)
    spread = np.where(np.arange(256) % 2 == 0, 1.0, 6.0)  # narrow and wide columns, interleaved
    codes = np.clip(np.round(rng.standard_normal((512, 256)) * spread), -31, 31).astype(np.int8)
    q = dict(codes=torch.from_numpy(codes), scale=torch.ones(512, dtype=torch.float16), bits=6)
    sizes = compressor_bench.context_sizes("blocks.0.mlp.fc.weight", q)
    assert sizes["column rms /4 (+ ids)"] < 0.9 * sizes["tensor"]
    assert sizes["row scale rank /16 (free)"] <= sizes["tensor"] + 1e-6  # a context never costs entropy
    order = compressor_bench.similarity_order(codes[:64])
    assert sorted(order) == list(range(64))
    assert compressor_bench.permutation_bytes(4) == pytest.approx(math.log2(24) / 8)
    uniform = np.arange(4096) % 16
    assert compressor_bench.conditional_bytes(np.zeros_like(uniform), uniform) == pytest.approx(4096 * 4 / 8)


# --- the phased TTT cost projection ----------------------------------------------------------------


def test_phased_ttt_cost_counts_each_chunk_window_as_phased_ttt_processes_it():
    hp = hparams(TTT_CHUNK_SIZE=8, TTT_EVAL_SEQ_LEN=32, TTT_BATCH_SIZE=2, PHASED_TTT_PREFIX_DOCS=2)
    lengths = np.array([5, 40, 17, 70, 9])
    work = phased_ttt_cost.rank_work(lengths, hp, gpus=2)
    # by hand: every document's chunks, each window min(end, 32) tokens ending at the chunk's end
    windows = sum(min(min(e, n), 32) for n in lengths for e in range(8, n + 8, 8))
    assert sum(w["useful"] for w in work) == windows
    # batches (longest first) [70], [17, 40], [5, 9]: 9 + 5 + 2 chunk steps, padded widths 8, 16 or 32
    assert sum(w["steps"] for w in work) == 16 and all(w["steps"] for w in work)
    batch = dict(fwd=0, fwd_keys=0, bwd=0, bwd_keys=0, steps=0, useful=0)
    phased_ttt_cost.add_batch(batch, np.array([17, 9]), hp)
    assert batch["fwd"] == 2 * (8 + 16 + 32) and batch["bwd"] == 2 * (8 + 16)  # the last chunk is not trained
    assert phased_ttt_cost.global_sgd_tokens(lengths, hp) == 70 + 17  # the first 2 documents scored


def test_other_phase_work_counts_what_evaluate_and_score_first_eval_run():
    hp = hparams(EVAL_SEQ_LEN=16, EVAL_STRIDE=8, TTT_CHUNK_TOKENS=64, VAL_BATCH_TOKENS=8 * 16 * 2, TTT_EPOCHS=3)
    work = phased_ttt_cost.other_phase_work(hp, targets=200, gpus=2)
    # by hand: 12 whole sequences, 6 per rank; windows start at 0, 8, ..., 184 (24, each padded to 16), 12 per rank
    assert work["post_quant_eval"] == dict(fwd=6 * 16, train=0, steps=0)
    assert work["sliding_eval"] == dict(fwd=12 * 16, train=0, steps=0)
    assert len(tg.sliding_windows(200, 16, 8)) == 24
    # 4 chunks of 64, the last never trained on; each of the 3 holds 4 sequences = 2 steps of 2 (1 per rank); 3 epochs
    assert work["full_ttt_eval"] == dict(fwd=12 * 16, train=3 * 3 * 2 * 16, steps=3 * 3 * 2)


def test_projected_configurations_sum_the_phases_the_evaluation_times():
    counted = {k.removesuffix("_ms") for k in tg.SCORED_EVAL_PHASES}
    for name, phases in phased_ttt_cost.CONFIGURATIONS.items():
        assert {p.removeprefix("full_").removeprefix("phased_") for p in phases} <= counted, name
    assert ("ngram_hint" in phased_ttt_cost.CONFIGURATIONS["phased TTT + tilt"]
            and "sliding_eval" in phased_ttt_cost.CONFIGURATIONS["full TTT"])
