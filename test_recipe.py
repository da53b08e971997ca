"""Tests of the final leaderboard's optimizer recipe (Polar-Express Newton–Schulz), the trained asymmetric
logit cap (AsymLogit) and the chunked cross-entropy (CPU, the real train_gpt.py)."""

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import CPU, hparams, randomize, small_model

POLAR = tg.NS_COEFFICIENTS["polar_express"]


# --- Newton–Schulz schedules ---------------------------------------------------------------------


def test_schedule_takes_a_prefix_and_repeats_its_last_tuple():
    assert tg.ns_schedule("polar_express", 3) == POLAR[:3]
    assert tg.ns_schedule("polar_express", 5) == POLAR
    assert tg.ns_schedule("polar_express", 7) == POLAR + (POLAR[-1], POLAR[-1])
    assert tg.ns_schedule("quintic", 5) == ((3.4445, -4.7750, 2.0315),) * 5


def hand_rolled(g: torch.Tensor, tuples) -> torch.Tensor:
    """Newton–Schulz written out for a wide matrix, one given (a, b, c) per iteration."""
    x = g / (g.norm() + 1e-7)
    for a, b, c in tuples:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def test_each_iteration_uses_its_own_tuple():
    torch.manual_seed(0)
    wide, tall = torch.randn(24, 40), torch.randn(40, 24)
    for steps in (1, 2, 5):
        assert torch.allclose(tg.newton_schulz(wide, steps), hand_rolled(wide, POLAR[:steps]), atol=1e-5)
        assert torch.allclose(tg.newton_schulz(tall, steps), hand_rolled(tall.T, POLAR[:steps]).T, atol=1e-5)
    quintic = tg.newton_schulz(wide, 2, "quintic")
    assert torch.allclose(quintic, hand_rolled(wide, [(3.4445, -4.7750, 2.0315)] * 2), atol=1e-5)
    assert not torch.allclose(quintic, tg.newton_schulz(wide, 2), atol=1e-2)


def test_polar_express_brings_singular_values_near_one_in_5_steps():
    torch.manual_seed(0)
    g = torch.randn(128, 64)
    polar = torch.linalg.svdvals(tg.newton_schulz(g, 5))
    quintic = torch.linalg.svdvals(tg.newton_schulz(g, 5, "quintic"))
    assert polar.min() > 0.85 and polar.max() < 1.15  # measured [0.859, 1.141]
    assert quintic.min() < 0.75 and polar.min() > quintic.min() + 0.1  # the fixed quintic leaves [0.682, 1.134]
    extra = torch.linalg.svdvals(tg.newton_schulz(g, 9))  # past the schedule the last tuple repeats
    assert extra.min() > 0.95 and extra.max() < 1.07  # measured [1.000, 1.062]


def test_muon_orthogonalizes_with_the_chosen_schedule():
    class Rt:
        rank, world_size, device, compile = 0, 1, torch.device("cpu"), False

    g = torch.randn(32, 48)
    for name in tg.NS_COEFFICIENTS:
        model = small_model(MUON_NS_COEFFS=name)
        muon = tg.build_optimizers(model, model.hp, Rt())[0]
        assert torch.equal(muon.orthogonalize(g, 5), tg.newton_schulz(g, 5, name)), name


# --- AsymLogit -----------------------------------------------------------------------------------


def test_equal_caps_give_the_symmetric_softcap_and_unequal_caps_split_by_sign():
    z = torch.linspace(-80, 80, 401)
    cap = torch.tensor(30.0)
    assert torch.equal(tg.asymmetric_softcap(z, cap, cap), 30.0 * torch.tanh(z / 30.0))
    out = tg.asymmetric_softcap(z, torch.tensor(10.0), torch.tensor(40.0))
    assert out.max() < 10.0 and out.min() < -35.0
    assert torch.equal(out[z >= 0], 10.0 * torch.tanh(z[z >= 0] / 10.0))


def test_model_with_initial_caps_equals_the_symmetric_model():
    sym, asym = small_model(ASYM_LOGIT_RESCALE=0), small_model(ASYM_LOGIT_RESCALE=1)
    randomize(sym)
    asym.load_state_dict(sym.state_dict(), strict=False)
    assert asym.softcap_pos.item() == asym.softcap_neg.item() == 30.0 and not hasattr(sym, "softcap_pos")
    ids = torch.randint(0, 512, (2, 16))
    assert torch.equal(asym.forward_logits(ids), sym.forward_logits(ids))
    assert torch.equal(asym(ids, ids), sym(ids, ids))


def test_caps_get_gradients_in_training_and_change_after_a_step():
    model = small_model()
    randomize(model)
    with torch.no_grad():  # back at their init, as training starts
        model.softcap_pos.fill_(30.0)
        model.softcap_neg.fill_(30.0)
    optimizers = tg.build_optimizers(model, model.hp, CPU)
    ids = torch.randint(0, 512, (2, 16))
    model(ids, torch.roll(ids, -1, 1)).backward()
    assert model.softcap_pos.grad.abs() > 0 and model.softcap_neg.grad.abs() > 0
    for opt in optimizers:
        opt.step()
    assert model.softcap_pos.item() != 30.0 and model.softcap_neg.item() != 30.0


def test_scoring_paths_see_the_trained_caps():
    model = small_model()
    randomize(model)
    ids = torch.randint(0, 512, (2, 16))
    before_logits, before_loss = model.forward_logits(ids), model(ids, ids)
    with torch.no_grad():
        model.softcap_neg.fill_(5.0)
    after_logits = model.forward_logits(ids)
    assert not torch.equal(before_logits, after_logits) and after_logits.min() >= -5.0
    assert not torch.equal(before_loss, model(ids, ids))


def test_artifact_round_trip_keeps_the_caps():
    hp = hparams(ASYM_LOGIT_RESCALE=1, VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2,
                 ROPE_DIMS=4, XSA_LAST_N=2, NUM_LOOPS=0, TRAIN_SEQ_LEN=16, EVAL_SEQ_LEN=16)
    model = tg.GPT(hp)
    with torch.no_grad():
        model.softcap_pos.fill_(27.5)
        model.softcap_neg.fill_(33.25)
    back = tg.dequantize_state(tg.parse_artifact(tg.serialize_artifact(tg.quantize_state(model, {}, hp), hp), hp))
    assert back["softcap_pos"].item() == 27.5 and back["softcap_neg"].item() == 33.25
    assert tg.architecture_of(hp)["asym_logit_rescale"] is True


# --- chunked cross-entropy -----------------------------------------------------------------------


def loss_and_grads(model: tg.GPT, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(ids, torch.roll(ids, -1, 1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunked_loss_and_every_gradient_equal_the_plain_loss():
    plain, chunked = small_model(LOSS_CHUNK_TOKENS=0), small_model(LOSS_CHUNK_TOKENS=7)  # 48 tokens: ragged chunks
    randomize(plain)
    chunked.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 512, (3, 16))
    want_loss, want = loss_and_grads(plain, ids)
    got_loss, got = loss_and_grads(chunked, ids)
    assert torch.allclose(got_loss, want_loss, rtol=1e-6, atol=0)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-7), name
    with torch.no_grad():  # the evaluation path (no graph to checkpoint) agrees too
        assert torch.allclose(chunked(ids, ids), plain(ids, ids), rtol=1e-6, atol=0)


@pytest.mark.slow  # ~20 s of torch.compile on a loaded CPU
def test_chunked_loss_compiles_as_one_graph():
    torch.manual_seed(0)
    weight = torch.randn(64, 16, requires_grad=True)
    h, targets = torch.randn(50, 16, requires_grad=True), torch.randint(0, 64, (50,))

    def head(x):
        return tg.asymmetric_softcap(F.linear(x, weight), torch.tensor(2.0), torch.tensor(3.0))

    compiled = torch.compile(lambda a, b: tg.chunked_cross_entropy(head, a, b, 16), fullgraph=True, dynamic=False)
    loss = compiled(h, targets)
    loss.backward()
    want = F.cross_entropy(head(h), targets)
    assert torch.allclose(loss, want, rtol=1e-6)
    assert torch.allclose(h.grad, torch.autograd.grad(want, h)[0], rtol=1e-4, atol=1e-7)
