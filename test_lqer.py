"""Tests of the LQER and AWQ-lite corrections of GPTQ (issue 14; CPU, the real train_gpt.py)."""

import pytest
import torch

import train_gpt as tg
from conftest import CPU, hparams, randomize

SHAPE = dict(VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=160, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=8, NUM_LOOPS=1,
             LOOP_START=1, LOOP_END=1, XSA_LAST_N=2, PARALLEL_START_LAYER=-1, TRAIN_SEQ_LEN=16, EVAL_SEQ_LEN=16)


def calibrated(**overrides):
    """A randomized 2-layer model (tok_emb, mlp.fc and mlp.proj are GPTQ'd), its Hessians from random tokens,
    and its quantized state with AWQ-lite and LQER both on unless overridden."""
    hp = hparams(**{**SHAPE, "AWQ_LITE_ENABLED": 1, **overrides})
    torch.manual_seed(0)
    model = tg.GPT(hp)
    randomize(model)
    with model.looping(hp.num_loops):
        hessians = tg.collect_hessians(model, [torch.randint(0, 512, (4, 16)) for _ in range(2)], CPU)
    return hp, model, hessians, tg.quantize_state(model, hessians, hp)


def weighted_error(error: torch.Tensor, hessian: torch.Tensor) -> float:
    return torch.trace(error @ hessian @ error.T).item()


def test_corrections_are_where_the_knobs_say():
    hp, _, hessians, q = calibrated(AWQ_LITE_GROUP_TOP_K=2, LQER_TOP_K=2, LQER_RANK=3)
    lqer = [name for name, e in q.items() if "lqer" in e]
    awq = [(name, start) for name, e in q.items() if "awq" in e for start in e["awq"]["starts"]]
    assert len(lqer) == 2 and set(lqer) <= hessians.keys()
    assert all(q[name]["lqer"]["a_codes"].shape[1] == 3 for name in lqer)
    assert len(awq) == 2 and all(start % 64 == 0 for _, start in awq)
    off = tg.quantize_state(*calibrated(LQER_ENABLED=0, AWQ_LITE_ENABLED=0)[1:3], hparams(**SHAPE, LQER_ENABLED=0))
    assert not any("lqer" in e or "awq" in e for e in off.values())
    assert not any("lqer" in e or "awq" in e for e in tg.quantize_state(calibrated()[1], {}, hp).values())  # no Hessians


@pytest.mark.parametrize("compressor", tg.COMPRESSORS)
def test_round_trip_is_exact_for_lqer_factors_and_awq_groups(compressor, tmp_path):
    hp, _, _, q = calibrated(COMPRESSOR=compressor, LQER_ASYM_GROUP=48)  # 48 does not divide rank × cols: a short last group
    assert any("lqer" in e for e in q.values()) and any("awq" in e for e in q.values())
    blob = tg.serialize_artifact(q, hp)
    back = tg.parse_artifact(blob, hp)
    for name, stored in q.items():
        for key in ("awq", "lqer"):
            assert (key in stored) == (key in back[name]), (name, key)
            for field, value in stored.get(key, {}).items():
                got = back[name][key][field]
                assert (torch.equal(got, value) and got.dtype == value.dtype if torch.is_tensor(value)
                        else got == value), (name, key, field)
    path = tmp_path / "a.ptz"
    path.write_bytes(blob)
    loaded = tg.load_artifact(path, hp, CPU).state_dict()
    for name, t in tg.dequantize_state(q).items():
        assert torch.equal(loaded[name], t), name


def test_lqer_is_folded_into_the_loaded_weights(tmp_path):
    hp, _, _, q = calibrated(AWQ_LITE_ENABLED=0, LQER_ASYM_GROUP=32)
    path = tmp_path / "a.ptz"
    path.write_bytes(tg.serialize_artifact(q, hp))
    loaded = tg.load_artifact(path, hp, CPU).state_dict()
    for name, e in q.items():
        if "lqer" in e:
            f = e["lqer"]
            a = f["a_codes"].float() * f["a_scale"].float()
            b = f["b_codes"].float().flatten() * f["b_scale"].float().repeat_interleave(32)[:f["b_codes"].numel()]
            expected = tg.dequantize(e["codes"], e["scale"]) + a @ b.view(f["b_codes"].shape)
            assert torch.allclose(loaded[name], expected, atol=1e-6), name
            assert not torch.allclose(loaded[name], tg.dequantize(e["codes"], e["scale"]), atol=1e-6), name


def test_lqer_reduces_the_hessian_weighted_error_of_the_chosen_tensors():
    hp, model, hessians, q = calibrated(AWQ_LITE_ENABLED=0)
    plain = tg.quantize_state(model, hessians, tg.dataclasses.replace(hp, lqer_enabled=False))
    weights = model.state_dict()
    chosen = [name for name, e in q.items() if "lqer" in e]
    assert len(chosen) == 3
    for name in chosen:
        before = weighted_error(weights[name] - tg.dequantize_entry(plain[name]), hessians[name])
        after = weighted_error(weights[name] - tg.dequantize_entry(q[name]), hessians[name])
        assert after < 0.98 * before, (name, before, after)
        assert torch.equal(q[name]["codes"], plain[name]["codes"])  # the correction leaves GPTQ's codes alone


def test_selection_is_by_error_removed_per_byte_not_by_error_norm():
    """`noise` (like the embedding: the biggest matrix, the biggest error) is full-rank: rank 4 removes more of
    its error in total, but little per byte. `structured` has a smaller, rank-2 error that rank 4 nearly removes."""
    torch.manual_seed(0)
    structured = torch.randn(256, 2) @ torch.randn(2, 128)
    weights = {"noise": torch.randn(2048, 128), "structured": structured * 90 / structured.norm()}
    quantized = {name: dict(codes=torch.zeros(w.shape, dtype=torch.int8), scale=torch.ones(len(w)).half(), bits=6)
                 for name, w in weights.items()}  # everything rounded to 0: the error is the weight itself
    hessians = {name: torch.eye(128) for name in weights}
    assert weights["noise"].norm() > 5 * weights["structured"].norm()
    candidates = tg.lqer_candidates(quantized, weights, hessians, rank=4, group=32)
    assert [c["name"] for c in candidates] == ["structured", "noise"]
    assert candidates[1]["reduction"] > candidates[0]["reduction"]  # noise loses although it removes more in total
    chosen = tg.add_lqer(quantized, weights, hessians, top_k=1, rank=4, group=32)
    assert "lqer" in chosen["structured"] and "lqer" not in chosen["noise"]
    left = weights["structured"] - tg.dequantize_entry(chosen["structured"])
    assert left.norm() < 0.5 * weights["structured"].norm()


def test_lqer_bytes_counts_two_and_four_bit_codes_and_the_scales():
    assert tg.lqer_bytes(8192, 512, 4, 32) == (8192 * 4 * 2 + 4 * 512 * 4) // 8 + 2 * (1 + 64)
    assert tg.lqer_bytes(10, 10, 1, 3) == (20 + 40) // 8 + 2 * (1 + 4)  # a short last group still has a scale


def test_awq_lite_picks_the_salient_group_and_codes_it_finer():
    torch.manual_seed(0)
    hp = hparams(**SHAPE, AWQ_LITE_ENABLED=1, AWQ_LITE_GROUP_SIZE=32)
    weights = {"a.weight": torch.randn(600, 128), "b.weight": torch.randn(600, 128)}  # > 65,536 values: GPTQ
    act = torch.ones(128)
    act[64:96] = 4.0  # the inputs of b's columns 64..95 are 4x larger
    hessians = {"a.weight": torch.eye(128), "b.weight": torch.diag(act ** 2)}
    assert tg.awq_lite_groups(weights, hessians, hp) == {"b.weight": [64]}
    entry = tg.quantize_matrix("b.weight", weights["b.weight"], hessians["b.weight"], hp, [64])
    codes, fine = entry["codes"], torch.zeros(128, dtype=torch.bool)
    fine[64:96] = True
    assert codes[:, ~fine].abs().max() <= 31 and codes[:, fine].abs().max() > 31 and codes[:, fine].abs().max() <= 127
    plain = tg.quantize_matrix("b.weight", weights["b.weight"], hessians["b.weight"], hp, [])
    err = lambda e: (weights["b.weight"] - tg.dequantize_entry(e))[:, fine].abs().mean().item()
    assert err(entry) < 0.25 * err(plain)
    assert weighted_error(weights["b.weight"] - tg.dequantize_entry(entry), hessians["b.weight"]) < weighted_error(
        weights["b.weight"] - tg.dequantize_entry(plain), hessians["b.weight"])


@pytest.mark.parametrize("compressor", tg.COMPRESSORS)
def test_corrupted_and_truncated_artifacts_with_corrections_fail_clearly(compressor):
    hp, _, _, q = calibrated(COMPRESSOR=compressor)
    blob = tg.serialize_artifact(q, hp)
    with pytest.raises(tg.ArtifactError, match="truncated or corrupted"):
        tg.parse_artifact(blob[:len(blob) - 100], hp)
    flipped = bytearray(blob)
    flipped[len(blob) * 3 // 4] ^= 0x40
    with pytest.raises(tg.ArtifactError, match="corrupted"):
        tg.parse_artifact(bytes(flipped), hp)


@pytest.mark.parametrize("fields", [dict(lqer=dict(rank=2, group=32, a_codes=[0, 3])),  # 3 of the 8 left codes
                                    dict(lqer=dict(rank=1, group=4, a_codes=[0, 4], a_scale=[0, 2], b_codes=[0, 8],
                                                   b_scale=[0, 2])),  # 1 scale for 2 groups of the right factor
                                    dict(awq=dict(starts=[0], size=4, bits=8, scale=[0, 6]))])  # 3 scales for 4 rows
def test_a_malformed_correction_entry_is_an_artifact_error(fields):
    e = dict(name="w", shape=[4, 8], **fields)
    with pytest.raises(tg.ArtifactError, match="corrections of w are malformed"):
        tg.read_corrections(e, lambda span: bytes(span[1]))


@pytest.mark.parametrize("env, message", [(dict(LQER_RANK=0), "LQER_RANK=0: must be >= 1"),
                                          (dict(LQER_TOP_K=-1), "LQER_TOP_K=-1: must be >= 0"),
                                          (dict(LQER_ASYM_GROUP=0), "LQER_ASYM_GROUP=0: must be >= 1"),
                                          (dict(AWQ_LITE_BITS=9), "AWQ_LITE_BITS=9: must be in 2..8"),
                                          (dict(AWQ_LITE_GROUP_SIZE=0), "AWQ_LITE_GROUP_SIZE=0: must be >= 1")])
def test_correction_knobs_are_checked(env, message):
    with pytest.raises(tg.ConfigError, match=message):
        tg.check_config(hparams(**env), world_size=1)


def test_matrices_stored_as_fp16_get_no_corrections():
    """The head's Hessian is collected even when the embedding is small enough to be stored as fp16."""
    hp, model, hessians, q = calibrated(MODEL_DIM=64, MLP_MULT=2)  # 512 x 64 embedding, 128 x 64 MLP: all fp16
    assert "tok_emb.weight" in hessians and "fp16" in q["tok_emb.weight"]
    assert not any("lqer" in e or "awq" in e for e in q.values())
