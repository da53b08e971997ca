"""Tests of the budget filler (BUDGET_FILL=1, issue 14): growing an artifact under the target (CPU, the real train_gpt.py)."""

import functools
import json
import re

import pytest
import torch

import train_gpt as tg
from conftest import SCRIPT, hparams, randomize

# One layer at width 160: the embedding (512 x 160) and the two MLP matrices are GPTQ'd (two clip groups);
# the attention matrices are small enough for fp16.
ONE_LAYER = dict(VOCAB_SIZE=512, NUM_LAYERS=1, MODEL_DIM=160, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=8, NUM_LOOPS=0,
                 LOOP_START=1, LOOP_END=1, XSA_LAST_N=1, TRAIN_SEQ_LEN=16, EVAL_SEQ_LEN=16)
MATRICES = ("tok_emb.weight", "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight")


@functools.lru_cache(maxsize=None)
def gptq_state(compressor: str, heavy: str):
    """The one-layer model, a Hessian per GPTQ'd matrix (the `heavy` one's times 1e4), GPTQ's state and its size.
    Cached: the filler changes none of them."""
    hp = hparams(**ONE_LAYER, COMPRESSOR=compressor)
    torch.manual_seed(0)
    model = tg.GPT(hp)
    randomize(model)
    state = model.state_dict()
    hessians = {name: (1e4 if name == heavy else 1.0) * torch.diag(torch.linspace(0.1, 2.0, state[name].shape[1]))
                for name in MATRICES}
    q = tg.quantize_state(model, hessians, hp)
    return hp, model, q, hessians, len(tg.serialize_artifact(q, hp))


def filler_setup(spare: int, compressor: str = "lzma", heavy: str = "", **knobs):
    """gptq_state with hp whose target is GPTQ's compressed size + spare (code bytes are 0 here). lzma is
    ~2.5x faster than brotli-11 on this state."""
    hp, model, q, hessians, base = gptq_state(compressor, heavy)
    hp = tg.dataclasses.replace(hp, artifact_limit_bytes=base + spare + 1000, budget_margin_bytes=1000,
                                **{"budget_fill": True, "budget_fill_slack_bytes": 500, "budget_fill_tries": 8, **knobs})
    return hp, model, q, hessians, base


def fill(hp, model, q, hessians):
    lines = []
    fitted, blob, report = tg.fit_to_budget(model, q, hessians, hp, 0, lines.append)
    return fitted, blob, report, lines


def sizes_agree_with_decisions(report: dict) -> None:
    """Each decision was kept exactly when its measured size fit, and the kept sizes add up to the result."""
    size = report["before"]
    for d in report["fill"]:
        assert d["accepted"] == (size + d["measured_bytes"] <= report["target"]), d
        size += d["measured_bytes"] if d["accepted"] else 0
    assert size == report["after"] <= report["target"]


@pytest.mark.parametrize("compressor", ["lzma", "pergroup"])
def test_filler_lands_under_a_lowered_limit_within_the_slack(compressor):
    hp, model, q, hessians, base = filler_setup(spare=2000, compressor=compressor)
    fitted, blob, report, lines = fill(hp, model, q, hessians)
    target = hp.artifact_limit_bytes - hp.budget_margin_bytes
    assert target - hp.budget_fill_slack_bytes <= len(blob) <= target == report["target"]
    assert report["method"] == "fill" and report["before"] == base and report["after"] == len(blob)
    assert blob == tg.serialize_artifact(fitted, hp) and report["tries"] == len(report["fill"]) <= hp.budget_fill_tries
    assert report["hessian_error"] < 0 and all(d["predicted_error"] < 0 for d in report["fill"])
    sizes_agree_with_decisions(report)
    for knob, sigmas in report["knobs"].items():  # the kept steps only tightened clips, and the state is GPTQ's at them
        assert sigmas < getattr(hp, knob.lower())
    again = tg.quantize_state(model, hessians, tg.dataclasses.replace(hp, **{k.lower(): v for k, v in report["knobs"].items()}))
    for name in MATRICES:
        assert torch.equal(fitted[name]["scale"], again[name]["scale"]), name


def test_every_decision_is_logged_with_its_predictions_and_measurement():
    hp, model, q, hessians, _ = filler_setup(spare=3000)
    _, _, report, lines = fill(hp, model, q, hessians)
    tries = [line for line in lines if line.startswith("budget_fill: try ")]
    assert len(tries) == len(report["fill"]) >= 2
    for line, d in zip(tries, report["fill"]):
        assert (f"{d['lever']} {d['step']}: predicted +{d['predicted_bytes']} bytes, Hessian-weighted error "
                f"{d['predicted_error']:+.4g}; measured {d['measured_bytes']:+d}") in line
        assert ("kept" if d["accepted"] else "over, dropped") in line and "MLP_CLIP_SIGMAS" in line and "EMBED_CLIP_SIGMAS" in line
    assert re.match(rf"budget_fill: limit {hp.artifact_limit_bytes} - margin 1000 = target {report['target']}; "
                    rf"before {report['before']} after {report['after']} bytes", lines[-1])


@pytest.mark.parametrize("heavy, first", [("tok_emb.weight", "EMBED_CLIP_SIGMAS"), ("blocks.0.mlp.fc.weight", "MLP_CLIP_SIGMAS")])
def test_filler_tightens_first_the_group_whose_error_falls_most_per_byte(heavy, first):
    # the same weights and codes; only how much the Hessian says each group's error matters differs
    hp, model, q, hessians, _ = filler_setup(spare=3000, heavy=heavy, budget_fill_tries=1)
    _, _, report, _ = fill(hp, model, q, hessians)
    assert report["fill"][0]["step"].startswith(first)


def test_a_step_that_turns_out_over_the_target_is_dropped_and_the_result_still_fits(monkeypatch):
    true_entropy = tg.entropy_bytes
    monkeypatch.setattr(tg, "entropy_bytes", lambda q: true_entropy(q) / 3)  # a lever that under-predicts its bytes 3x
    hp, model, q, hessians, _ = filler_setup(spare=700, budget_fill_slack_bytes=100)  # less than one MLP notch (~750)
    fitted, blob, report, lines = fill(hp, model, q, hessians)
    assert report["fill"][0]["accepted"] is False and any(d["accepted"] for d in report["fill"])
    assert "over, dropped" in lines[0] and len(blob) <= report["target"]
    sizes_agree_with_decisions(report)


def test_filling_off_or_within_the_slack_leaves_the_artifact_byte_identical():
    for spare, knobs in ((3000, dict(budget_fill=False)), (400, {})):  # off; on, but already within the 500-byte slack
        hp, model, q, hessians, base = filler_setup(spare=spare, **knobs)
        fitted, blob, report, lines = fill(hp, model, q, hessians)
        assert fitted is q and blob == tg.serialize_artifact(q, hp) and len(blob) == base
        assert report["method"] == "none" and report["after"] == report["before"] and not report.get("fill")
        assert not any(line.startswith("budget_fill: try") for line in lines)


@pytest.mark.parametrize("env, message", [(dict(BUDGET_FILL_TRIES=0), "BUDGET_FILL_TRIES=0: must be >= 1"),
                                          (dict(BUDGET_FILL_SLACK_BYTES=-1), "BUDGET_FILL_SLACK_BYTES=-1"),
                                          (dict(ARTIFACT_LIMIT_BYTES=5000, BUDGET_MARGIN_BYTES=1000,
                                                BUDGET_FILL_SLACK_BYTES=4000), "BUDGET_FILL_SLACK_BYTES=4000")])
def test_fill_knobs_are_checked(env, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.check_config(hparams(**env), 1)


@pytest.mark.slow
def test_run_fills_a_lowered_limit_and_records_its_decisions(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    env = dict(VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=160, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=8, NUM_LOOPS=0,
               XSA_LAST_N=0, TRAIN_SEQ_LEN=32, EVAL_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256, VAL_BATCH_TOKENS=256 * 8,
               ITERATIONS=1, WARMUP_STEPS=0, MAX_WALLCLOCK_SECONDS=0, GPTQ_CALIBRATION_BATCHES=1,
               SLIDING_WINDOW_ENABLED=0, DATA_DIR=tiny_data["root"], COMPRESSOR="pergroup", RUN_ID="free")
    runs = {}
    for run_id, extra in (("free", {}), ("filled", dict(BUDGET_FILL=1, BUDGET_FILL_SLACK_BYTES=400, BUDGET_FILL_TRIES=8))):
        if run_id == "filled":
            extra.update(ARTIFACT_LIMIT_BYTES=runs["free"]["total_bytes"] + 2500, BUDGET_MARGIN_BYTES=500)
        for key, value in {**env, **extra, "RUN_ID": run_id}.items():
            monkeypatch.setenv(key, str(value))
        tg.main()
        runs[run_id] = json.loads((tmp_path / "logs" / f"{run_id}.json").read_text())
    record, log = runs["filled"], (tmp_path / "logs" / "filled.txt").read_text()
    fit = record["budget_fit"]
    assert record["code_bytes"] == tg.counted_code(SCRIPT.read_text()).size
    assert fit["method"] == "fill" and fit["before"] == runs["free"]["total_bytes"]
    assert fit["target"] - 400 <= record["total_bytes"] == fit["after"] <= fit["target"]
    assert record["status"] == "completed" and record["artifact_over_budget"] is False
    assert len(re.findall(r"^budget_fill: try \d+/8: clip ", log, re.M)) == len(fit["fill"]) == fit["tries"]
    assert record["metrics"]["post_quant_val_bpb"] != runs["free"]["metrics"]["post_quant_val_bpb"]  # the filled file was read
