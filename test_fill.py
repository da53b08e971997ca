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
def gptq_state(compressor: str, heavy: str, env: tuple = ()):
    """The one-layer model, a Hessian per GPTQ'd matrix (the `heavy` one's times 1e4), GPTQ's state and its size,
    with the (KNOB, value) pairs of `env`. Cached: the filler changes none of them."""
    hp = hparams(**ONE_LAYER, COMPRESSOR=compressor, **dict(env))
    torch.manual_seed(0)
    model = tg.GPT(hp)
    randomize(model)
    state = model.state_dict()
    hessians = {name: (1e4 if name == heavy else 1.0) * torch.diag(torch.linspace(0.1, 2.0, state[name].shape[1]))
                for name in MATRICES}
    q = tg.quantize_state(model, hessians, hp)
    return hp, model, q, hessians, len(tg.serialize_artifact(q, hp))


def filler_setup(spare: int, compressor: str = "lzma", heavy: str = "", env: tuple = (), **knobs):
    """gptq_state with hp whose target is GPTQ's compressed size + spare (code bytes are 0 here), the clip lever
    alone unless knobs say otherwise. lzma is ~2.5x faster than brotli-11 on this state."""
    hp, model, q, hessians, base = gptq_state(compressor, heavy, env)
    hp = tg.dataclasses.replace(hp, artifact_limit_bytes=base + spare + 1000, budget_margin_bytes=1000,
                                **{"budget_fill": True, "budget_fill_slack_bytes": 500, "budget_fill_tries": 8,
                                   "budget_fill_levers": "clip", **knobs})
    return hp, model, q, hessians, base


def fill(hp, model, q, hessians):
    lines = []
    fitted, blob, report = tg.fit_to_budget(model, q, hessians, hp, 0, lines.append)
    return fitted, blob, report, lines


def summary(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith("budget_fill: limit "))


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
                    rf"before {report['before']} after {report['after']} bytes", summary(lines))


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


# GPTQ's state with one LQER correction (rank 4) and one AWQ-lite group, for the lqer and awq levers
CORRECTED = (("AWQ_LITE_ENABLED", 1), ("AWQ_LITE_GROUP_TOP_K", 1), ("LQER_TOP_K", 1))


def proposals(levers: str, env: tuple = CORRECTED):
    """filler_setup's state and the steps that BUDGET_FILL_LEVERS=levers propose on it."""
    hp, model, q, hessians, _ = filler_setup(spare=5000, env=env, budget_fill_levers=levers)
    return hp, model, q, hessians, [step for lever in tg.fill_levers(model, hessians, hp) for step in lever(q, hp)]


def assert_same_entry(got: dict, want: dict, where: str = "") -> None:
    assert got.keys() == want.keys(), where
    for key, value in want.items():
        if isinstance(value, dict):
            assert_same_entry(got[key], value, f"{where}.{key}")
        elif torch.is_tensor(value):
            assert torch.equal(got[key], value) and got[key].dtype == value.dtype, f"{where}.{key}"
        else:
            assert got[key] == value, f"{where}.{key}"


@pytest.mark.parametrize("lever", ["lqer", "awq"])
def test_each_lever_proposes_steps_whose_entries_round_trip_exactly(lever):
    hp, _, q, _, steps = proposals(lever)
    assert steps and all(s.lever == lever and s.applies_to(q) and s.bytes > 0 and not s.knobs for s in steps)
    for step in steps:
        (name,) = step.after
        before, after = q[name], step.after[name]
        if lever == "lqer":  # LQER_RANK ranks more, on the same codes
            assert tg.lqer_rank(after) == tg.lqer_rank(before) + hp.lqer_rank and torch.equal(after["codes"], before["codes"])
        else:  # one AWQ-lite group more, the LQER correction (if any) kept at its rank
            assert len(after["awq"]["starts"]) == len(before.get("awq", {}).get("starts", [])) + 1
            assert tg.lqer_rank(after) == tg.lqer_rank(before)
        back = tg.parse_artifact(tg.serialize_artifact({**q, **step.after}, hp), hp)
        assert_same_entry(back[name], after, name)
    if lever == "lqer":  # the corrected matrix LQER_RANK=4 ranks up, and a new rank-4 correction on each other one
        assert sorted(s.what.split(" LQER rank ")[1] for s in steps) == ["0 -> 4", "0 -> 4", "4 -> 8"]


def test_an_lqer_step_scaled_down_adds_fewer_ranks_and_none_below_one():
    _, _, q, _, steps = proposals("lqer")
    step = next(s for s in steps if s.what.endswith("rank 4 -> 8"))
    half, quarter = step.smaller(0.5), step.smaller(0.26)
    assert half.what.endswith("rank 4 -> 6") and quarter.what.endswith("rank 4 -> 5")
    assert quarter.bytes < half.bytes <= 0.5 * step.bytes and half.error < quarter.error < 0 and half.applies_to(q)
    assert step.smaller(0.2) is None  # one rank is a quarter of four


@pytest.mark.parametrize("lever", ["lqer", "awq"])
def test_a_lever_step_lowers_the_hessian_weighted_output_error_it_predicts(lever):
    hp, model, q, hessians, steps = proposals(lever)
    weights = model.state_dict()

    def error(entry: dict, name: str) -> float:  # tr(ΔW H ΔWᵀ) of the weights a loader would build
        delta = weights[name] - tg.dequantize_entry(entry)
        return torch.trace(delta @ hessians[name] @ delta.T).item()

    for step in steps:
        (name,) = step.after
        back = tg.parse_artifact(tg.serialize_artifact({**q, **step.after}, hp), hp)[name]
        before, after = error(q[name], name), error(back, name)
        assert after < before and step.error == pytest.approx(after - before, rel=1e-3), step.what


@pytest.mark.parametrize("lever, spare, slack", [("lqer", 2000, 500), ("awq", 12000, 3000)])
def test_filler_with_one_lever_lands_under_a_lowered_limit(lever, spare, slack):
    hp, model, q, hessians, base = filler_setup(spare=spare, env=CORRECTED, budget_fill_levers=lever,
                                                budget_fill_slack_bytes=slack)
    fitted, blob, report, lines = fill(hp, model, q, hessians)
    assert report["method"] == "fill" and {d["lever"] for d in report["fill"]} == {lever} and report["knobs"] == {}
    assert len(blob) <= report["target"] and report["hessian_error"] < 0
    # within the slack, or stopped (and said so) with less left than a step costs (lzma: +200...+420 bytes per rank)
    left = report["target"] - len(blob)
    assert left <= slack or (any(line.endswith("; stopping") for line in lines) and left <= 2 * slack)
    sizes_agree_with_decisions(report)
    assert_same_entry(tg.parse_artifact(blob, hp), fitted)
    tries = [line for line in lines if line.startswith("budget_fill: try ")]
    for k, (line, d) in enumerate(zip(tries, report["fill"]), 1):
        assert line.startswith(f"budget_fill: try {k}/{hp.budget_fill_tries}: {lever} {d['step']}: predicted +")
    kept = [d["step"] for d in report["fill"] if d["accepted"]]
    assert all(f"{lever} {step}" in summary(lines) for step in kept)
    now = "".join(line for line in lines if line.startswith("budget_fill: now quantized: "))
    if lever == "lqer":
        ranks = lambda state: sum(tg.lqer_rank(e) for e in state.values() if "codes" in e)
        assert ranks(fitted) == ranks(q) + sum(int(s.split(" -> ")[1]) - int(s.split()[-3]) for s in kept)
        assert all(f"{name} rank {tg.lqer_rank(e)}" in now for name, e in fitted.items() if "lqer" in e)
    else:
        assert all(f"{name}[{start}:" in now for name, e in fitted.items() if "awq" in e for start in e["awq"]["starts"])


def test_each_lever_calibrates_its_own_predicted_bytes(monkeypatch):
    true_size = tg.lqer_bytes
    monkeypatch.setattr(tg, "lqer_bytes", lambda *shape: true_size(*shape) / 3)  # the lqer lever under-predicts 3x
    hp, model, q, hessians, _ = filler_setup(spare=4000, env=CORRECTED, budget_fill_levers="clip,lqer",
                                             budget_fill_tries=4)
    _, _, report, _ = fill(hp, model, q, hessians)
    first, then = report["fill"][0], next((d for d in report["fill"] if d["lever"] == "clip"), None)
    assert first["lever"] == "lqer" and first["measured_bytes"] > 2 * first["predicted_bytes"]
    # lqer's 3x ratio is not applied to the clip lever's entropy prediction (which it would overstate ~3x)
    assert then is not None and 0.5 < then["measured_bytes"] / then["predicted_bytes"] < 2, report["fill"]


def test_the_levers_of_a_switched_off_correction_propose_nothing():
    off = (("LQER_ENABLED", 0), ("AWQ_LITE_ENABLED", 0))
    _, _, q, _, steps = proposals("clip,lqer,awq", off)
    assert steps and {s.lever for s in steps} == {"clip"}
    hp, model, q, hessians, _ = filler_setup(spare=3000, env=off, budget_fill_levers="lqer,awq")
    fitted, blob, report, lines = fill(hp, model, q, hessians)
    assert fitted is q and report["method"] == "none" and lines[0].startswith("budget_fill: no step left")
    assert not any("lqer" in e or "awq" in e for e in fitted.values())


def test_a_clip_step_keeps_a_raised_lqer_rank():
    hp, model, q, hessians, steps = proposals("lqer")
    up = next(s for s in steps if s.what.endswith("rank 4 -> 8"))
    (name,) = up.after
    clip = tg.fill_levers(model, hessians, tg.dataclasses.replace(hp, budget_fill_levers="clip"))[0]
    step = next(s for s in clip({**q, **up.after}, hp) if name in s.after)
    assert tg.lqer_rank(step.after[name]) == 8 and not torch.equal(step.after[name]["codes"], q[name]["codes"])


@pytest.mark.parametrize("env, message", [(dict(BUDGET_FILL_TRIES=0), "BUDGET_FILL_TRIES=0: must be >= 1"),
                                          (dict(BUDGET_FILL_SLACK_BYTES=-1), "BUDGET_FILL_SLACK_BYTES=-1"),
                                          (dict(ARTIFACT_LIMIT_BYTES=5000, BUDGET_MARGIN_BYTES=1000,
                                                BUDGET_FILL_SLACK_BYTES=4000), "BUDGET_FILL_SLACK_BYTES=4000"),
                                          (dict(BUDGET_FILL_LEVERS="clip,rank"), "BUDGET_FILL_LEVERS='clip,rank'"),
                                          (dict(BUDGET_FILL_LEVERS="lqer,lqer"), "must be distinct comma-separated"),
                                          (dict(BUDGET_FILL_LEVERS=" , "), "BUDGET_FILL_LEVERS")])
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
               SLIDING_WINDOW_ENABLED=0, TTT_ENABLED=0, NGRAM_TILT=0, DATA_DIR=tiny_data["root"], COMPRESSOR="pergroup",
               RUN_ID="free")
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
    assert len(re.findall(r"^budget_fill: try \d+/8: (clip|lqer) ", log, re.M)) == len(fit["fill"]) == fit["tries"]
    assert record["metrics"]["post_quant_val_bpb"] != runs["free"]["metrics"]["post_quant_val_bpb"]  # the filled file was read
