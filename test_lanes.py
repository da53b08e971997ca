"""The two-lane parallel decoder (PARALLEL_START_LAYER): semantics, parameters, configuration, forward paths."""
import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import CPU, every_path, hparams, randomize, small_model

LANE_PARAMETERS = {"parallel_post_lambdas", "parallel_resid_lambdas"}


def reference_hidden(model: tg.GPT, ids: torch.Tensor) -> torch.Tensor:
    """The decoder written out by hand from the spec: sequential layers, then from the first lane layer on,
    fork lane0 = lane1 = x, skips into lane 0 only, and the final hidden state is RMSNorm of the lanes' mean."""
    x = tg.rms_norm(model.embeddings(ids))
    x0, layout = x, model.attention_layout(ids)
    encoder, decoder = model.sequences[model.loops]
    skips = []
    for layer, slot in encoder:
        x = model.run_layer(x, x0, layer, slot, layout)
        skips.append(x)
    lane0 = lane1 = None
    for index, (layer, slot) in enumerate(decoder):
        lane_layer = model.lane_start is not None and layer >= model.lane_start
        if lane_layer and lane0 is None:
            lane0, lane1 = x, x
        skip = skips.pop() if index < len(model.skip_weights) and skips else None
        if not lane_layer:
            x = x if skip is None else model.merge_skip(index, x, skip)
            x = model.run_layer(x, x0, layer, slot, layout)
            continue
        lane0 = lane0 if skip is None else model.merge_skip(index, lane0, skip)
        lane0, lane1 = model.run_lane_layer(lane0, lane1, x0, layer, slot, layout)
    return tg.rms_norm(x if lane0 is None else (lane0 + lane1) / 2)


def test_lanes_off_is_the_sequential_model():
    off = small_model(PARALLEL_START_LAYER=-1)
    on = small_model()
    assert off.lane_start is None and on.lane_start == 3
    assert set(on.state_dict()) - set(off.state_dict()) == LANE_PARAMETERS
    randomize(off)
    randomize(on)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(off.hidden_states(ids), reference_hidden(off, ids))
        assert not torch.allclose(on.hidden_states(ids), off.hidden_states(ids), atol=1e-3)
    # the lanes start at 8 by default: a 5-layer model has none, like PARALLEL_START_LAYER=-1
    assert small_model(PARALLEL_START_LAYER=8).lane_start is None


@pytest.mark.parametrize("flags", [dict(), dict(BIRKHOFF_MIX=0, OUTPUT_LN=0, TIMESTEP_SCALE=0)])
def test_hidden_state_is_rms_norm_of_the_lanes_mean(flags):
    model = small_model(**flags)
    randomize(model)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        for loops in (0, 2):
            with model.looping(loops):
                assert torch.allclose(model.hidden_states(ids), reference_hidden(model, ids), atol=1e-6)


def test_one_lane_layer_update_matches_the_formula():
    """lane0' = ρ0·lane0 + π[attn→0]·A + π[mlp→0]·M, lane1' = ρ1·lane1 + π[attn→1]·A + π[mlp→1]·M, with
    A = attention of the Birkhoff-mixed lane 0 and M = the output-LN MLP of raw lane 1, each times its scales."""
    model = small_model()
    randomize(model)
    layer, hp = 4, model.hp
    block, row = model.blocks[layer], layer - hp.parallel_start_layer
    torch.manual_seed(2)
    lane0, lane1, x0 = torch.randn(3, 2, 16, hp.model_dim).unbind(0)
    layout = model.attention_layout(torch.randint(2, 512, (2, 16)))
    with torch.no_grad():
        a = torch.sigmoid(model.mix_logits[model.mix_row[layer]])
        c = 1 / (layer + 1) ** 0.5
        cap = hp.timestep_cap
        attn = block.attn(tg.rms_norm(a * lane0 + (1 - a) * x0) * c, layout)
        attn = attn * block.attn_scale * model.attn_step_scales[layer].clamp(-cap, cap)
        mlp = tg.rms_norm(block.mlp(lane1)) * c * block.mlp_scale * model.mlp_step_scales[layer].clamp(-cap, cap)
        post, resid = model.parallel_post_lambdas[row], model.parallel_resid_lambdas[row]
        want0 = resid[0] * lane0 + post[0, 0] * attn + post[1, 0] * mlp
        want1 = resid[1] * lane1 + post[0, 1] * attn + post[1, 1] * mlp
        got0, got1 = model.run_lane_layer(lane0, lane1, x0, layer, layer, layout)
    assert torch.allclose(got0, want0, atol=1e-5) and torch.allclose(got1, want1, atol=1e-5)
    assert not torch.allclose(got0, got1, atol=1e-3)


def test_lane_scalars_get_gradients_and_sit_in_the_scalar_adamw_in_fp32():
    model = small_model()
    randomize(model)
    ids = torch.randint(0, 512, (2, 16))
    model(ids, torch.roll(ids, -1, 1)).backward()
    named = dict(model.named_parameters())
    init = small_model()
    assert torch.equal(init.parallel_post_lambdas, torch.ones(2, 2, 2))
    assert torch.equal(init.parallel_resid_lambdas, torch.full((2, 2), 1.1))
    for name in LANE_PARAMETERS:
        p = named[name]
        assert p.dtype == torch.float32 and (p.grad != 0).all(), name  # every entry of every lane layer trains
    scalar = {name for name, _ in tg.param_groups(model)["scalar"]}
    assert LANE_PARAMETERS <= scalar
    adamw_scalar = tg.build_optimizers(model, model.hp, CPU)[2]
    in_scalar = {id(p) for g in adamw_scalar.param_groups for p in g["params"]}
    assert {id(named[n]) for n in LANE_PARAMETERS} <= in_scalar


def test_lane_scalars_round_trip_through_the_artifact_as_fp16(tmp_path):
    model = small_model()
    randomize(model)
    quantized = tg.quantize_state(model, {}, model.hp)
    path = tmp_path / "lanes.ptz"
    path.write_bytes(tg.serialize_artifact(quantized, model.hp))
    loaded = tg.load_artifact(path, model.hp, CPU).state_dict()
    for name in LANE_PARAMETERS:
        assert "fp16" in quantized[name]
        assert torch.equal(loaded[name], getattr(model, name).detach().half().float()), name


@pytest.mark.parametrize("env, match", [
    (dict(LOOP_START=3, LOOP_END=8), "PARALLEL_START_LAYER=8: a looped layer"),
    (dict(NUM_LOOPS=0, EVAL_LOOPS="1", LOOP_START=8, LOOP_END=9), "PARALLEL_START_LAYER=8: a looped layer"),
    (dict(PARALLEL_START_LAYER=4), "PARALLEL_START_LAYER=4: must be a decoder layer, >= NUM_LAYERS//2 = 5"),
    (dict(PARALLEL_RESIDUAL_START=7), "PARALLEL_RESIDUAL_START=7: the 04-09 GPT-J parallel residual"),
])
def test_lane_config_errors(env, match):
    with pytest.raises(tg.ConfigError, match=match):
        tg.check_config(hparams(**env), world_size=8)


@pytest.mark.parametrize("env", [dict(), dict(LOOP_END=7), dict(PARALLEL_START_LAYER=-1, PARALLEL_RESIDUAL_START=7),
                                 dict(NUM_LAYERS=4, XSA_LAST_N=4, LOOP_START=1, LOOP_END=2, PARALLEL_RESIDUAL_START=2)])
def test_lane_configs_that_are_accepted(env):
    tg.check_config(hparams(**env), world_size=8)  # defaults, a band up to 7, 04-09's layout, too few layers for lanes


def lane_eval_setup(tiny_data):
    hp = hparams(DATA_DIR=tiny_data["root"], VOCAB_SIZE=512, NUM_LAYERS=4, MODEL_DIM=32, NUM_HEADS=2,
                 NUM_KV_HEADS=1, ROPE_DIMS=4, XSA_LAST_N=2, NUM_LOOPS=1, LOOP_START=0, LOOP_END=0,
                 PARALLEL_START_LAYER=2, EVAL_SEQ_LEN=64, TRAIN_SEQ_LEN=64, VAL_BATCH_TOKENS=8 * 64 * 4,
                 EVAL_STRIDE=64, TTT_CHUNK_TOKENS=1024, GPTQ_CALIBRATION_BATCHES=1)
    tg.check_config(hp, world_size=1)
    torch.manual_seed(0)
    model = tg.GPT(hp)
    randomize(model)
    tokens = tg.load_validation_tokens(hp)
    tokens = tokens[:(len(tokens) - 1) // 64 * 64 + 1]  # whole windows: plain and sliding score the same targets
    return hp, model, tg.Validation(tokens, tg.byte_counts(tiny_data["sp"]))


def test_lane_model_agrees_on_every_forward_path(tiny_data):
    hp, model, val = lane_eval_setup(tiny_data)
    batch = torch.from_numpy(val.tokens[:4 * 64].astype(np.int64)).view(4, 64)
    results = []
    for post in (0.7, -0.4):  # every path must see the lane scalars: each result moves with them
        with torch.no_grad():
            model.parallel_post_lambdas.fill_(post)
            h = model.hidden_states(batch).flatten(0, 1)
        plain, sliding, ttt, hessian = every_path(model, val, hp)
        assert sliding == pytest.approx(plain, rel=1e-6) and ttt == sliding
        assert torch.allclose(hessian, h.T @ h, rtol=1e-4, atol=1e-6)
        results.append((plain, hessian))
    assert results[1][0] != pytest.approx(results[0][0], rel=1e-4)
    assert not torch.allclose(results[1][1], results[0][1], rtol=1e-3)
