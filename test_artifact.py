"""Tests of quantization, the artifact and post-quantization evaluation (CPU, the real train_gpt.py)."""

import hashlib
import json
import math
import re
import sys

import brotli
import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import CPU, E2E, SCRIPT, eval_setup, hparams, randomize, run_script



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


@pytest.mark.parametrize("bits", [6, 7, 8])
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
    assert q["tok_emb.weight"]["bits"] == 7 and q["tok_emb.weight"]["codes"].abs().max() <= 63  # 512 x 160
    assert q["blocks.0.mlp.fc.weight"]["bits"] == 6 and q["blocks.0.mlp.fc.weight"]["codes"].abs().max() <= 31
    assert "fp16" in q["blocks.0.attn.c_q.weight"]  # 160 x 160 = 25,600 values <= 65,536: passthrough
    for name in ("blocks.0.attn.attn_gate_w", "smear_gate_w"):  # GATED_ATTN_QUANT_GATE=1 by default
        assert q[name]["bits"] == 8 and q[name]["codes"].dtype == torch.int8 and q[name]["scale"].dtype == torch.float16
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


@pytest.mark.parametrize("compressor", tg.COMPRESSORS)
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


def test_pergroup_round_trip_is_exact_for_every_storage_kind():
    hp, _, q = quantized_model(COMPRESSOR="pergroup", MATRIX_BITS=5)
    q["blocks.1.mlp.fc.weight"]["codes"].zero_()  # one symbol in a tensor
    q["smear_gate_w"]["codes"].zero_()  # one symbol in a whole group (a gate at its zero init)
    q["tok_emb.weight"]["codes"][0, :2] = torch.tensor([-63, 63], dtype=torch.int8)  # the extreme int7 codes
    q["blocks.0.attn.attn_gate_w"]["codes"][0, :2] = torch.tensor([-127, 127], dtype=torch.int8)  # and int8 ones
    kinds = {("int", q[n]["bits"]) if "codes" in q[n] else ("fp16", None) for n in q}
    assert kinds == {("int", 7), ("int", 8), ("int", 5), ("fp16", None)}  # int7 embedding, int8 gate rows
    blob = tg.serialize_artifact(q, hp)
    assert blob[5:5 + blob[4]] == b"pergroup"
    back = tg.parse_artifact(blob, hp)
    assert back.keys() == q.keys()
    for name, stored in q.items():
        for key, value in stored.items():
            assert (torch.equal(back[name][key], value) and back[name][key].dtype == value.dtype
                    if torch.is_tensor(value) else back[name][key] == value), (name, key)


def test_pergroup_codes_one_group_per_role_and_beats_brotli():
    hp, _, q = quantized_model(COMPRESSOR="pergroup")
    brotli_bytes = len(tg.serialize_artifact(q, tg.dataclasses.replace(hp, compressor="brotli")))
    blob = tg.serialize_artifact(q, hp)
    tables, _, _, _ = tg.unpack_pergroup(blob[5 + blob[4]:])
    assert [t["role"] for t in tables] == ["smear_gate_w", "tok_emb.weight", "attn.attn_gate_w", "mlp.fc.weight",
                                           "mlp.proj.weight"]
    assert len(blob) < brotli_bytes


def structured_codes(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int7 codes, fp16 row scales) whose width grows with the row's scale and differs a lot between columns,
    as on a trained embedding: the row and the column classes should both pay."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, generator=g) + 0.5
    col_width = torch.logspace(-0.5, 1.2, cols)[torch.randperm(cols, generator=g)]
    width = col_width[None, :] * scale[:, None] ** 2
    codes = torch.clamp(torch.round(torch.randn(rows, cols, generator=g) * width), -63, 63).to(torch.int8)
    return codes, scale.half()


def test_pergroup_row_and_column_classes_pay_where_the_codes_have_them():
    hp, _, q = quantized_model(COMPRESSOR="pergroup")
    codes, scale = structured_codes(*q["tok_emb.weight"]["codes"].shape, seed=1)
    q["tok_emb.weight"].update(codes=codes, scale=scale)
    blob = tg.serialize_artifact(q, hp)
    tables = {t["role"]: t for t in tg.unpack_pergroup(blob[5 + blob[4]:])[0]}
    assert tables["tok_emb.weight"]["row_classes"] > 1 and tables["tok_emb.weight"]["col_classes"] > 1
    assert (tables["mlp.fc.weight"]["row_classes"], tables["mlp.fc.weight"]["col_classes"]) == (1, 1)  # iid codes
    assert tables["tok_emb.weight"]["scale_shift"] > 0  # 512 scales spread over ~1,000 fp16 values: low bits raw
    back = tg.parse_artifact(blob, hp)
    for name in ("tok_emb.weight", "blocks.0.mlp.fc.weight", "smear_gate_w"):
        assert torch.equal(back[name]["codes"], q[name]["codes"]) and torch.equal(back[name]["scale"], q[name]["scale"])
    order0 = tg.dataclasses.replace(hp, compressor="pergroup")
    with pytest.MonkeyPatch.context() as mp:  # the same artifact with the contexts switched off
        mp.setattr(tg, "ROW_CLASSES_MAX", 1)
        mp.setattr(tg, "COL_CLASSES_MAX", 1)
        assert len(tg.serialize_artifact(q, order0)) > len(blob) + 1000


def test_pergroup_class_choice_counts_the_histograms():
    """Per-class histograms cost bytes: on iid codes no split pays, whatever the maxima."""
    rng = np.random.default_rng(0)
    codes = np.clip(np.round(rng.normal(0, 3, size=(256, 64))), -31, 31).astype(np.int8)
    t = tg.CodeTensor(start=0, rows=256, cols=64, role="r", scale=(0, 512))
    scales = tg.byte_planes(rng.random(256).astype(np.float16).tobytes(), 2)
    joints = {key: tg.finest_histograms(scales, [t], [codes], -31, 63, key) for key in tg.COLUMN_KEYS}
    assert tg.choose_classes(joints, [t])[1:3] == (1, 1)
    joint = tg.finest_histograms(scales, [t], [codes], -31, 63, "rms")
    for steps in tg.LEVEL_STEPS:
        cost_split = tg.classes_cost(tg.class_histograms(joint, 4, 4), tg.id_bytes(64, 4), steps)
        assert cost_split > tg.classes_cost(tg.class_histograms(joint, 1, 1), 0, steps) + 15 * 8  # 15 more tables


@pytest.mark.parametrize("steps", [1, 16])
def test_pergroup_round_trip_is_exact_at_every_level_resolution(steps):
    """Coarse levels (1 per octave) and fine ones both decode to the same codes; the table says which was used."""
    hp, _, q = quantized_model(COMPRESSOR="pergroup")
    codes, scale = structured_codes(*q["tok_emb.weight"]["codes"].shape, seed=2)
    q["tok_emb.weight"].update(codes=codes, scale=scale)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "LEVEL_STEPS", (steps,))
        blob = tg.serialize_artifact(q, hp)
        back = tg.parse_artifact(blob, hp)
    assert {t["level_steps"] for t in tg.unpack_pergroup(blob[5 + blob[4]:])[0]} == {steps}
    for name, stored in q.items():
        for key, value in stored.items():
            if torch.is_tensor(value):
                assert torch.equal(back[name][key], value), (name, key)


def test_pergroup_level_table_is_symbol_major_and_reads_back():
    levels = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2 * 4, 3)  # 2 row x 4 column classes, 3 symbols
    data = tg.level_table(levels, 2)
    assert data[:8] == bytes([0, 12, 3, 15, 6, 18, 9, 21])  # symbol 0 of every class, row class fastest
    assert np.array_equal(tg.read_level_table(data, 2, 4, 3), levels)


def test_pergroup_refuses_a_format_2_table_clearly():
    hp, _, q = quantized_model(COMPRESSOR="pergroup")
    blob = tg.serialize_artifact(q, hp)
    side_len = int.from_bytes(blob[5 + blob[4]:9 + blob[4]], "little")
    side = brotli.decompress(blob[9 + blob[4]:9 + blob[4] + side_len])
    table_len = int.from_bytes(side[:4], "little")
    table = side[4:4 + table_len].replace(b'"version": 3', b'"version": 2')
    side = brotli.compress(len(table).to_bytes(4, "little") + table + side[4 + table_len:])
    body = len(side).to_bytes(4, "little") + side + blob[9 + blob[4] + side_len:]
    with pytest.raises(tg.ArtifactError, match="pergroup format 2, which this script does not read"):
        tg.parse_artifact(blob[:5 + blob[4]] + body, hp)


def test_pergroup_refuses_a_format_1_body_clearly():
    hp, _, q = quantized_model(COMPRESSOR="pergroup")
    raw = tg.decompress(tg.serialize_artifact(q, tg.dataclasses.replace(hp, compressor="brotli"))[5 + 6:], "brotli")
    table = json.dumps([dict(role="tok_emb.weight", lo=-3, counts=[1, 2, 3], words=0)]).encode()
    side = brotli.compress(len(table).to_bytes(4, "little") + table + raw)
    body = len(side).to_bytes(4, "little") + side
    blob = tg.ARTIFACT_MAGIC + bytes([8]) + b"pergroup" + body
    with pytest.raises(tg.ArtifactError, match="pergroup format 1"):
        tg.parse_artifact(blob, hp)


def test_pergroup_without_its_coder_names_the_package(monkeypatch):
    hp, _, q = quantized_model(COMPRESSOR="pergroup")
    blob = tg.serialize_artifact(q, hp)
    monkeypatch.setitem(sys.modules, "constriction", None)  # makes `import constriction` fail
    with pytest.raises(tg.ArtifactError, match=r"compressor pergroup needs the pip package constriction \(pip install constriction\)"):
        tg.parse_artifact(blob, hp)
    with pytest.raises(tg.ConfigError, match="COMPRESSOR.*pip install constriction"):
        tg.check_config(hp, world_size=1)


GROUP_CLIPS = dict(MATRIX_CLIP_SIGMAS=10.0, MLP_CLIP_SIGMAS=11.0, ATTN_CLIP_SIGMAS=12.0, EMBED_CLIP_SIGMAS=13.0)


@pytest.mark.parametrize("name, expected", [("tok_emb.weight", (7, 13.0)), ("lm_head.weight", (7, 13.0)),
                                            ("blocks.3.mlp.fc.weight", (6, 11.0)), ("blocks.10.mlp.proj.weight", (6, 11.0)),
                                            ("blocks.0.attn.c_q.weight", (6, 12.0)), ("blocks.0.attn.c_k.weight", (6, 12.0)),
                                            ("blocks.0.attn.c_v.weight", (6, 12.0)), ("blocks.2.attn.proj.weight", (6, 12.0)),
                                            ("bigram.weight", (6, 10.0))])
def test_each_tensor_gets_its_groups_bits_and_clip(name, expected):
    assert tg.quant_settings(name, hparams(**GROUP_CLIPS)) == expected


def test_old_quantization_knobs_restore_the_old_settings():
    """The README's 04-09 line: every quantized tensor as before issue 14, gates back to fp16."""
    hp, model, q = quantized_model(EMBED_BITS=8, EMBED_CLIP_SIGMAS=20, MLP_CLIP_SIGMAS=12.85, ATTN_CLIP_SIGMAS=12.85,
                                   GATED_ATTN_QUANT_GATE=0)
    for name, t in model.state_dict().items():
        old = (8, 20.0) if name == "tok_emb.weight" else (6, 12.85)
        assert tg.quant_settings(name, hp) == old or not tg.is_quantized(t), name
    assert "fp16" in q["smear_gate_w"] and "fp16" in q["blocks.0.attn.attn_gate_w"]


def test_clip_shrinker_scales_every_clip_group():
    hp = hparams(**GROUP_CLIPS)
    doubled = tg.scaled_clips(hp, 2.0)
    assert [getattr(doubled, k) for k in tg.CLIP_KNOBS] == [2 * getattr(hp, k) for k in tg.CLIP_KNOBS]
    assert tg.dataclasses.replace(doubled, **{k: getattr(hp, k) for k in tg.CLIP_KNOBS}) == hp  # nothing else moved
    _, model, q = quantized_model(**GROUP_CLIPS)
    line = tg.clip_shrinker(model, {}, q, hp).describe(100)
    assert all(f"{k.upper()} {2 * getattr(hp, k):.4g}" in line for k in tg.CLIP_KNOBS), line


def test_gate_rows_are_int8_with_half_step_error_and_an_exact_artifact_round_trip():
    torch.manual_seed(0)
    w = torch.randn(8, 12) * torch.logspace(-4, 0, 8)[:, None]
    w[3] = 0.0  # a gate row still at its zero init
    q = tg.quantize_gate_rows(w)
    step = q["scale"].float()[:, None]
    assert q["codes"].dtype == torch.int8 and q["codes"].abs().max() <= 127 and q["bits"] == 8
    assert (q["codes"].abs().amax(dim=1)[torch.arange(8) != 3] >= 126).all()  # each row spans its range
    assert (q["codes"][3] == 0).all() and torch.isfinite(tg.dequantize(q["codes"], q["scale"])).all()
    assert ((tg.dequantize(q["codes"], q["scale"]) - w).abs() <= step / 2 * (1 + 1e-3)).all()
    hp, _, state = quantized_model()
    state["blocks.1.attn.attn_gate_w"] = tg.quantize_gate_rows(w[:4])
    back = tg.parse_artifact(tg.serialize_artifact(state, hp), hp)["blocks.1.attn.attn_gate_w"]
    assert torch.equal(back["codes"], state["blocks.1.attn.attn_gate_w"]["codes"])
    assert torch.equal(back["scale"], state["blocks.1.attn.attn_gate_w"]["scale"]) and back["bits"] == 8


def test_pruning_leaves_gate_rows_alone():
    _, _, q = quantized_model()
    shrinker = tg.prune_shrinker(q, {})
    most = shrinker.build(shrinker.max_amount)
    for name in ("smear_gate_w", "blocks.0.attn.attn_gate_w"):
        assert (q[name]["codes"].abs() == 1).any() and most[name] is q[name], name


def test_byte_planes_round_trip():
    data = np.arange(1000, dtype=np.float16).tobytes()
    planes = tg.byte_planes(data, 2)
    assert planes != data and tg.from_byte_planes(planes, 2) == data


# --- budget fitter -------------------------------------------------------------------------------


def fitter_setup(limit_delta: int, margin: int = 1000, method: str = "prune", compressor: str = "lzma"):
    """One-layer model (3 quantized matrices), a Hessian on one of them, and hp whose limit is GPTQ's
    compressed size + limit_delta (code bytes are 0 here). lzma: the fitter is the same for either
    compressor, and lzma compresses this ~2.5x faster than brotli-11 (the end-to-end test uses brotli)."""
    hp, model, q = quantized_model(NUM_LAYERS=1, NUM_LOOPS=0, XSA_LAST_N=1, COMPRESSOR=compressor)
    hessians = {"blocks.0.mlp.fc.weight": torch.diag(torch.linspace(0.1, 2.0, 160))}
    q = tg.quantize_state(model, hessians, hp)
    base = len(tg.serialize_artifact(q, hp))
    hp = tg.dataclasses.replace(hp, artifact_limit_bytes=base + limit_delta, budget_margin_bytes=margin,
                                budget_fit_method=method)
    return hp, model, q, hessians, base


def fit(hp, model, q, hessians, log=lambda _: None):
    return tg.fit_to_budget(model, q, hessians, hp, 0, log)


def test_fitter_lands_at_or_under_limit_minus_margin_by_pruning_ones():
    hp, model, q, hessians, base = fitter_setup(limit_delta=-8000)
    fitted, blob, report = fit(hp, model, q, hessians)
    assert len(blob) <= hp.artifact_limit_bytes - hp.budget_margin_bytes == report["target"]
    assert report["method"] == "prune" and report["before"] == base and report["after"] == len(blob)
    assert 0 < report["amount"] < report["max_amount"] and 1 <= report["tries"] <= tg.FIT_MAX_TRIES + 1
    changed = 0
    for name, entry in q.items():
        if "codes" in entry:  # only codes of magnitude 1 were touched, and only set to 0
            diff = entry["codes"] != fitted[name]["codes"]
            assert (entry["codes"][diff].abs() == 1).all() and (fitted[name]["codes"][diff] == 0).all()
            assert torch.equal(entry["scale"], fitted[name]["scale"])
            changed += int(diff.sum())
        else:
            assert fitted[name] is entry
    assert changed == report["amount"] and report["hessian_error"] > 0


@pytest.mark.parametrize("method", tg.FIT_METHODS)
def test_fitter_fits_a_pergroup_artifact(method):
    hp, model, q, hessians, base = fitter_setup(limit_delta=-3000, method=method, compressor="pergroup")
    fitted, blob, report = fit(hp, model, q, hessians)
    assert len(blob) <= report["target"] < base and report["after"] == len(blob)
    assert blob == tg.serialize_artifact(fitted, hp)


def test_fitter_prunes_the_cheapest_ones_first():
    hp, model, q, hessians, _ = fitter_setup(limit_delta=-8000)
    shrinker = tg.prune_shrinker(q, hessians)
    few, more = shrinker.build(100), shrinker.build(5000)
    for name in q:
        if "codes" in q[name]:
            assert ((few[name]["codes"] != q[name]["codes"]) <= (more[name]["codes"] != q[name]["codes"])).all()
    # the Hessian makes fc's low-H columns cheap: its first pruned values sit in the low columns
    pruned = (few["blocks.0.mlp.fc.weight"]["codes"] != q["blocks.0.mlp.fc.weight"]["codes"]).nonzero()
    assert len(pruned) and pruned[:, 1].float().mean() < 80


@pytest.mark.parametrize("method", tg.FIT_METHODS)
def test_fitter_leaves_an_artifact_under_the_target_byte_identical(method):
    hp, model, q, hessians, base = fitter_setup(limit_delta=1000, margin=1000, method=method)  # exactly at the target
    lines = []
    fitted, blob, report = fit(hp, model, q, hessians, lines.append)
    assert fitted is q and blob == tg.serialize_artifact(q, hp)
    assert report["method"] == "none" and report["after"] == report["before"] == base
    assert lines and lines[0].startswith("budget_fit:") and "artifact unchanged" in lines[0]


@pytest.mark.parametrize("method", tg.FIT_METHODS)
def test_fitted_artifact_round_trips_through_the_file(tmp_path, method):
    hp, model, q, hessians, _ = fitter_setup(limit_delta=-5000, method=method)
    fitted, blob, report = fit(hp, model, q, hessians)
    assert report["method"] == method and len(blob) <= report["target"]
    path = tmp_path / "fitted.ptz"
    path.write_bytes(blob)
    loaded = tg.load_artifact(path, hp, CPU)
    for name, t in tg.dequantize_state(fitted).items():
        assert torch.equal(loaded.state_dict()[name], t), name


@pytest.mark.parametrize("method, most", [("prune", "zeroed {0} of {0} ±1 codes"), ("clip", "clip sigmas x3.00")])
def test_impossible_limit_is_reported_and_leaves_gptq_bytes(method, most):
    hp, model, q, hessians, base = fitter_setup(limit_delta=0, method=method)
    hp = tg.dataclasses.replace(hp, artifact_limit_bytes=base // 4)  # the codes are far less than 3/4 of it
    lines = []
    fitted, blob, report = fit(hp, model, q, hessians, lines.append)
    assert report["method"] == "failed" and fitted is q and blob == tg.serialize_artifact(q, hp)
    assert "CANNOT FIT" in lines[-1] and most.format(report["max_amount"]) in lines[-1]


def test_clip_fitter_requantizes_with_coarser_steps():
    hp, model, q, hessians, base = fitter_setup(limit_delta=-8000, method="clip")
    fitted, blob, report = fit(hp, model, q, hessians)
    assert report["method"] == "clip" and len(blob) <= report["target"] and report["amount"] > 0
    factor = 1 + report["amount"] * tg.CLIP_STEP
    again = tg.quantize_state(model, hessians, tg.dataclasses.replace(
        hp, matrix_clip_sigmas=hp.matrix_clip_sigmas * factor, embed_clip_sigmas=hp.embed_clip_sigmas * factor,
        mlp_clip_sigmas=hp.mlp_clip_sigmas * factor, attn_clip_sigmas=hp.attn_clip_sigmas * factor))
    for name, entry in fitted.items():
        if "codes" in entry:
            assert torch.equal(entry["codes"], again[name]["codes"])
            coarser = (entry["scale"] > q[name]["scale"]).all()
            assert torch.equal(entry["scale"], q[name]["scale"]) if tg.is_gate_tensor(name) else coarser, name


@pytest.mark.parametrize("env, message", [(dict(ARTIFACT_LIMIT_BYTES=16_000_001), "ARTIFACT_LIMIT_BYTES=16000001: must be in 1..16000000"),
                                          (dict(ARTIFACT_LIMIT_BYTES=5000, BUDGET_MARGIN_BYTES=5000), "BUDGET_MARGIN_BYTES=5000"),
                                          (dict(BUDGET_MARGIN_BYTES=-1), "BUDGET_MARGIN_BYTES=-1"),
                                          (dict(BUDGET_FIT_METHOD="trim"), "BUDGET_FIT_METHOD='trim': must be one of clip, prune")])
def test_budget_knobs_are_checked(env, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.check_config(hparams(**env), 1)


# --- sliding window and score-first TTT ----------------------------------------------------------


@pytest.mark.parametrize("n, seq_len, stride", [(1000, 64, 16), (1000, 64, 64), (64, 64, 8), (65, 64, 64), (999, 50, 7)])
def test_sliding_windows_score_every_target_once(n, seq_len, stride):
    scored = []
    for w in tg.sliding_windows(n, seq_len, stride):
        assert 0 < w.length <= seq_len and w.start + w.length <= n
        assert w.first == 0 or w.first == seq_len - stride  # full left context after the first window
        scored += range(w.start + w.first, w.start + w.length)
    assert sorted(scored) == list(range(n))


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
    assert f"Serialized model quantized+pergroup: {artifact.stat().st_size} bytes" in log
    code_bytes = tg.counted_code(SCRIPT.read_text()).size  # the minified wrapper a submission would be
    assert f"Code size: {code_bytes} bytes" in log
    assert f"Total submission size quantized+pergroup: {artifact.stat().st_size + code_bytes} bytes" in log
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


SMALL_RUN = dict(VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=8, NUM_LOOPS=0,
                 XSA_LAST_N=0, TRAIN_SEQ_LEN=32, EVAL_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256, VAL_BATCH_TOKENS=256 * 8,
                 ITERATIONS=1, WARMUP_STEPS=0, MAX_WALLCLOCK_SECONDS=0, GPTQ_CALIBRATION_BATCHES=1,
                 SLIDING_WINDOW_ENABLED=0, TTT_ENABLED=0, NGRAM_TILT=0)


def main_in_process(monkeypatch, env: dict) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    tg.main()


def test_over_budget_artifact_is_an_error_after_evaluation(tiny_data, tmp_path, monkeypatch):
    # Compressing a real >16 MB artifact takes minutes on CPU, so the limit is lowered instead. This
    # model's matrices are all small enough for fp16, so the fitter has no ±1 codes to prune.
    monkeypatch.chdir(tmp_path)
    for allowed, run_id in ((0, "big"), (1, "big_ok")):
        env = dict(SMALL_RUN, DATA_DIR=tiny_data["root"], RUN_ID=run_id, ALLOW_OVER_BUDGET=allowed,
                   ARTIFACT_LIMIT_BYTES=50_000)
        if allowed:
            main_in_process(monkeypatch, env)  # an exploratory run: no error
        else:
            with pytest.raises(SystemExit) as exit_info:
                main_in_process(monkeypatch, env)
            assert "over 50000 bytes" in str(exit_info.value.code) and "ALLOW_OVER_BUDGET=1" in str(exit_info.value.code)
        log = (tmp_path / "logs" / f"{run_id}.txt").read_text()
        assert "ERROR: ARTIFACT OVER BUDGET" in log and re.search(r"^quantized val_loss:", log, re.M)
        assert ("ALLOW_OVER_BUDGET=1 (limit 50000" if allowed else "budget_fit: CANNOT FIT") in log
        record = json.loads((tmp_path / "logs" / f"{run_id}.json").read_text())
        assert record["artifact_over_budget"] is True and record["total_bytes"] > 50_000
        assert record["status"] == ("completed" if allowed else "over_budget")
        assert record["budget_fit"]["method"] == ("none" if allowed else "failed")


@pytest.mark.slow
def test_run_fits_a_lowered_limit_and_scores_the_fitted_file(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = dict(SMALL_RUN, DATA_DIR=tiny_data["root"], MODEL_DIM=160, RUN_ID="free")  # 512 x 160 embedding: int8
    main_in_process(monkeypatch, env)
    free = json.loads((tmp_path / "logs" / "free.json").read_text())
    assert free["budget_fit"]["method"] == "none"
    limit = free["total_bytes"] - 1500
    main_in_process(monkeypatch, dict(env, RUN_ID="fit", ARTIFACT_LIMIT_BYTES=limit, BUDGET_MARGIN_BYTES=500))
    record = json.loads((tmp_path / "logs" / "fit.json").read_text())
    log = (tmp_path / "logs" / "fit.txt").read_text()
    artifact = tmp_path / "final_model.int6.ptz"
    fit = record["budget_fit"]
    assert fit["method"] == "clip" and fit["before"] == free["total_bytes"] and fit["target"] == limit - 500
    assert record["code_bytes"] == tg.counted_code(SCRIPT.read_text()).size  # the counted wrapper, not the source
    assert record["total_bytes"] == fit["after"] == artifact.stat().st_size + record["code_bytes"] <= limit - 500
    assert record["status"] == "completed" and record["artifact_over_budget"] is False
    assert re.search(rf"^budget_fit: limit {limit} - margin 500 = target {limit - 500}; before {fit['before']} "
                     rf"after {fit['after']} bytes .* method clip: clip sigmas x{1 + fit['amount'] / 100:.2f}", log, re.M)
    assert f"Total submission size quantized+pergroup: {fit['after']} bytes" in log
    assert record["metrics"]["post_quant_val_bpb"] != free["metrics"]["post_quant_val_bpb"]  # the fitted file was read


@pytest.mark.slow
def test_pergroup_run_scores_exactly_what_the_brotli_run_scores(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = dict(SMALL_RUN, DATA_DIR=tiny_data["root"], MODEL_DIM=160)  # 512 x 160 embedding: int8 codes
    records = {}
    for compressor in ("brotli", "pergroup"):
        main_in_process(monkeypatch, dict(env, RUN_ID=compressor, COMPRESSOR=compressor))
        records[compressor] = json.loads((tmp_path / "logs" / f"{compressor}.json").read_text())
        log = (tmp_path / "logs" / f"{compressor}.txt").read_text()
        assert f"Serialized model quantized+{compressor}: " in log
    assert records["pergroup"]["metrics"]["post_quant_val_bpb"] == records["brotli"]["metrics"]["post_quant_val_bpb"]
    assert records["pergroup"]["total_bytes"] < records["brotli"]["total_bytes"]


# --- training time includes GPTQ; the run checks its own compliance ------------------------------


def test_gptq_reserve_is_measured_and_the_run_reports_its_compliance(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = dict(SMALL_RUN, DATA_DIR=tiny_data["root"], RUN_ID="timed", MAX_WALLCLOCK_SECONDS=60, ITERATIONS=3,
               GPTQ_CALIBRATION_BATCHES=3, MAX_TRAIN_VAL_OVERLAP=1)
    main_in_process(monkeypatch, env)
    log = (tmp_path / "logs" / "timed.txt").read_text()
    record = json.loads((tmp_path / "logs" / "timed.json").read_text())
    reserve = record["gptq_reserve"]
    assert reserve["margin"] == 1.5 and reserve["reserve_s"] == pytest.approx(1.5 * reserve["estimate_s"], abs=1e-3)
    assert reserve["estimate_s"] >= 3 * reserve["hessian_s_per_batch"] > 0
    budget_ms = float(re.search(r"^train_budget: (\d+)ms", log, re.M).group(1))
    assert budget_ms == pytest.approx(60000 - 1000 * reserve["reserve_s"], abs=1)  # the JSON rounds to 1 ms
    total = record["train_plus_gptq_ms"]
    assert total == pytest.approx(record["train_time_ms"] + 1000 * record["gptq_total_s"], abs=1.5)
    assert re.search(rf"^train\+gptq: {total:.0f}ms of 600000ms$", log, re.M)
    checks = record["compliance"]
    assert checks["train_plus_gptq_under_600s"] and checks["eval_under_600s"] and checks["artifact_under_16mb"]
    assert checks["eval_ms"] == sum(record["metrics"][k] for k in tg.SCORED_EVAL_PHASES if k in record["metrics"])
    assert checks["no_train_val_overlap"] == (record["data_check"]["overlap_docs"] == 0)


def test_compliance_flags_each_limit():
    ok = dict(train_plus_gptq_ms=599_000, total_bytes=16_000_000, data_check=dict(overlap_docs=0),
              metrics=dict(post_quant_eval_ms=100_000, sliding_eval_ms=200_000, ttt_eval_ms=299_000, loops3_eval_ms=10**6))
    assert all(v for k, v in tg.compliance(ok).items() if k != "eval_ms") and tg.compliance(ok)["eval_ms"] == 599_000
    for change, key in ((dict(train_plus_gptq_ms=600_001), "train_plus_gptq_under_600s"),
                        (dict(total_bytes=16_000_001), "artifact_under_16mb"),
                        (dict(metrics=dict(ok["metrics"], ttt_eval_ms=300_001)), "eval_under_600s"),
                        (dict(data_check=dict(overlap_docs=3)), "no_train_val_overlap"),
                        (dict(data_check={}), "no_train_val_overlap")):
        checks = tg.compliance({**ok, **change})
        assert [k for k, v in checks.items() if v is False] == [key]


def test_gptq_runs_its_matmuls_in_full_fp32_and_restores_tf32():
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with tg.full_fp32_matmuls():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


# --- EVAL_ARTIFACT: score an existing artifact without training ------------------------------------


def test_eval_artifact_scores_a_runs_own_file_exactly_as_that_run_did(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = dict(SMALL_RUN, DATA_DIR=tiny_data["root"], SLIDING_WINDOW_ENABLED=1, EVAL_STRIDE=16)
    main_in_process(monkeypatch, dict(env, RUN_ID="trained"))
    trained = json.loads((tmp_path / "logs" / "trained.json").read_text())
    artifact = tmp_path / "final_model.int6.ptz"
    blob = artifact.read_bytes()
    main_in_process(monkeypatch, dict(env, RUN_ID="scored", EVAL_ARTIFACT=artifact.name, SEED=7))
    scored = json.loads((tmp_path / "logs" / "scored.json").read_text())
    log = (tmp_path / "logs" / "scored.txt").read_text()
    for key in ("post_quant_val_loss", "post_quant_val_bpb", "sliding_val_bpb"):
        assert scored["metrics"][key] == trained["metrics"][key], key
    assert artifact.read_bytes() == blob  # read, never rewritten
    assert f"eval_artifact: scoring {artifact.name} ({len(blob)} bytes); training and GPTQ skipped" in log
    assert "train_time_ms" not in scored and "GPTQ:" not in log and not re.search(r"^\d+/\d+ train_loss", log, re.M)
    assert scored["eval_artifact"] == dict(path=str(artifact.resolve()), bytes=len(blob),
                                           sha256=hashlib.sha256(blob).hexdigest())
    assert "quantization_gap_bpb" not in scored["metrics"] and "pre_quant_val_bpb" not in scored["metrics"]
    metrics = scored["metrics"]
    eval_ms = sum(metrics[k] for k in tg.SCORED_EVAL_PHASES if k in metrics)
    assert scored["status"] == "completed" and metrics["eval_total_ms"] == eval_ms
    assert scored["compliance"] == dict(eval_under_600s=True, eval_ms=eval_ms)


def test_eval_artifact_missing_file_is_a_config_error_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main_in_process(monkeypatch, dict(SMALL_RUN, EVAL_ARTIFACT="nope.ptz"))
    assert str(exit_info.value.code) == ("train_gpt.py: configuration error: EVAL_ARTIFACT='nope.ptz': must be an "
                                         "existing artifact file, e.g. a finished run's final_model.int6.ptz")
    assert not (tmp_path / "logs").exists()  # stopped before anything ran
    hp = hparams(EVAL_ARTIFACT=tmp_path / "nope.ptz")
    (tmp_path / "nope.ptz").write_bytes(b"")
    tg.check_evaluation_config(hp)  # existence is all the configuration checks; the parse checks the rest


def test_eval_artifact_of_another_architecture_is_an_artifact_error_naming_the_mismatch(tiny_data, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    hp = hparams(**dict(SMALL_RUN, MODEL_DIM=32))
    torch.manual_seed(0)
    (tmp_path / "other.ptz").write_bytes(tg.serialize_artifact(tg.quantize_state(tg.GPT(hp), {}, hp), hp))
    with pytest.raises(SystemExit) as exit_info:
        main_in_process(monkeypatch, dict(SMALL_RUN, DATA_DIR=tiny_data["root"], RUN_ID="other",
                                          EVAL_ARTIFACT="other.ptz"))
    assert str(exit_info.value.code) == ("train_gpt.py: artifact error: artifact was made for another model: "
                                         "MODEL_DIM=32 (this run: 64)")
    assert json.loads((tmp_path / "logs" / "other.json").read_text())["status"] == "failed"
