"""Tests of SparseAttnGate and the BOS-safe SmearGate (CPU, the real train_gpt.py)."""

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import CPU, every_path, hparams, randomize, small_model

NO_GATES = dict(SPARSE_ATTN_GATE_ENABLED=0, SMEAR_GATE_ENABLED=0)


def gate_names(model: tg.GPT) -> list[str]:
    return [n for n, _ in model.named_parameters() if "attn_gate_w" in n or n.startswith("smear_")]


# --- the functions -------------------------------------------------------------------------------


def test_sparse_attn_gate_scales_each_head_by_a_sigmoid_of_the_window():
    torch.manual_seed(0)
    y, x, w = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 32), torch.randn(4, 12)
    out = tg.sparse_attn_gate(y, x, w, scale=0.5)
    for h in range(4):
        gate = torch.sigmoid(0.5 * (x[..., :12] * w[h]).sum(-1))
        assert torch.allclose(out[:, :, h], y[:, :, h] * gate[..., None], atol=1e-6)
    assert torch.allclose(tg.sparse_attn_gate(y, x, torch.zeros(4, 12), 0.5), y / 2)  # zero init: every gate 0.5


def smear_row(ids: list[int], table: torch.Tensor, weight: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    t = torch.tensor([ids])
    return tg.smear_embeddings(table[t], t, weight, lam)[0]


def test_smear_gate_never_carries_document_a_into_document_b():
    torch.manual_seed(0)
    table, weight, lam = torch.randn(64, 32), torch.randn(1, 12), torch.tensor([0.7])
    bos = tg.BOS_ID
    doc_a, other_a, doc_b = [bos, 5, 6, 7, 8], [bos, 9, 10, 11, 12], [bos, 20, 21, 22]
    first, second = smear_row(doc_a + doc_b, table, weight, lam), smear_row(other_a + doc_b, table, weight, lam)
    b = len(doc_a)
    assert torch.equal(first[b:], second[b:])  # every docB position, its BOS included
    assert not torch.allclose(first[1:b], second[1:b])  # docA itself did change
    # Without a BOS at docB's start (the mask's only trigger) docA's last token would leak in:
    leaky = [5] + doc_b[1:]
    assert not torch.allclose(smear_row(doc_a + leaky, table, weight, lam)[b],
                              smear_row(other_a + leaky, table, weight, lam)[b])


def test_smear_gate_mixes_the_previous_token_and_reaches_the_token_after_bos():
    torch.manual_seed(0)
    table, weight, lam = torch.randn(64, 32), torch.randn(1, 12), torch.tensor([0.7])
    ids = [3, tg.BOS_ID, 4, 5]
    out, e = smear_row(ids, table, weight, lam), table[torch.tensor(ids)]
    gates = 0.7 * torch.sigmoid(e[:, :12] @ weight[0])
    assert torch.equal(out[0], e[0]) and torch.equal(out[1], e[1])  # row start; BOS never smeared into
    for t in (2, 3):  # the token after BOS is inside BOS's document, so it does get BOS's embedding
        assert torch.allclose(out[t], e[t] + gates[t] * e[t - 1], atol=1e-6)
    assert torch.equal(smear_row(ids, table, weight, torch.zeros(1)), e)  # lambda 0: the identity


# --- in the model --------------------------------------------------------------------------------


def test_gates_at_init_compute_the_ungated_function():
    ids = torch.randint(0, 512, (2, 16))
    ids[:, 5] = tg.BOS_ID
    gated, plain = small_model(), small_model(**NO_GATES)
    assert gate_names(gated) and not gate_names(plain)
    assert torch.equal(gated.forward_logits(ids), plain.forward_logits(ids))


def test_zero_sparse_gate_halves_the_attention_output_of_a_trained_model():
    ids = torch.randint(0, 512, (2, 16))
    plain = small_model(**NO_GATES)
    randomize(plain)
    gated = small_model(SMEAR_GATE_ENABLED=0)
    gated.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for block in plain.blocks:
            block.attn.proj.weight /= 2  # sigmoid(0) = 0.5 on every head
    assert torch.allclose(gated.forward_logits(ids), plain.forward_logits(ids), atol=1e-5)
    with torch.no_grad():
        gated.blocks[2].attn.attn_gate_w.fill_(1.0)
    assert not torch.allclose(gated.forward_logits(ids), plain.forward_logits(ids), atol=1e-3)


def test_looped_passes_use_their_physical_layers_gate(monkeypatch):
    model = small_model()  # layers 1..2 looped twice more: 9 virtual layers, 5 gates
    assert sum("attn_gate_w" in n for n in gate_names(model)) == model.hp.num_layers
    used = []
    real = tg.sparse_attn_gate
    monkeypatch.setattr(tg, "sparse_attn_gate", lambda y, x, w, s: used.append(w) or real(y, x, w, s))
    for loops in (0, 2):
        used.clear()
        with model.looping(loops):
            model.forward_logits(torch.randint(0, 512, (1, 16)))
        expected = [model.blocks[layer].attn.attn_gate_w for layer, _ in model.plan.virtual_layers(loops)]
        assert len(used) == len(expected) and all(u is e for u, e in zip(used, expected))


@pytest.mark.parametrize("flags", [dict(), NO_GATES, dict(SPARSE_ATTN_GATE_ENABLED=0), dict(SMEAR_GATE_ENABLED=0)])
def test_each_gate_switches_off_alone(flags):
    model = small_model(**flags)
    names = gate_names(model)
    assert any("attn_gate_w" in n for n in names) == flags.get("SPARSE_ATTN_GATE_ENABLED", 1)
    assert any(n.startswith("smear_") for n in names) == flags.get("SMEAR_GATE_ENABLED", 1)
    randomize(model)
    ids = torch.randint(0, 512, (2, 16))
    model(ids, torch.roll(ids, -1, 1)).backward()
    for name, p in model.named_parameters():
        if name in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def perturb_gates(model: tg.GPT, value: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in gate_names(model):
                p.fill_(value)


def gated_eval_setup(tiny_data):
    hp = hparams(DATA_DIR=tiny_data["root"], VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2,
                 NUM_KV_HEADS=1, ROPE_DIMS=4, XSA_LAST_N=2, NUM_LOOPS=1, LOOP_START=0, LOOP_END=0,
                 EVAL_SEQ_LEN=64, TRAIN_SEQ_LEN=64, VAL_BATCH_TOKENS=8 * 64 * 4, EVAL_STRIDE=64,
                 TTT_CHUNK_TOKENS=1024, GPTQ_CALIBRATION_BATCHES=1)
    torch.manual_seed(0)
    model = tg.GPT(hp)
    randomize(model)
    tokens = tg.load_validation_tokens(hp)
    tokens = tokens[:(len(tokens) - 1) // 64 * 64 + 1]  # whole windows: plain and sliding score the same targets
    assert (tokens == tg.BOS_ID).sum() > 1, "the stream should be packed with several documents"
    return hp, model, tg.Validation(tokens, tg.byte_counts(tiny_data["sp"]))


def test_gated_model_agrees_on_every_forward_path(tiny_data):
    hp, model, val = gated_eval_setup(tiny_data)
    perturb_gates(model, 0.8)
    plain, sliding, ttt, hessian = every_path(model, val, hp)
    assert sliding == pytest.approx(plain, rel=1e-6) and ttt == sliding
    batch = torch.from_numpy(val.tokens[:4 * 64].astype(np.int64)).view(4, 64)
    with torch.no_grad():
        h = model.hidden_states(batch).flatten(0, 1)
    assert torch.allclose(hessian, h.T @ h, rtol=1e-4, atol=1e-6)
    perturb_gates(model, -0.8)  # every path must see the gates: each result moves
    plain2, sliding2, ttt2, hessian2 = every_path(model, val, hp)
    assert plain2 != pytest.approx(plain, rel=1e-4) and sliding2 == pytest.approx(plain2, rel=1e-6) and ttt2 == sliding2
    assert not torch.allclose(hessian2, hessian, rtol=1e-3)


def test_gate_weights_round_trip_through_the_artifact(tmp_path):
    model = small_model()
    randomize(model)
    hp = model.hp
    quantized = tg.quantize_state(model, {}, hp)
    path = tmp_path / "gated.ptz"
    path.write_bytes(tg.serialize_artifact(quantized, hp))
    loaded = tg.load_artifact(path, hp, CPU)
    state = dict(model.named_parameters())
    for name in gate_names(model):  # gate weights are int8 rows by default (GATED_ATTN_QUANT_GATE=1), the λ fp16
        back, exact = loaded.state_dict()[name], state[name].detach()
        if tg.is_gate_tensor(name):
            step = quantized[name]["scale"].float()[:, None]
            assert quantized[name]["bits"] == 8 and ((back - exact).abs() <= step / 2 * 1.001).all(), name
        else:
            assert torch.equal(back, exact.half().float()), name
    fp16 = tg.quantize_state(model, {}, tg.dataclasses.replace(hp, gated_attn_quant_gate=False))
    for name in gate_names(model):
        assert torch.equal(fp16[name]["fp16"], state[name].detach().half()), name
    with pytest.raises(tg.ArtifactError, match="SMEAR_GATE_ENABLED"):
        tg.load_artifact(path, tg.dataclasses.replace(hp, smear_gate_enabled=False), CPU)


@pytest.mark.parametrize("env", [dict(GATE_WINDOW=0), dict(GATE_WINDOW=33, MODEL_DIM=32, NUM_HEADS=4, ROPE_DIMS=4)])
def test_bad_gate_window_is_named(env):
    with pytest.raises(tg.ConfigError, match="GATE_WINDOW"):
        tg.check_config(hparams(**env), world_size=8)
    tg.check_config(hparams(**env, **NO_GATES), world_size=8)  # unused when both gates are off
