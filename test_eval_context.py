"""Tests of the evaluation's long context (EVAL_SEQ_LEN > TRAIN_SEQ_LEN), the compile warm-up of the evaluation
on random tokens, and the eval timer (CPU, the real train_gpt.py)."""

import dataclasses
import math
import re
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import CPU, SCRIPT, eval_setup, every_path, hparams, randomize


# --- long evaluation context ----------------------------------------------------------------------


def test_default_eval_context_is_the_records_2560_after_training_at_2048():
    hp = hparams()
    assert (hp.train_seq_len, hp.eval_seq_len) == (2048, 2560)
    tg.check_config(hp, world_size=8)
    assert tg.micro_batch_seqs(hp.val_batch_tokens, hp.eval_seq_len) == 25
    for targets in (40_540_160, 47_851_520):  # FineWeb and CaseOps: trimming to 2560s keeps every target
        assert targets % 2560 == 0 and targets % 2048 == 0


def test_rotary_table_covers_the_eval_length_and_extends_the_trained_one_unscaled():
    short = tg.GPT(hparams(VOCAB_SIZE=64, NUM_LAYERS=1, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=8,
                           XSA_LAST_N=0, NUM_LOOPS=0, TRAIN_SEQ_LEN=32, EVAL_SEQ_LEN=32))
    long = tg.GPT(hparams(VOCAB_SIZE=64, NUM_LAYERS=1, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=8,
                          XSA_LAST_N=0, NUM_LOOPS=0, TRAIN_SEQ_LEN=32, EVAL_SEQ_LEN=80))
    assert short.rope_cos.shape[0] == 32 and long.rope_cos.shape[0] == 80
    # plain extrapolation: the first 32 positions are the trained ones exactly, later ones continue the same angles
    assert torch.equal(long.rope_cos[:32], short.rope_cos) and torch.equal(long.rope_sin[:32], short.rope_sin)
    cos, sin = tg.rotary_tables(8, 10000.0, 80)
    assert torch.equal(long.rope_cos, cos) and torch.equal(long.rope_sin, sin)


def test_a_model_scores_every_path_at_an_eval_length_past_its_training_length(tiny_data):
    hp, model, val = eval_setup(tiny_data, TRAIN_SEQ_LEN=32)  # EVAL_SEQ_LEN=64
    assert model.rope_cos.shape[0] == 64
    plain, sliding, ttt, hessian = every_path(model, val, hp)
    assert all(math.isfinite(x) for x in (plain, sliding, ttt)) and torch.isfinite(hessian).all()
    trained = tg.score_first_eval(model, val, hp, CPU, epochs=1)  # TTT trains on 64-token sequences too
    assert math.isfinite(trained[1]) and trained[0] != sliding
    # causal attention: a 64-token window's first 32 logits are those of the same 32 tokens alone
    x = torch.from_numpy(val.tokens[None, :64].astype(np.int64))
    with torch.no_grad():
        assert torch.allclose(model.forward_logits(x)[:, :32], model.forward_logits(x[:, :32]), atol=1e-5)


def test_an_artifact_made_at_one_eval_length_scores_at_another(tmp_path):
    base = dict(VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=4, XSA_LAST_N=2,
                NUM_LOOPS=0, TRAIN_SEQ_LEN=32)
    hp_train, hp_eval = hparams(**base, EVAL_SEQ_LEN=32), hparams(**base, EVAL_SEQ_LEN=96)
    torch.manual_seed(0)
    model = tg.GPT(hp_train)
    randomize(model)
    path = tmp_path / "a.ptz"
    path.write_bytes(tg.serialize_artifact(tg.quantize_state(model, {}, hp_train), hp_train))
    loaded = tg.load_artifact(path, hp_eval, CPU)  # the rotary tables are derived, not stored
    assert loaded.rope_cos.shape[0] == 96
    x = torch.randint(0, 512, (1, 96))
    with torch.no_grad():
        assert torch.isfinite(loaded.forward_logits(x)).all()


# --- compile warm-up of the evaluation, and the eval timer -----------------------------------------


def test_warm_up_shapes_follow_each_ranks_share_of_the_stream():
    hp = hparams(EVAL_SEQ_LEN=64, TRAIN_SEQ_LEN=64, VAL_BATCH_TOKENS=8 * 64 * 3, TTT_CHUNK_TOKENS=1024)
    num_tokens = 64 * 50 + 1  # 50 sequences; 3,200 targets = chunks of 1024, 1024, 1024, 128
    rank = lambda r, n: dataclasses.replace(CPU, rank=r, world_size=n)  # noqa: E731
    assert tg.plain_eval_batches(num_tokens, hp, CPU) == [2, 3]  # 16 batches of 3, then 2
    assert tg.plain_eval_batches(num_tokens, hp, rank(1, 4)) == [1, 3]  # sequences 12..24
    assert tg.ttt_step_rows(num_tokens, hp, CPU) == [1, 3]  # 16 starts per trained chunk: 5 x 3, then 1
    assert tg.ttt_step_rows(num_tokens, hp, rank(1, 4)) == [1]  # one of each 3, none of the last 1
    assert tg.ttt_step_rows(num_tokens, hp, rank(0, 4)) == []  # rank 0 only joins the all-reduce


class GuardedTokens(np.ndarray):
    """Validation tokens that raise when read while `state['warming']` (len() stays allowed)."""

    state = {"warming": False}

    def __getitem__(self, key):
        if self.state["warming"]:
            raise AssertionError("the evaluation warm-up read validation tokens")
        return super().__getitem__(key)

    def astype(self, *args, **kwargs):
        if self.state["warming"]:
            raise AssertionError("the evaluation warm-up read validation tokens")
        return super().astype(*args, **kwargs)


def record_entry_points(monkeypatch) -> list:
    """torch.compile runs its argument uncompiled; every call of GPT's compiled entry points is recorded with what
    a compiled graph is guarded on: entry point, train/eval mode, grad mode, loop count, input shapes and strides.
    A compiled module is the module itself (every `forward` counts); a compiled method marks its calls, so eager
    calls of `forward_logits` (phased TTT's global SGD phase) are not recorded."""
    calls, compiled = [], []

    def compile_(fn, **kwargs):
        if isinstance(fn, torch.nn.Module):
            return fn

        def marked(*args):
            compiled.append(True)
            try:
                return fn(*args)
            finally:
                compiled.pop()
        return marked
    monkeypatch.setattr(torch, "compile", compile_)
    for name in ("forward", "forward_logits"):
        real = getattr(tg.GPT, name)

        def entry(self, *args, _real=real, _name=name):
            if compiled or _name == "forward":
                layout = tuple((tuple(a.shape), a.stride()) for a in args)
                calls.append((_name, self.training, torch.is_grad_enabled(), self.loops, layout))
            return _real(self, *args)
        monkeypatch.setattr(tg.GPT, name, entry)
    return calls


def warm_and_timed_calls(tiny_data, tmp_path, monkeypatch, **overrides) -> tuple[list, set, tg.RunLog, str]:
    """evaluate_artifact with a compiling runtime whose torch.compile compiles nothing: the compiled entry points'
    calls made in the warm-up (which must not read a validation token) and while timed, the log and its text."""
    hp, model, val = eval_setup(tiny_data, **overrides)
    path = tmp_path / "a.ptz"
    path.write_bytes(tg.serialize_artifact(tg.quantize_state(model, {}, hp), hp))
    monkeypatch.chdir(tmp_path)
    rt = dataclasses.replace(CPU, compile=True)
    log = tg.RunLog(hp, rt, "code")
    calls = record_entry_points(monkeypatch)
    guarded = val.tokens.view(GuardedTokens)
    val = tg.Validation(guarded, val.bytes)
    real_warm_up, warm_calls = tg.warm_up_eval, []

    def warm_up(*args):
        assert not any(isinstance(a, np.ndarray) for a in args)
        GuardedTokens.state["warming"] = True
        try:
            real_warm_up(*args)
        finally:
            GuardedTokens.state["warming"] = False
        warm_calls.extend(calls)
        calls.clear()
    monkeypatch.setattr(tg, "warm_up_eval", warm_up)
    GuardedTokens.state["warming"] = True
    with pytest.raises(AssertionError, match="read validation tokens"):  # the guard does guard
        guarded[:5]
    GuardedTokens.state["warming"] = False
    tg.evaluate_artifact(path, val, 0.0, hp, rt, log)
    return warm_calls, set(calls), log, (tmp_path / "logs" / f"{hp.run_id}.txt").read_text()


def test_warm_up_runs_every_shape_the_timed_evaluation_runs_on_random_tokens(tiny_data, tmp_path, monkeypatch):
    warm_calls, timed, _, _ = warm_and_timed_calls(tiny_data, tmp_path, monkeypatch, VAL_BATCH_TOKENS=8 * 64 * 3,
                                                TTT_ENABLED=1, EVAL_LOOPS="0", NGRAM_TILT=1)
    assert warm_calls and timed and timed <= set(warm_calls)
    assert {c[0] for c in timed} == {"forward", "forward_logits"} and {c[1] for c in timed} == {False, True}
    assert len({c[4] for c in timed if c[0] == "forward" and not c[1]}) == 2  # plain eval: full batch and tail
    assert {c[4][0][1] for c in timed if c[1]} == {(65, 1)}  # TTT's inputs are slices of 65-token rows
    assert {c[3] for c in timed} == {0, 1}  # EVAL_LOOPS=0 and NUM_LOOPS=1


def test_warm_up_runs_every_shape_of_phased_ttt_and_the_timer_counts_each_logged_phase(tiny_data, tmp_path,
                                                                                        monkeypatch):
    warm_calls, timed, log, text = warm_and_timed_calls(
        tiny_data, tmp_path, monkeypatch, TTT_ENABLED=1, TTT_MODE="phased", TTT_EVAL_SEQ_LEN=64, TTT_CHUNK_SIZE=8,
        TTT_BATCH_SIZE=16, TTT_LORA_RANK=4, PHASED_TTT_PREFIX_DOCS=20, SLIDING_WINDOW_ENABLED=0, EVAL_LOOPS="0")
    assert timed and timed <= set(warm_calls)
    phased = {c for c in timed if c[0] == "forward_logits"}  # the plain score is `forward`; phased TTT is all of these
    assert {c[1:4] for c in phased} == {(False, True, 1)}  # eval mode, grad on (the adapters), NUM_LOOPS=1
    # 100 documents in batches of 16: 6 of 16 and one of 4; windows padded to 8, 16, 32 or 64 tokens
    assert {c[4][0][0] for c in phased} == {(16, w) for w in (8, 16, 32, 64)} | {(4, w) for w in (8, 16, 32, 64)}
    assert "phased TTT documents [4, 16] x widths [8, 16, 32, 64]" in text
    assert not {c for c in warm_calls if c[0] == "forward" and c[1]}  # no full-TTT step warmed: it does not run
    # one line per segment and per global phase, each with its time, all inside the timed ttt_eval
    lines = re.findall(r"^phased_ttt: (segment 1: 20 documents in 2 batches|global phase 1: SGD on the first 20 "
                       r"documents \(\d+ targets, \d+ steps\)|segment 2: 80 documents in 5 batches)\D* in (\d+)ms$",
                       text, re.M)
    assert [line[0][:9] for line in lines] == ["segment 1", "global ph", "segment 2"]
    metrics = log.result["metrics"]
    assert sum(int(ms) for _, ms in lines) <= metrics["ttt_eval_ms"]
    assert metrics["eval_total_ms"] == sum(metrics[k] for k in tg.SCORED_EVAL_PHASES if k in metrics)
    assert "ttt_eval_ms" in metrics and metrics["eval_graphs_compiled"] == 0
    checks = tg.compliance(dict(log.result, train_plus_gptq_ms=0, total_bytes=0))
    assert checks["eval_ms"] == metrics["eval_total_ms"] and checks["eval_under_600s"]


def test_eval_timer_counts_artifact_loads_and_every_scored_phase(tiny_data, tmp_path, monkeypatch):
    hp, model, val = eval_setup(tiny_data, TTT_ENABLED=1, EVAL_LOOPS="0", NGRAM_TILT=1)
    path = tmp_path / "a.ptz"
    path.write_bytes(tg.serialize_artifact(tg.quantize_state(model, {}, hp), hp))
    monkeypatch.chdir(tmp_path)
    log = tg.RunLog(hp, CPU, "code")
    tg.evaluate_artifact(path, val, 0.0, hp, CPU, log)
    text = (tmp_path / "logs" / f"{hp.run_id}.txt").read_text()
    assert "eval_warmup: skipped (COMPILE off, nothing to compile)" in text
    metrics = log.result["metrics"]
    counted = [k for k in tg.SCORED_EVAL_PHASES if k in metrics]
    assert counted == list(tg.SCORED_EVAL_PHASES)  # every phase ran, each logged as it ended
    for label in ("artifact_load", "ttt_reload"):
        assert re.search(rf"^{label}: \S+ read, decompressed and loaded in {metrics[label + '_ms']}ms$", text, re.M)
    total = sum(metrics[k] for k in counted)
    assert "loops0_eval_ms" in metrics and metrics["eval_total_ms"] == total
    assert re.search(rf"^eval_total: {total}ms of 600000ms \(artifact_load \d+, post_quant_eval \d+, ngram_hint \d+, "
                     rf"sliding_eval \d+, ttt_reload \d+, ttt_eval \d+\); 0 graph\(s\) compiled inside the timed "
                     rf"evaluation$", text, re.M)
    checks = tg.compliance(dict(log.result, train_plus_gptq_ms=0, total_bytes=0))
    assert checks["eval_ms"] == total and checks["eval_under_600s"]


def test_the_record_packager_recomputes_eval_time_over_the_same_phases():
    sys.path.insert(0, str(SCRIPT.parent / "tools"))
    import package_record

    assert package_record.EVAL_PHASES == tg.SCORED_EVAL_PHASES
