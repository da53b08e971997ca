"""Tests of the evaluation's long context (EVAL_SEQ_LEN > TRAIN_SEQ_LEN), the compile warm-up of the evaluation
on random tokens, and the eval timer (CPU, the real train_gpt.py)."""

import math

import numpy as np
import torch

import train_gpt as tg
from conftest import CPU, eval_setup, every_path, hparams, randomize


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
