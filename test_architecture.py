"""Tests of train_gpt.py on CPU: they import the real script and use data made by conftest.py."""

import json
import math
import re
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from data.build_dataset import write_shard

from conftest import E2E, SCRIPT, hparams, loop_plan, randomize, run_script, small_model

def layers(plan):
    return [layer for layer, _ in plan]


# --- virtual layer sequences --------------------------------------------------------------------


def test_default_looped_sequence_matches_record():
    enc, dec = loop_plan().unet(2)
    assert layers(enc) == [0, 1, 2, 3, 4, 5, 3, 4]
    assert layers(dec) == [5, 3, 4, 5, 6, 7, 8, 9, 10]


def test_loop_end_6_sequence():
    enc, dec = loop_plan(LOOP_END=6).unet(2)
    assert layers(enc) == [0, 1, 2, 3, 4, 5, 6, 3, 4]
    assert layers(dec) == [5, 6, 3, 4, 5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("env", [dict(NUM_LOOPS=0), dict()])
def test_plain_sequence(env):
    # NUM_LOOPS=0 always, and any config before looping switches on, runs 0..NUM_LAYERS-1.
    enc, dec = loop_plan(**env).unet(0 if env else 2)
    if env:
        assert layers(enc) == [0, 1, 2, 3, 4] and layers(dec) == [5, 6, 7, 8, 9, 10]
    enc, dec = loop_plan(**env).unet(0)
    assert layers(enc) == [0, 1, 2, 3, 4] and layers(dec) == [5, 6, 7, 8, 9, 10]


def test_slots_are_unique_per_pass_and_plain_uses_physical_slots():
    hp = hparams()
    looped = tg.LoopPlan.from_hyperparameters(hp).virtual_layers(2)
    slots = [slot for _, slot in looped]
    assert sorted(slots) == list(range(tg.LoopPlan.from_hyperparameters(hp).num_slots)) == list(range(17))
    assert [slot for _, slot in tg.LoopPlan.from_hyperparameters(hp).virtual_layers(0)] == list(range(11))
    # the first pass of the band shares its slot with the plain sequence
    assert looped[3] == (3, 3) and looped[6] == (3, 11) and looped[9] == (3, 14)


def test_looping_block_chooses_the_sequence_and_restores_the_count():
    model = small_model()
    assert model.sequences[0] == model.plan.unet(0) and model.loops == model.hp.num_loops == 2
    calls = []
    for index, block in enumerate(model.blocks):  # attention runs in every layer, lane layers included
        block.attn.register_forward_hook(lambda m, i, o, index=index: calls.append(index))
    ids = torch.randint(0, 512, (1, 8))
    with model.looping(0):
        model.forward_logits(ids)
    plain = calls[:]
    calls.clear()
    model.forward_logits(ids)  # outside any block: the evaluated count, NUM_LOOPS
    assert plain == [0, 1, 2, 3, 4]
    assert calls == [0, 1, 2, 1, 2, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="inside"):
        with model.looping(5):
            assert model.loops == 5
            raise RuntimeError("inside")
    assert model.loops == 2  # restored even when the block raised


# --- forward and gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("flags", [dict(), dict(BIRKHOFF_MIX=0, OUTPUT_LN=0, TIMESTEP_SCALE=0),
                                   dict(NUM_LOOPS=0), dict(TIE_EMBEDDINGS=0, SKIP_GATES_ENABLED=0)])
def test_forward_shapes_and_loss(flags):
    model = small_model(**flags)
    ids = torch.randint(0, 512, (3, 16))
    for loops in (0, 2):
        with model.looping(loops):
            logits = model.forward_logits(ids)
            loss = model(ids, ids)
        assert logits.shape == (3, 16, 512) and logits.dtype == torch.float32
        assert logits.abs().max() <= 30.0
        assert loss.ndim == 0 and math.isfinite(loss.item())


def test_fresh_model_predicts_nearly_uniform():
    model = small_model()
    loss = model(torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16)))
    assert abs(loss.item() - math.log(512)) < 0.05



@pytest.mark.parametrize("flags", [dict(), dict(BIRKHOFF_MIX=0, OUTPUT_LN=0, TIMESTEP_SCALE=0)])
def test_gradient_reaches_every_parameter_when_looping(flags):
    model = small_model(**flags)
    randomize(model)
    ids = torch.randint(0, 512, (2, 16))
    model(ids, torch.roll(ids, -1, 1)).backward()  # at NUM_LOOPS
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if not flags:
        # every virtual layer's own Birkhoff logits and timestep scales get a gradient
        # (slot 0 has no mix logit: the first layer always sees x == x0)
        for name, rows in (("mix_logits", 8), ("attn_step_scales", 9), ("mlp_step_scales", 9)):
            grad = getattr(model, name).grad
            assert grad.shape[0] == rows and model.plan.num_slots == 9
            assert (grad.abs().sum(dim=1) > 0).all(), name


def test_unlooped_forward_leaves_extra_pass_slots_untouched():
    model = small_model()
    randomize(model)
    ids = torch.randint(0, 512, (2, 16))
    with model.looping(0):
        model(ids, ids).backward()
    grad = model.mix_logits.grad.abs().sum(dim=1)
    assert (grad[:4] > 0).all() and (grad[4:] == 0).all()  # slots 1..4 used, extra-pass slots 5..8 not


# --- Birkhoff mixing, timestep scales, output-LN -------------------------------------------------


def test_birkhoff_mixing_matrix_has_spectral_norm_at_most_one():
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(1000) * 10, torch.tensor([-80.0, -1e-3, 0.0, 1e-3, 80.0])])
    a, b = tg.birkhoff_coefficients(logits)
    matrix = torch.stack([torch.stack([a, b], -1), torch.stack([b, a], -1)], -2)
    assert (matrix >= 0).all()
    assert torch.allclose(matrix.sum(-1), torch.ones(())) and torch.allclose(matrix.sum(-2), torch.ones(()))
    assert (torch.linalg.matrix_norm(matrix.double(), ord=2) <= 1 + 1e-6).all()


def test_birkhoff_mix_is_convex_combination_in_model():
    model = small_model(BIRKHOFF_INIT=0.7)
    x, x0 = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    assert torch.allclose(model.stream_mix(x, x0, 1, 1), 0.7 * x + 0.3 * x0, atol=1e-6)
    assert torch.equal(model.stream_mix(x, x0, 0, 0), x)
    free = small_model(BIRKHOFF_MIX=0)
    assert torch.allclose(free.stream_mix(x, x0, 0, 0), x)  # free mix starts as (1, 0)


def test_timestep_scales_are_clamped():
    model = small_model(TIMESTEP_CAP=2)
    randomize(model)
    with torch.no_grad():
        model.attn_step_scales.fill_(10.0)
        model.mlp_step_scales.fill_(-10.0)
    attn, mlp = model.step_gains(3)
    assert (attn == 2.0).all() and (mlp == -2.0).all()
    ids = torch.randint(0, 512, (1, 16))
    clamped = model.forward_logits(ids)
    with torch.no_grad():
        model.attn_step_scales.fill_(2.0)
        model.mlp_step_scales.fill_(-2.0)
    assert torch.allclose(clamped, model.forward_logits(ids))
    with torch.no_grad():
        model.attn_step_scales.fill_(10.0)
    model(ids, ids).backward()
    assert (model.attn_step_scales.grad == 0).all()  # the clamp is active: no gradient past the cap


def test_timestep_cap_none_does_not_clamp():
    model = small_model(TIMESTEP_CAP="none")
    with torch.no_grad():
        model.attn_step_scales.fill_(10.0)
    assert (model.step_gains(0)[0] == 10.0).all()


@pytest.mark.parametrize("layer", [0, 3])
def test_output_ln_mlp_branch_rms_follows_its_scale(layer):
    model = small_model()
    block = model.blocks[layer]
    randomize(model)
    x = torch.randn(4, 16, 32) * 7.0
    gain = torch.full((32,), 1.5)
    with torch.no_grad():
        block.mlp_scale.fill_(0.8)
    out = block.mlp_branch(x) * tg.branch_scale(block.mlp_scale, gain, x.dtype)
    rms = out.pow(2).mean(-1).sqrt()
    expected = 0.8 * 1.5 / math.sqrt(layer + 1)
    assert torch.allclose(rms, torch.full_like(rms, expected), rtol=1e-4)
    # without output-LN the branch output is not normalized
    plain = small_model(OUTPUT_LN=0).blocks[layer]
    randomize(plain)
    assert not torch.allclose(plain.mlp_branch(x).pow(2).mean(-1).sqrt(), torch.full_like(rms, 1 / math.sqrt(layer + 1)), rtol=0.1)


def test_parallel_layers_and_xsa_flags():
    model = small_model(PARALLEL_START_LAYER=-1, PARALLEL_RESIDUAL_START=3, XSA_LAST_N=2)
    assert [b.parallel for b in model.blocks] == [False, False, False, True, True]
    assert [b.attn.use_xsa for b in model.blocks] == [False, False, False, True, True]
    assert not any(b.parallel for b in small_model(PARALLEL_RESIDUAL_START=-1).blocks)


def test_xsa_removes_own_value_direction():
    y, v = torch.randn(2, 4, 5, 8).transpose(1, 2), torch.randn(2, 5, 2, 8)  # (B, T, H, D), non-contiguous like SDPA's
    assert not y.is_contiguous()
    out = tg.remove_self_value(y, v)
    vn = torch.nn.functional.normalize(v, dim=-1).repeat_interleave(2, dim=2)
    assert torch.allclose((out * vn).sum(-1), torch.zeros(2, 5, 4), atol=1e-5)


def test_rotary_touches_only_rope_dims_and_preserves_norm():
    cos, sin = tg.rotary_tables(4, 10000.0, 16)
    x = torch.randn(1, 16, 2, 8)
    y = tg.apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert torch.allclose(y[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1), atol=1e-5)
    assert torch.equal(y[:, 0], x[:, 0])  # position 0 is not rotated


def test_gqa_attention_is_causal():
    q, k, v = torch.randn(1, 6, 4, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    y = tg.causal_attention(q, k, v, "sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[:, 4:], v2[:, 4:] = 0, 0
    assert torch.allclose(y[:, :4], tg.causal_attention(q, k2, v2, "sdpa")[:, :4], atol=1e-6)


# --- optimizer assignment ------------------------------------------------------------------------


class FakeRuntime:
    rank, world_size, device, compile = 0, 1, torch.device("cpu"), False


@pytest.mark.parametrize("flags", [dict(), dict(BIRKHOFF_MIX=0, TIMESTEP_SCALE=0), dict(TIE_EMBEDDINGS=0),
                                   dict(SPARSE_ATTN_GATE_ENABLED=0, SMEAR_GATE_ENABLED=0)])
def test_every_parameter_in_exactly_one_optimizer_in_fp32(flags):
    model = small_model(**flags)
    groups = tg.param_groups(model)
    named = dict(model.named_parameters())
    listed = [name for members in groups.values() for name, _ in members]
    assert sorted(listed) == sorted(named) and len(set(listed)) == len(listed)
    optimizers = tg.build_optimizers(model, model.hp, FakeRuntime())
    in_optimizers = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(in_optimizers) == sorted(id(p) for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    scalar = {name for name, _ in groups["scalar"]}
    matrix = {name for name, _ in groups["matrix"]}
    assert all(p.ndim == 2 for _, p in groups["matrix"])
    assert {"skip_weights"} <= scalar and all(n.endswith(".weight") and ".blocks" not in n for n in [] )
    assert all(n.startswith("blocks.") for n in matrix)
    if not flags:
        assert {"mix_logits", "attn_step_scales", "mlp_step_scales", "skip_gates"} <= scalar
        gates = {"smear_gate_w", "smear_lambda", *(f"blocks.{i}.attn.attn_gate_w" for i in range(model.hp.num_layers))}
        assert gates <= scalar  # the small gate matrices go to AdamW with the control tensors, as in the records
        # the logit caps: in the scalar AdamW, in its group without weight decay
        assert {"softcap_pos", "softcap_neg"} <= scalar
        assert {"parallel_post_lambdas", "parallel_resid_lambdas"} <= scalar  # the two-lane decoder's π and ρ
        undecayed = optimizers[2].param_groups[1]
        assert undecayed["weight_decay"] == 0.0
        assert {id(p) for p in undecayed["params"]} == {id(named["softcap_pos"]), id(named["softcap_neg"])}
    assert isinstance(optimizers[0], tg.Muon) and {id(p) for p in optimizers[0].param_groups[0]["params"]} == {id(named[n]) for n in matrix}


def test_muon_update_is_orthogonal_and_scaled():
    torch.manual_seed(0)
    g = torch.randn(64, 32)
    u = tg.newton_schulz(g, steps=5)
    s = torch.linalg.svdvals(u)
    assert s.max() < 1.3 and s.min() > 0.5  # Polar-Express NS: ~[0.86, 1.14] (test_recipe.py)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_muon_update_is_rounded_alike_on_every_device(dtype):
    hp = hparams(MUON_UPDATE_DTYPE=dtype)
    cpu, cuda = tg.muon_precision(hp, torch.device("cpu")), tg.muon_precision(hp, torch.device("cuda"))
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert cpu.update == cuda.update == want
    assert cpu.iterate == cpu.exchange == torch.float32 and cuda.iterate == cuda.exchange == want
    model = small_model(MUON_UPDATE_DTYPE=dtype)
    muon = tg.build_optimizers(model, model.hp, FakeRuntime())[0]
    group = muon.param_groups[0]
    group.update(momentum=0.0, weight_decay=0.0, lr=0.5)  # no momentum: the update depends on the gradient only
    for q in group["params"]:
        q.grad = torch.randn_like(q)
    p = group["params"][0]
    update = muon.own_update(p, 0.0)
    assert update.dtype == want and update.shape == p.shape
    before = p.detach().clone()
    muon.step()  # applies exactly -lr times the rounded update
    assert torch.allclose(before - p.detach(), 0.5 * update.float(), rtol=0, atol=1e-6)
    if dtype == "bf16":
        assert not torch.equal(update.float(), tg.newton_schulz(p.grad / p.grad.norm(dim=-1, keepdim=True), 5))


def test_training_step_changes_every_parameter_group():
    model = small_model()
    randomize(model)
    optimizers = tg.build_optimizers(model, model.hp, FakeRuntime())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 512, (2, 16))
    model(ids, torch.roll(ids, -1, 1)).backward()  # at NUM_LOOPS
    for opt in optimizers:
        opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(before[n], p.detach()), n


def test_lr_schedule_and_momentum_warmup():
    hp = hparams(WARMDOWN_FRAC=0.5, MIN_LR=0.1, MUON_MOMENTUM_WARMUP_STEPS=10)
    assert tg.lr_multiplier(0.0, hp) == 1.0 and tg.lr_multiplier(0.49, hp) == 1.0
    assert tg.lr_multiplier(0.75, hp) == pytest.approx(0.55)
    assert tg.lr_multiplier(1.0, hp) == pytest.approx(0.1)
    assert tg.muon_momentum_at(0, hp) == pytest.approx(0.92) and tg.muon_momentum_at(20, hp) == pytest.approx(0.97)
    assert tg.looping_due(0, 0.34, hparams()) is False and tg.looping_due(0, 0.35, hparams()) is True
    assert tg.looping_due(99, 0.99, hparams(ENABLE_LOOPING_AT_STEP=100)) is False
    assert tg.looping_due(0, 0.0, hparams(NUM_LOOPS=0)) is False


# --- data ----------------------------------------------------------------------------------------


def test_bpb_byte_count_equals_decode_and_count(tiny_data):
    sp, tokens = tiny_data["sp"], torch.from_numpy(tiny_data["val_tokens"])
    counts = tg.byte_counts(sp)
    counted = counts.count(tokens[:-1], tokens[1:]).sum().item()
    decoded = sum(len(sp.decode(doc.tolist()).encode("utf-8"))
                  for doc in np.split(tiny_data["val_tokens"], np.flatnonzero(tiny_data["val_tokens"] == 1)[1:]))
    assert counted == decoded
    assert decoded == sum(len(d.encode("utf-8")) for d in tiny_data["val_docs"])  # nfkc leaves this text as is
    assert any(sp.is_byte(int(t)) for t in tokens)  # byte fallback is exercised


def test_loader_ranks_draw_disjoint_sequences_covering_the_epoch(tiny_data):
    files = sorted(tiny_data["shards"].glob("fineweb_train_*.bin"))
    loaders = [tg.TrainLoader(files, 16, 512, seed=3, rank=r, world_size=2, device=torch.device("cpu")) for r in (0, 1)]
    for loader in loaders:
        loader.start_epoch()
    starts = [set(map(tuple, loader.order.tolist())) for loader in loaders]
    assert not starts[0] & starts[1]
    total = sum((len(tg.open_shard(f)) - 1) // 16 for f in files)
    assert total - 2 <= len(starts[0]) + len(starts[1]) <= total
    x, y = loaders[0].next_batch(3)
    assert x.shape == y.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_validation_tokens_trimmed_to_whole_sequences(tiny_data):
    hp = hparams(DATA_DIR=tiny_data["root"], VOCAB_SIZE=512, EVAL_SEQ_LEN=64)
    tokens = tg.load_validation_tokens(hp)
    assert (len(tokens) - 1) % 64 == 0 and len(tokens) > len(tiny_data["val_tokens"]) - 65


@pytest.fixture
def data_copy(tiny_data, tmp_path):
    root = tmp_path / "data"
    shards = root / "datasets" / "fineweb10B_sp512"
    shards.mkdir(parents=True)
    (root / "tokenizers").mkdir()
    for f in tiny_data["shards"].iterdir():
        (shards / f.name).write_bytes(f.read_bytes())
    for f in (tiny_data["root"] / "tokenizers").iterdir():
        (root / "tokenizers" / f.name).write_bytes(f.read_bytes())
    return root


def test_bad_shard_header_size_and_tokens(data_copy):
    val = data_copy / "datasets" / "fineweb10B_sp512" / "fineweb_val_000000.bin"
    hp = hparams(DATA_DIR=data_copy, VOCAB_SIZE=512, EVAL_SEQ_LEN=64)
    write_shard(val, np.arange(100))
    val.write_bytes(b"\x00\x00\x00\x00" + val.read_bytes()[4:])  # clobber the magic number
    with pytest.raises(tg.DataError, match="bad shard header"):
        tg.load_validation_tokens(hp)
    write_shard(val, np.arange(100))
    val.write_bytes(val.read_bytes()[:-2])
    with pytest.raises(tg.DataError, match="header promises 100 tokens"):
        tg.load_validation_tokens(hp)
    write_shard(val, np.full(100, 600))
    with pytest.raises(tg.DataError, match="token id 600 >= VOCAB_SIZE=512"):
        tg.load_validation_tokens(hp)
    train = data_copy / "datasets" / "fineweb10B_sp512" / "fineweb_train_000000.bin"
    write_shard(train, np.full(1000, 513))
    loader = tg.TrainLoader([train], 16, 512, 0, 0, 1, torch.device("cpu"))
    with pytest.raises(tg.DataError, match="token id 513 >= VOCAB_SIZE=512"):
        loader.next_batch(2)


def test_missing_data_and_tokenizer_mismatch(data_copy, tmp_path):
    with pytest.raises(tg.DataError, match="does not exist"):
        tg.find_shards(hparams(DATA_DIR=tmp_path / "nowhere", VOCAB_SIZE=512), "train")
    with pytest.raises(tg.DataError, match="no train shards"):
        for f in (data_copy / "datasets" / "fineweb10B_sp512").glob("*train*"):
            f.unlink()
        tg.find_shards(hparams(DATA_DIR=data_copy, VOCAB_SIZE=512), "train")
    model = data_copy / "tokenizers" / "fineweb_512_bpe.model"
    model.rename(data_copy / "tokenizers" / "fineweb_1024_bpe.model")
    with pytest.raises(tg.DataError, match="has 512 pieces but VOCAB_SIZE=1024"):
        tg.load_tokenizer(hparams(DATA_DIR=data_copy, VOCAB_SIZE=1024))


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("env, message", [
    (dict(NUM_LAYERS="eleven"), "NUM_LAYERS='eleven': expected an integer"),
    (dict(MATRIX_LR="fast"), "MATRIX_LR='fast': expected a number"),
    (dict(BIRKHOFF_MIX="maybe"), "BIRKHOFF_MIX='maybe': expected 0 or 1"),
    (dict(LOOP_START=5, LOOP_END=3), "LOOP_END=3: must be >= LOOP_START=5"),
    (dict(LOOP_END=11), "LOOP_END=11: loop band must lie in 0..NUM_LAYERS-1=10"),
    (dict(LOOP_START=-1), "LOOP_START=-1: loop band must lie"),
    (dict(MODEL_DIM=500), "MODEL_DIM=500: must be divisible by NUM_HEADS=8"),
    (dict(NUM_KV_HEADS=3), "NUM_HEADS=8: must be divisible by NUM_KV_HEADS=3"),
    (dict(TRAIN_BATCH_TOKENS=1000), "TRAIN_BATCH_TOKENS=1000: must be a multiple"),
    (dict(ENABLE_LOOPING_AT=1.5), "ENABLE_LOOPING_AT=1.5: must be a fraction"),
    (dict(BIRKHOFF_INIT=1), "BIRKHOFF_INIT=1.0: must lie strictly between 0 and 1"),
    (dict(TIMESTEP_CAP=-1), "TIMESTEP_CAP=-1.0: must be positive"),
    (dict(ATTN_BACKEND="xformers"), "ATTN_BACKEND='xformers': must be auto, fa3 or sdpa"),
    (dict(MUON_NS_COEFFS="cubic"), "MUON_NS_COEFFS='cubic': must be one of polar_express, quintic"),
    (dict(LOSS_CHUNK_TOKENS=-1), "LOSS_CHUNK_TOKENS=-1: must be >= 0"),
])
def test_bad_variables_are_named(env, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.check_config(hparams(**env), world_size=1)


def test_world_size_must_divide_8():
    with pytest.raises(tg.ConfigError, match="WORLD_SIZE=3: must divide 8"):
        tg.check_config(hparams(), world_size=3)
    tg.check_config(hparams(), world_size=4)


def test_defaults_are_the_record_stack_plus_ours():
    hp = hparams()
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.num_kv_heads, hp.mlp_mult) == (11, 512, 8, 4, 4.0)
    assert (hp.num_loops, hp.loop_start, hp.loop_end, hp.enable_looping_at) == (2, 3, 5, 0.35)
    assert (hp.qk_gain_init, hp.parallel_residual_start, hp.xsa_last_n, hp.rope_dims) == (5.25, -1, 11, 16)
    assert hp.parallel_start_layer == 8  # the two-lane decoder (#1529 on); README restores 04-09 with PARALLEL_RESIDUAL_START=7
    assert (hp.birkhoff_mix, hp.output_ln, hp.timestep_scale, hp.timestep_cap) == (True, True, True, 4.0)
    # the optimizer recipe of the final leaderboard (#2135); README "Reproducing public stacks" restores 04-09's
    assert (hp.matrix_lr, hp.muon_wd, hp.ema_decay, hp.warmdown_frac) == (0.028, 0.095, 0.9965, 0.85)
    assert (hp.muon_momentum, hp.min_lr, hp.beta2, hp.muon_ns_coeffs) == (0.97, 0.1, 0.99, "polar_express")
    assert (hp.asym_logit_rescale, hp.loss_chunk_tokens) == (True, 8192)
    assert len(hparams().run_id) == 36 and hparams(RUN_ID="abc").run_id == "abc"


def test_every_knob_has_a_doc_string_and_no_knob_is_read_outside_the_configuration():
    for f in tg.dataclasses.fields(tg.Hyperparameters):
        assert f.metadata.get("doc"), f.name
    source = SCRIPT.read_text()
    assert source.count("os.environ") == 2 and "environ.get(f.name.upper())" in source  # from_env, and main()


def test_script_reports_bad_variable_without_traceback(tmp_path):
    result = run_script([sys.executable, str(SCRIPT)], dict(LOOP_START=4, LOOP_END=2), tmp_path)
    assert result.returncode != 0
    assert "configuration error: LOOP_END=2: must be >= LOOP_START=4" in result.stderr
    assert "Traceback" not in result.stderr


def test_script_reports_missing_data_without_traceback(tmp_path):
    result = run_script([sys.executable, str(SCRIPT)], dict(DATA_DIR=tmp_path / "none", RUN_ID="missing"), tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "data error: tokenizer" in result.stderr and "does not exist" in result.stderr
    record = json.loads((tmp_path / "logs" / "missing.json").read_text())
    assert record["status"] == "failed" and "DataError" in record["error"]


# --- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_torchrun_two_ranks_on_cpu(tiny_data, tmp_path):
    env = dict(E2E, DATA_DIR=tiny_data["root"], RUN_ID="e2e", SEED=7)
    result = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         str(SCRIPT)], env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "logs" / "e2e.txt").read_text()
    assert "world_size:2 grad_accum_steps:4" in log and "attention: sdpa" in log
    assert re.search(r"^1/400 train_loss: \d+\.\d{4} train_time: \d+\.\dm tok/s: \d+$", log, re.M)
    assert re.search(r"^layer_loop:enabled step:\d+ frac:0\.3\d\d encoder:\[0, 1, 2\] decoder:\[1, 2, 3\]$", log, re.M)
    assert re.search(r"^stopping_early: wallclock_cap train_time: \d+ms step: \d+/400$", log, re.M)
    assert re.search(r"^\d+/400 val_loss: \d+\.\d{4} val_bpb: \d+\.\d{4}$", log, re.M)
    final = re.search(r"^pre-quantization post-ema val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8}) eval_time:\d+ms$", log, re.M)
    assert final
    tokens = tiny_data["val_tokens"]
    uniform_bpb = math.log2(512) * (len(tokens) - 1) / sum(len(d.encode()) for d in tiny_data["val_docs"])
    assert float(final.group(2)) < 0.8 * uniform_bpb
    record = json.loads((tmp_path / "logs" / "e2e.json").read_text())
    assert record["status"] == "completed" and record["world_size"] == 2
    assert record["metrics"]["pre_quant_val_bpb"] == pytest.approx(float(final.group(2)), abs=1e-8)
    assert record["hyperparameters"]["loop_end"] == 2 and record["steps"] > 5
    assert record["looping_enabled_step"] is not None and record["val_curve"][0]["step"] == 0
