"""Tests of loops as a dial: other loop counts at evaluation (EVAL_LOOPS), random loop counts in
training (LOOP_SAMPLE) and shared per-pass parameters (SHARE_LOOP_PARAMS), on the real train_gpt.py."""

import json
import math
import re
import sys

import pytest
import torch

import train_gpt as tg
from conftest import E2E, SCRIPT, hparams, loop_plan, randomize, run_script, small_model

PRE, POST = [0, 1, 2], [6, 7, 8, 9, 10]  # default 11 layers, band 3..5, NUM_LOOPS=2


def band_passes(seq, passes):
    """Split the band part of a default-config virtual sequence into its passes."""
    band = seq[len(PRE):len(seq) - len(POST)]
    assert len(band) == 3 * passes
    return [band[3 * p:3 * p + 3] for p in range(passes)]


# --- virtual sequences and parameter slots -------------------------------------------------------


@pytest.mark.parametrize("loops", [0, 1, 2, 3, 4, 6])
def test_every_loop_count_runs_the_band_that_many_extra_times(loops):
    seq = loop_plan().virtual_layers(loops)
    assert [layer for layer, _ in seq] == PRE + [3, 4, 5] * (loops + 1) + POST
    assert [slot for layer, slot in seq if layer not in (3, 4, 5)] == PRE + POST


def test_passes_beyond_the_trained_count_reuse_the_last_trained_pass_slots():
    passes = band_passes(loop_plan().virtual_layers(5), 6)
    assert [[slot for _, slot in p] for p in passes] == [
        [3, 4, 5], [11, 12, 13], [14, 15, 16], [14, 15, 16], [14, 15, 16], [14, 15, 16]]
    shorter = band_passes(loop_plan().virtual_layers(1), 2)
    assert [[slot for _, slot in p] for p in shorter] == [[3, 4, 5], [11, 12, 13]]
    assert loop_plan().num_slots == 17


def test_shared_parameters_put_every_pass_on_its_layer_slot():
    hp = hparams(SHARE_LOOP_PARAMS=1)
    for loops in (1, 2, 4):
        assert all(layer == slot for layer, slot in tg.LoopPlan.from_hyperparameters(hp).virtual_layers(loops))
    assert tg.LoopPlan.from_hyperparameters(hp).num_slots == 11 and tg.LoopPlan.from_hyperparameters(hp).mixed_slots == list(range(1, 11))
    # a band starting at layer 0 re-runs slot 0 on a mixed stream, so it gets a logit
    assert loop_plan(SHARE_LOOP_PARAMS=1, LOOP_START=0).mixed_slots == list(range(11))


def test_loop_sample_owns_slots_up_to_its_largest_count():
    hp = hparams(LOOP_SAMPLE="3,1")
    assert hp.loop_sample == (1, 3) and tg.LoopPlan.from_hyperparameters(hp).trained_counts == (0, 1, 3)
    assert tg.LoopPlan.from_hyperparameters(hp).num_slots == 11 + 3 * 3
    passes = band_passes(tg.LoopPlan.from_hyperparameters(hp).virtual_layers(4), 5)
    assert [[slot for _, slot in p] for p in passes][3:] == [[17, 18, 19], [17, 18, 19]]


def test_eval_loops_never_change_the_model_tensors():
    shapes = {n: p.shape for n, p in small_model().named_parameters()}
    model = small_model(EVAL_LOOPS="0,1,3,6")
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert sorted(model.sequences) == [0, 1, 2, 3, 6]


@pytest.mark.parametrize("flags", [dict(), dict(SHARE_LOOP_PARAMS=1)])
def test_forward_at_any_loop_count_calls_the_blocks_in_the_plan(flags):
    model = small_model(**flags)
    calls = []
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))  # lane layers skip Block.forward
    ids = torch.randint(0, 512, (1, 8))
    for loops in (0, 1, 4, 7):
        calls.clear()
        with model.looping(loops):
            loss = model(ids, ids)
        assert calls == [0] + [1, 2] * (loops + 1) + [3, 4] and math.isfinite(loss.item())


def test_skip_pair_k_uses_weight_k_and_pairs_beyond_the_trained_ones_get_none():
    # SMALL: 5 layers, band 1..2, NUM_LOOPS=2 -> 9 virtual layers, 4 trained skip pairs
    model = small_model()
    assert model.skip_weights.shape[0] == 4
    randomize(model)
    ids = torch.randint(0, 512, (2, 16))
    for loops, used in ((0, 2), (5, 4)):  # 5 virtual layers: 2 pairs; 15: 7 pairs, only 4 weighted
        model.zero_grad()
        with model.looping(loops):
            model(ids, ids).backward()
        rows = model.skip_weights.grad.abs().sum(dim=1)
        assert (rows[:used] > 0).all() and (rows[used:] == 0).all()


def test_shared_slot_zero_logit_is_trained_when_the_band_starts_at_layer_zero():
    model = small_model(SHARE_LOOP_PARAMS=1, LOOP_START=0, LOOP_END=1)
    randomize(model)
    ids = torch.randint(0, 512, (2, 16))  # NUM_LOOPS=2
    model(ids, torch.roll(ids, -1, 1)).backward()
    assert model.mix_logits.shape[0] == model.plan.num_slots == 5
    assert (model.mix_logits.grad.abs().sum(dim=1) > 0).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- loop-count draws ----------------------------------------------------------------------------


def test_loop_counts_are_drawn_from_the_set_by_seed_and_step():
    hp = hparams(LOOP_SAMPLE="1,2,3", SEED=5)
    draws = [tg.loop_count_at(step, hp) for step in range(300)]
    assert set(draws) == {1, 2, 3} and all(80 < draws.count(n) < 120 for n in (1, 2, 3))
    assert draws == [tg.loop_count_at(step, hp) for step in range(300)]
    assert draws != [tg.loop_count_at(step, hparams(LOOP_SAMPLE="1,2,3", SEED=6)) for step in range(300)]
    assert tg.loop_count_at(17, hparams(NUM_LOOPS=3)) == 3


@pytest.mark.parametrize("env, message", [
    (dict(EVAL_LOOPS="1,x"), "EVAL_LOOPS='1,x': expected comma-separated integers"),
    (dict(LOOP_SAMPLE="2,-1"), "LOOP_SAMPLE=(-1, 2): loop counts must be >= 0"),
    (dict(NUM_LOOPS=0, LOOP_SAMPLE="1,2"), "LOOP_SAMPLE=(1, 2): needs NUM_LOOPS > 0"),
    (dict(NUM_LOOPS=0, EVAL_LOOPS="2", LOOP_END=11), "LOOP_END=11: loop band must lie"),
])
def test_bad_loop_knobs_are_named(env, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.check_config(hparams(**env), world_size=1)


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_random_loop_counts_two_ranks_and_eval_loops(tiny_data, tmp_path):
    env = dict(E2E, DATA_DIR=tiny_data["root"], RUN_ID="dial", SEED=11, ITERATIONS=30, MAX_WALLCLOCK_SECONDS=0,
               ENABLE_LOOPING_AT_STEP=6, WARMUP_STEPS=1, VAL_LOSS_EVERY=0, LOOP_SAMPLE="0,1,2", EVAL_LOOPS="0,1,3",
               GPTQ_CALIBRATION_BATCHES=2, SLIDING_WINDOW_ENABLED=0)
    result = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         str(SCRIPT)], env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "logs" / "dial.txt").read_text()
    for loops in (0, 1, 2):
        assert f"warmup: 1 steps loops:{loops} done" in log
    assert "loop_sample:0,1,2" in log and "loop_counts: the 24 looped steps agree on all 2 ranks" in log
    record = json.loads((tmp_path / "logs" / "dial.json").read_text())
    counts = record["steps_per_loop_count"]
    assert set(counts) == {"0", "1", "2"} and sum(counts.values()) == 24
    metrics = record["metrics"]
    # NUM_LOOPS=1 is the trained evaluation count: EVAL_LOOPS reproduces the normal path exactly
    assert metrics["loops1_val_bpb"] == metrics["post_quant_val_bpb"]
    assert all(math.isfinite(metrics[f"loops{n}_val_bpb"]) for n in (0, 3))
    for n in (0, 1, 3):
        assert re.search(rf"^quantized_loops{n} val_loss:\d+\.\d{{8}} val_bpb:\d+\.\d{{8}} eval_time:\d+ms$", log, re.M)
