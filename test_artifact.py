"""Tests of quantization, the artifact and post-quantization evaluation (CPU, the real train_gpt.py)."""

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import E2E, SCRIPT, hparams, randomize, run_script, small_model

CPU = tg.Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), distributed=False,
                 attn_backend="sdpa", compile=False, activation_dtype=torch.float32)


# --- quantization --------------------------------------------------------------------------------


def test_round_to_nearest_error_within_the_clip_bound():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    w[0, 0] = 5.0  # an outlier far past the clip
    codes, scale = tg.gptq_quantize(w, None, bits=6, clip_sigmas=3.0)
    step = scale.float()[:, None]
    deq = tg.dequantize(codes, scale)
    inside = w.abs() <= 31 * step
    assert ((w - deq).abs()[inside] <= step.expand_as(w)[inside] / 2 + 1e-7).all()
    assert deq[0, 0] == pytest.approx(31 * step[0, 0].item())  # clipped to the largest code
    assert (~inside).sum() >= 1


def test_gptq_with_identity_hessian_is_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    rtn = tg.gptq_quantize(w, None, 6, 12.85)
    gptq = tg.gptq_quantize(w, torch.eye(128), 6, 12.85)
    assert torch.equal(rtn[0], gptq[0]) and torch.equal(rtn[1], gptq[1])


def test_gptq_reduces_output_error_on_correlated_inputs():
    torch.manual_seed(0)
    mixing = torch.randn(128, 128) / 8 + torch.eye(128)
    x = torch.randn(4096, 128) @ mixing  # correlated input features
    x[:, 5] = 0  # a dead column
    w = torch.randn(64, 128)
    h = x.T @ x / len(x)
    rtn = tg.dequantize(*tg.gptq_quantize(w, None, 4, 6.0))
    codes, scale = tg.gptq_quantize(w, h, 4, 6.0)
    gptq = tg.dequantize(codes, scale)
    err = lambda q: ((x @ (w - q).T) ** 2).mean().item()
    assert err(gptq) < 0.7 * err(rtn)
    assert (codes[:, 5] == 0).all()


@pytest.mark.parametrize("bits", [6, 8])
def test_codes_stay_inside_their_range(bits):
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 96)  # wildly different column scales
    x = torch.randn(512, 96)
    codes, _ = tg.gptq_quantize(w, x.T @ x, bits, 1.0)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and codes.abs().max() == qmax


def quantized_model(**overrides):
    hp = hparams(**{**dict(VOCAB_SIZE=512, NUM_LAYERS=3, MODEL_DIM=160, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=8,
                           NUM_LOOPS=1, LOOP_START=1, LOOP_END=1, XSA_LAST_N=3, TRAIN_SEQ_LEN=16, EVAL_SEQ_LEN=16),
                        **overrides})
    torch.manual_seed(0)
    model = tg.GPT(hp)
    randomize(model)
    return hp, model, tg.quantize_state(model, {}, hp)


def test_which_tensors_are_quantized_and_how():
    hp, model, q = quantized_model()
    assert q["tok_emb.weight"]["bits"] == 8 and q["tok_emb.weight"]["codes"].abs().max() <= 127  # 512 x 160
    assert q["blocks.0.mlp.fc.weight"]["bits"] == 6 and q["blocks.0.mlp.fc.weight"]["codes"].abs().max() <= 31
    assert "fp16" in q["blocks.0.attn.c_q.weight"]  # 160 x 160 = 25,600 values <= 65,536: passthrough
    for name in ("mix_logits", "attn_step_scales", "mlp_step_scales", "skip_weights", "skip_gates", "blocks.0.attn.q_gain"):
        assert q[name]["fp16"].dtype == torch.float16, name


def test_artifact_round_trip_is_exact():
    hp, model, q = quantized_model()
    blob = tg.serialize_artifact(q, hp)
    back = tg.dequantize_state(tg.parse_artifact(blob, hp))
    expected = tg.dequantize_state(q)
    assert back.keys() == expected.keys() == model.state_dict().keys()
    for name in expected:
        assert torch.equal(back[name], expected[name]), name


def test_artifact_loads_strictly_into_a_fresh_model(tmp_path):
    hp, model, q = quantized_model()
    path = tmp_path / "a.ptz"
    path.write_bytes(tg.serialize_artifact(q, hp))
    loaded = tg.load_artifact(path, hp, CPU)
    for name, t in tg.dequantize_state(q).items():
        assert torch.equal(loaded.state_dict()[name], t)


@pytest.mark.parametrize("compressor", ["brotli", "lzma"])
def test_corrupted_and_truncated_artifacts_fail_clearly(compressor):
    hp, _, q = quantized_model(COMPRESSOR=compressor)
    blob = tg.serialize_artifact(q, hp)
    with pytest.raises(tg.ArtifactError, match="truncated or corrupted"):
        tg.parse_artifact(blob[:len(blob) // 2], hp)
    flipped = bytearray(blob)
    flipped[len(blob) * 3 // 4] ^= 0x40
    with pytest.raises(tg.ArtifactError, match="corrupted"):
        tg.parse_artifact(bytes(flipped), hp)
    with pytest.raises(tg.ArtifactError, match="not a model artifact"):
        tg.parse_artifact(b"PK\x03\x04" + blob[4:], hp)
    header = b"{}"
    empty = tg.ARTIFACT_MAGIC + bytes([len(compressor)]) + compressor.encode() + tg.compress(
        len(header).to_bytes(4, "little") + header, compressor)
    with pytest.raises(tg.ArtifactError, match="lacks its architecture"):
        tg.parse_artifact(empty, hp)


def test_artifact_for_another_shape_is_refused(tmp_path):
    hp, _, q = quantized_model()
    path = tmp_path / "a.ptz"
    path.write_bytes(tg.serialize_artifact(q, hp))
    other = tg.dataclasses.replace(hp, num_layers=4, output_ln=False)
    with pytest.raises(tg.ArtifactError, match=r"another model: NUM_LAYERS=3 \(this run: 4\), OUTPUT_LN=True"):
        tg.load_artifact(path, other, CPU)
    with pytest.raises(tg.ArtifactError, match="does not exist"):
        tg.load_artifact(tmp_path / "missing.ptz", hp, CPU)


def test_byte_planes_round_trip():
    data = np.arange(1000, dtype=np.float16).tobytes()
    planes = tg.byte_planes(data, 2)
    assert planes != data and tg.from_byte_planes(planes, 2) == data


# --- sliding window and score-first TTT ----------------------------------------------------------


@pytest.mark.parametrize("n, seq_len, stride", [(1000, 64, 16), (1000, 64, 64), (64, 64, 8), (65, 64, 64), (999, 50, 7)])
def test_sliding_windows_score_every_target_once(n, seq_len, stride):
    scored = []
    for w in tg.sliding_windows(n, seq_len, stride):
        assert 0 < w.length <= seq_len and w.start + w.length <= n
        assert w.first == 0 or w.first == seq_len - stride  # full left context after the first window
        scored += range(w.start + w.first, w.start + w.length)
    assert sorted(scored) == list(range(n))


def eval_setup(tiny_data, **overrides):
    env = dict(DATA_DIR=tiny_data["root"], VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1,
               ROPE_DIMS=4, XSA_LAST_N=2, NUM_LOOPS=1, LOOP_START=0, LOOP_END=0, EVAL_SEQ_LEN=64, TRAIN_SEQ_LEN=64,
               VAL_BATCH_TOKENS=8 * 64 * 4, EVAL_STRIDE=16, TTT_CHUNK_TOKENS=1024, TTT_EPOCHS=1, TTT_LR=0.05)
    hp = hparams(**{**env, **overrides})
    torch.manual_seed(0)
    model = tg.GPT(hp)
    randomize(model)
    val = tg.Validation(tg.load_validation_tokens(hp), tg.byte_counts(tiny_data["sp"]))
    return hp, model, val


def test_sliding_window_at_stride_equal_window_is_the_plain_evaluation(tiny_data):
    hp, model, val = eval_setup(tiny_data, EVAL_STRIDE=64)
    plain = tg.evaluate(model, val, hp, CPU)
    sliding = tg.score_first_eval(model, val, hp, CPU, epochs=0)
    assert sliding == pytest.approx(plain, rel=1e-6)  # fp32 batch means vs per-token sums


def test_sliding_window_nll_sum_equals_direct_per_token_computation(tiny_data):
    hp, model, val = eval_setup(tiny_data)
    tokens = torch.from_numpy(val.tokens.astype(np.int64))
    total, count = 0.0, 0
    with torch.no_grad():  # direct: each target scored once, from its window's context
        for w in tg.sliding_windows(len(tokens) - 1, 64, 16):
            logits = model.forward_logits(tokens[None, w.start:w.start + w.length])[0]
            nll = torch.nn.functional.cross_entropy(logits, tokens[w.start + 1:w.start + w.length + 1], reduction="none")
            total += nll[w.first:].double().sum().item()
            count += w.length - w.first
    loss, _ = tg.score_first_eval(model, val, hp, CPU, epochs=0)
    assert count == len(tokens) - 1
    assert loss == pytest.approx(total / count, rel=1e-6)


def test_ttt_never_trains_on_a_token_before_scoring_it(tiny_data):
    hp, model, val = eval_setup(tiny_data)
    scored, trained, events = set(), set(), []

    def observer(kind, positions):
        events.append(kind)
        if kind == "score":
            assert not scored & set(positions), "a token was scored twice"
            scored.update(positions)
        else:
            assert set(positions) <= scored, "trained on a token before scoring it"
            trained.update(positions)

    before = [p.detach().clone() for p in model.parameters()]
    ttt = tg.score_first_eval(model, val, hp, CPU, epochs=2, observer=observer)
    assert scored == set(range(1, len(val.tokens)))
    assert trained and max(trained) < (len(val.tokens) - 1) // 1024 * 1024 + 1  # the last chunk is never trained on
    assert events.count("train") > 1 and events[0] == "score"
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(math.isfinite(v) for v in ttt)


def test_ttt_with_zero_epochs_equals_sliding_window(tiny_data):
    hp, model, val = eval_setup(tiny_data, TTT_EPOCHS=0)
    before = [p.detach().clone() for p in model.parameters()]
    sliding = tg.score_first_eval(model, val, hp, CPU, epochs=0)
    assert tg.score_first_eval(model, val, hp, CPU, epochs=hp.ttt_epochs) == sliding
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert tg.score_first_eval(model, val, hp, CPU, epochs=1) != sliding  # training does change the score


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_artifact_and_post_quant_scores(tiny_data, tmp_path):
    env = dict(E2E, DATA_DIR=tiny_data["root"], RUN_ID="art", SEED=3, MAX_WALLCLOCK_SECONDS=20,
               GPTQ_RESERVE_SECONDS=2, GPTQ_CALIBRATION_BATCHES=4, EVAL_STRIDE=32, TTT_ENABLED=1, TTT_EPOCHS=1,
               TTT_CHUNK_TOKENS=2048)
    result = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         str(SCRIPT)], env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "logs" / "art.txt").read_text()
    artifact = tmp_path / "final_model.int6.ptz"
    assert f"Serialized model quantized+brotli: {artifact.stat().st_size} bytes" in log
    code_bytes = tg.counted_code(SCRIPT.read_text()).size  # the minified wrapper a submission would be
    assert f"Code size: {code_bytes} bytes" in log
    assert f"Total submission size quantized+brotli: {artifact.stat().st_size + code_bytes} bytes" in log
    assert re.search(r"^GPTQ:collected \d+ Hessians in [\d.]+s$", log, re.M)
    scores = {}
    for label in ("pre-quantization post-ema", "quantized", "quantized_sliding_window", "quantized_ttt"):
        m = re.search(rf"^{label} val_loss:(\d+\.\d{{8}}) val_bpb:(\d+\.\d{{8}}) eval_time:\d+ms$", log, re.M)
        assert m, label
        scores[label] = float(m.group(2))
    assert abs(scores["quantized"] - scores["pre-quantization post-ema"]) < 0.05
    record = json.loads((tmp_path / "logs" / "art.json").read_text())
    metrics = record["metrics"]
    assert record["status"] == "completed" and record["artifact_over_budget"] is False
    assert record["artifact_bytes"] == artifact.stat().st_size and record["code_bytes"] == code_bytes
    assert metrics["quantization_gap_bpb"] == pytest.approx(scores["quantized"] - scores["pre-quantization post-ema"], abs=1e-7)
    assert metrics["ttt_val_bpb"] == pytest.approx(scores["quantized_ttt"], abs=1e-8)
    for key in ("pre_quant_eval_ms", "post_quant_eval_ms", "sliding_eval_ms", "ttt_eval_ms", "gptq_hessian_s", "gptq_quantize_s"):
        assert key in metrics or key in record, key


def test_over_budget_artifact_is_an_error_after_evaluation(tiny_data, tmp_path, monkeypatch, capsys):
    # Compressing a real >16 MB artifact takes minutes on CPU, so the limit is lowered instead.
    monkeypatch.setattr(tg, "SUBMISSION_LIMIT_BYTES", 50_000)
    monkeypatch.chdir(tmp_path)
    small = dict(VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=8, NUM_LOOPS=0,
                 XSA_LAST_N=0, TRAIN_SEQ_LEN=32, EVAL_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256, VAL_BATCH_TOKENS=256 * 8,
                 ITERATIONS=1, WARMUP_STEPS=0, MAX_WALLCLOCK_SECONDS=0, GPTQ_CALIBRATION_BATCHES=1,
                 SLIDING_WINDOW_ENABLED=0, DATA_DIR=tiny_data["root"])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for allowed, run_id in ((0, "big"), (1, "big_ok")):
        for key, value in dict(small, RUN_ID=run_id, ALLOW_OVER_BUDGET=allowed).items():
            monkeypatch.setenv(key, str(value))
        if allowed:
            tg.main()  # an exploratory run: no error
        else:
            with pytest.raises(SystemExit) as exit_info:
                tg.main()
            assert "over 50000 bytes" in str(exit_info.value.code) and "ALLOW_OVER_BUDGET=1" in str(exit_info.value.code)
        log = (tmp_path / "logs" / f"{run_id}.txt").read_text()
        assert "ERROR: ARTIFACT OVER BUDGET" in log and re.search(r"^quantized val_loss:", log, re.M)
        record = json.loads((tmp_path / "logs" / f"{run_id}.json").read_text())
        assert record["artifact_over_budget"] is True and record["total_bytes"] > 50_000
        assert record["status"] == ("completed" if allowed else "over_budget")
