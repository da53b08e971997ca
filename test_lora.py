"""Phased per-document LoRA TTT (TTT_MODE=phased): documents, batches, rank assignment, the adapters inside
the model's forward, and its legality: every target scored once, nothing trained on before it is scored."""

import dataclasses
import json
import math
import re
import sys
import time

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import CPU, E2E, SCRIPT, hparams, randomize, run_script

VOCAB = 64
ENV = dict(VOCAB_SIZE=VOCAB, NUM_LAYERS=3, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=4, XSA_LAST_N=3,
           NUM_LOOPS=1, LOOP_START=1, LOOP_END=1, PARALLEL_START_LAYER=2, TRAIN_SEQ_LEN=64, EVAL_SEQ_LEN=64,
           VAL_BATCH_TOKENS=8 * 64, TTT_ENABLED=1, TTT_MODE="phased", TTT_EVAL_SEQ_LEN=64, TTT_CHUNK_SIZE=8,
           TTT_BATCH_SIZE=4, TTT_LORA_RANK=4, TTT_MASK="q,k,v,o,mlp,head", TTT_LORA_LR=0.01,
           PHASED_TTT_PREFIX_DOCS=6, PHASED_TTT_NUM_PHASES=2, GLOBAL_TTT_LR=0.01, GLOBAL_TTT_CHUNK_TOKENS=64)


def doc_stream(num_docs: int, seed: int, max_len: int = 60, lead: int = 0) -> np.ndarray:
    """`lead` tokens before the first BOS, then documents of random length; ids >= 2 (1 is BOS)."""
    rng = np.random.default_rng(seed)
    parts = [rng.integers(2, VOCAB, lead)]
    for _ in range(num_docs):
        parts += [[tg.BOS_ID], rng.integers(2, VOCAB, int(rng.integers(1, max_len)))]
    return np.concatenate(parts).astype(np.uint16)


def setup(num_docs: int = 18, seed: int = 0, **overrides):
    hp = hparams(**{**ENV, **overrides})
    tg.check_config(hp, 1)
    torch.manual_seed(0)
    model = tg.GPT(hp)
    randomize(model)
    counts = tg.ByteCounts(torch.arange(VOCAB) % 3 + 1, torch.zeros(VOCAB, dtype=torch.bool),
                           torch.zeros(VOCAB, dtype=torch.bool))
    return hp, model, tg.Validation(doc_stream(num_docs, seed), counts)


def phased(model, val, hp, observer=None, tilt=None, rt=CPU, deadline=None):
    return tg.phased_ttt_eval(model, val, hp, rt, lambda message: None, observer, tilt, deadline)


# --- documents, batches, ranks ---------------------------------------------------------------------


@pytest.mark.parametrize("lead", [0, 3])
@pytest.mark.parametrize("trailing_bos", [False, True])
def test_documents_hold_every_target_once_and_end_at_the_next_bos(lead, trailing_bos):
    tokens = doc_stream(7, seed=lead, lead=lead)
    if trailing_bos:
        tokens = np.append(tokens, tg.BOS_ID).astype(np.uint16)
    docs = tg.val_documents(tokens)
    targets = np.concatenate([np.arange(s + 1, s + n + 1) for s, n in zip(docs.starts, docs.lengths)])
    assert np.array_equal(targets, np.arange(1, len(tokens)))
    ends = docs.starts + docs.lengths
    assert all(tokens[e] == tg.BOS_ID for e in ends[:-1])  # each document's last target is the next BOS


def test_batches_group_similar_lengths_longest_first_and_hold_every_document_once():
    lengths = np.random.default_rng(0).integers(1, 100, 23)
    batches = tg.ttt_batches(lengths, 5)
    assert sorted(np.concatenate(batches).tolist()) == list(range(23))
    assert [len(b) for b in batches] == [3, 5, 5, 5, 5]  # the remainder holds the longest documents
    maxima = [lengths[b].max() for b in batches]
    assert maxima == sorted(maxima, reverse=True)
    assert all(lengths[a].min() >= lengths[b].max() for a, b in zip(batches, batches[1:]))


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_every_batch_goes_to_exactly_one_rank_and_loads_are_balanced(world_size):
    costs = np.random.default_rng(world_size).integers(1, 1000, 41).tolist()
    shares = tg.assign_batches(costs, world_size)
    assert len(shares) == world_size
    assert sorted(i for share in shares for i in share) == list(range(41))
    assert all(share == sorted(share) for share in shares)  # each rank keeps the longest-first order
    loads = [sum(costs[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(costs)
    assert tg.assign_batches(costs, world_size) == shares  # the same on every rank


def test_batch_cost_counts_padded_window_tokens():
    # chunks of 4 up to length 10 end at 4, 8, 10; windows capped at 6 tokens: 4 + 6 + 6, times 3 rows
    assert tg.batch_cost(np.array([3, 10, 7]), chunk=4, context=6) == 3 * 16


def test_phases_end_after_the_batches_holding_each_cumulative_prefix():
    batches = [np.arange(4)] * 5  # 20 documents
    assert tg.phase_ends(batches, 10, 3) == [(1, 3), (2, 6), (3, 10)]
    assert tg.phase_ends(batches, 8, 1) == [(2, 8)]
    assert tg.phase_ends(batches, 0, 1) == []
    assert tg.phase_ends(batches, 12, 2) == [(2, 6), (3, 12)]
    assert tg.phase_ends(batches, 40, 2) == []  # all 20 documents: nothing left to score after the phase


def test_chunk_rows_score_the_chunk_with_the_context_before_it_and_never_train_on_the_last_chunk():
    tokens = np.arange(100)
    starts, lengths = np.array([0, 50]), np.array([20, 9])
    rows = tg.chunk_rows(tokens, starts, lengths, index=1, chunk=8, context=12, growth=2.0)
    # document 0: targets 8..15, window of 12 tokens ending at 16; document 1: targets 8 (its last chunk)
    assert rows.inputs[0].tolist() == list(range(4, 16))
    assert rows.targets[0].tolist() == list(range(5, 17))
    assert (rows.positions[0][rows.scored[0]] + 1).tolist() == list(range(9, 17))
    assert rows.weight[0][rows.scored[0]].tolist() == [1 / 8] * 8 and rows.weight[0][~rows.scored[0]].sum() == 0
    assert (rows.positions[1][rows.scored[1]] + 1).tolist() == [59] and rows.weight[1].sum() == 0
    assert rows.inputs[1, 9:].sum() == 0 and not rows.scored[1, 9:].any()  # right padding


def test_chunk_windows_are_padded_to_a_few_widths_fixed_by_the_knobs():
    assert tg.ttt_window_widths(48, 2560, 2.0) == [48, 96, 192, 384, 768, 1536, 2560]
    assert tg.ttt_window_widths(48, 2560, 1.5) == [48, 96, 144, 240, 384, 576, 864, 1296, 1968, 2560]
    assert tg.ttt_window_widths(8, 40, 1.01) == [8, 16, 24, 32, 40]  # at least one chunk wider each time
    assert tg.ttt_window_widths(8, 8, 2.0) == [8]
    assert [tg.padded_width(w, 48, 2560, 2.0) for w in (1, 48, 49, 1537, 2560)] == [48, 48, 96, 2560, 2560]
    rows = tg.chunk_rows(np.arange(100), np.array([0]), np.array([30]), index=2, chunk=8, context=64, growth=2.0)
    assert rows.inputs.shape == (1, 32)  # a 24-token window (targets 17..24) padded to 32
    assert rows.inputs[0].tolist() == list(range(24)) + [0] * 8
    assert not rows.scored[0, 24:].any() and rows.weight[0, 24:].sum() == 0


# --- the adapters inside the forward ---------------------------------------------------------------


def test_each_site_and_each_documents_adapters_act_only_on_its_own_row():
    hp, model, _ = setup()
    x = torch.randint(2, VOCAB, (3, 20))
    base = model.forward_logits(x)
    for site in tg.LORA_SITES:
        lora = tg.BatchedLora(tg.lora_shapes(model, (site,)), 3, 4, 8.0, torch.Generator().manual_seed(0))
        with model.adapted(lora):
            assert torch.equal(model.forward_logits(x), base)  # B = 0: a fresh set changes nothing
            with torch.no_grad():
                lora.b[site][:, 1].normal_()
            adapted = model.forward_logits(x)
        assert torch.equal(adapted[[0, 2]], base[[0, 2]]), site
        assert not torch.allclose(adapted[1], base[1]), site
    assert model.adapters.lora is None and torch.equal(model.forward_logits(x), base)


def test_each_pass_of_a_looped_layer_has_its_own_adapter():
    hp, model, _ = setup()
    x = torch.randint(2, VOCAB, (1, 12))
    base = model.forward_logits(x)
    second_pass = model.plan.slot(1, 1)  # the looped layer 1's extra pass
    assert second_pass != 1
    for slot in (1, second_pass):
        lora = tg.BatchedLora(tg.lora_shapes(model, ("o",)), 1, 4, 8.0, torch.Generator().manual_seed(0))
        with torch.no_grad():
            lora.b["o"][slot].normal_()
        with model.adapted(lora):
            assert not torch.allclose(model.forward_logits(x), base), slot


# --- legality ----------------------------------------------------------------------------------------


class Recorder:
    """Checks, as events arrive, that no target is scored twice nor trained on before it is scored."""

    def __init__(self):
        self.scored, self.trained, self.events = set(), set(), []

    def __call__(self, kind, positions):
        self.events.append((kind, len(positions)))
        if kind == "score":
            assert not self.scored & set(positions), "a target was scored twice"
            self.scored.update(positions)
        else:
            assert set(positions) <= self.scored, "trained on a target before scoring it"
            self.trained.update(positions)


@pytest.mark.parametrize("prefix_docs,phases", [(0, 1), (6, 2), (11, 1)])
def test_every_target_is_scored_once_and_trained_on_only_after(prefix_docs, phases):
    hp, model, val = setup(PHASED_TTT_PREFIX_DOCS=prefix_docs, PHASED_TTT_NUM_PHASES=phases)
    before = [p.detach().clone() for p in model.parameters()]
    recorder = Recorder()
    loss, bpb = phased(model, val, hp, recorder)
    assert recorder.scored == set(range(1, len(val.tokens)))
    assert recorder.trained and math.isfinite(loss) and math.isfinite(bpb)
    changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert changed == (prefix_docs > 0)  # only the global phases touch the base weights
    assert all(p.requires_grad for p in model.parameters())


def test_a_documents_last_chunk_is_never_trained_on_by_its_adapters():
    hp, model, val = setup(PHASED_TTT_PREFIX_DOCS=0)
    recorder = Recorder()
    phased(model, val, hp, recorder)
    docs = tg.val_documents(val.tokens)
    c = hp.ttt_chunk_size
    last_chunks = {int(s) + t for s, n in zip(docs.starts, docs.lengths) for t in range((int(n) - 1) // c * c + 1, int(n) + 1)}
    assert not recorder.trained & last_chunks
    assert recorder.trained == set(range(1, len(val.tokens))) - last_chunks


def per_document_reference(model, val, tilt=None):
    """Sum of -log p(target) over every document scored whole as one row (no adapters), p the softmax
    of the logits, with β added at the hinted token when `tilt` is given (normalized explicitly)."""
    docs = tg.val_documents(val.tokens)
    nll, num_bytes = 0.0, 0.0
    with torch.no_grad():
        for s, n in zip(docs.starts.tolist(), docs.lengths.tolist()):
            x = torch.from_numpy(val.tokens[s:s + n].astype(np.int64))[None]
            y = torch.from_numpy(val.tokens[s + 1:s + n + 1].astype(np.int64))
            logits = model.forward_logits(x)[0].double()
            if tilt is not None:
                hints = tilt.hints[s + 1:s + n + 1].long()
                logits = logits + tilt.boost * torch.nn.functional.one_hot(hints.clamp(min=0), VOCAB) * (hints >= 0)[:, None]
            p = torch.softmax(logits, dim=-1)
            assert torch.allclose(p.sum(-1), torch.ones(n, dtype=torch.float64))
            nll -= p[torch.arange(n), y].log().sum().item()
            num_bytes += val.bytes.count(x[0], y).sum().item()
    return nll / (len(val.tokens) - 1), nll / math.log(2.0) / num_bytes


@pytest.mark.parametrize("tilted", [False, True])
def test_zero_learning_rates_score_as_a_plain_per_document_evaluation(tilted):
    hp, model, val = setup(TTT_LORA_LR=0, GLOBAL_TTT_LR=0)
    hints = torch.from_numpy(np.random.default_rng(0).integers(-1, VOCAB, len(val.tokens)).astype(np.int32))
    tilt = tg.NgramTilt(hints, 1.5) if tilted else None
    before = [p.detach().clone() for p in model.parameters()]
    got = phased(model, val, hp, tilt=tilt)
    assert got == pytest.approx(per_document_reference(model, val, tilt), rel=1e-6)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    if tilted:
        assert got != pytest.approx(per_document_reference(model, val), rel=1e-6)


def test_adaptation_changes_the_score():
    hp, model, val = setup(PHASED_TTT_PREFIX_DOCS=0)
    frozen = phased(model, val, tg.Hyperparameters(**{**hp.as_dict(), "ttt_lora_lr": 0.0}))
    assert phased(model, val, hp)[0] != pytest.approx(frozen[0], rel=1e-6)


# --- the deadline (TTT_DEADLINE_SECONDS) ------------------------------------------------------------


def passed_deadline() -> tg.TTTDeadline:
    return tg.TTTDeadline(time.perf_counter())  # 0+ seconds: past it from the first batch on


def test_past_the_deadline_every_target_is_still_scored_once_and_nothing_trains():
    hp, model, val = setup()
    before = [p.detach().clone() for p in model.parameters()]
    recorder, deadline = Recorder(), passed_deadline()
    loss, bpb = phased(model, val, hp, recorder, deadline=deadline)
    assert recorder.scored == set(range(1, len(val.tokens))) and not recorder.trained
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # no global phase ran
    assert deadline.metrics() == dict(ttt_deadline_hit=True, ttt_unadapted_docs=18, ttt_unadapted_batches=5,
                                      ttt_skipped_phases=2)


def test_past_the_deadline_the_score_is_the_zero_learning_rate_one():
    hp, model, val = setup()
    zero = phased(model, val, tg.Hyperparameters(**{**hp.as_dict(), "ttt_lora_lr": 0.0, "global_ttt_lr": 0.0}))
    assert phased(model, val, hp, deadline=passed_deadline()) == pytest.approx(zero, rel=1e-12)
    assert zero == pytest.approx(per_document_reference(model, val), rel=1e-6)


def test_a_deadline_not_reached_changes_nothing():
    hp, model, val = setup()
    unguarded = phased(model, val, hp)
    hp, model, val = setup()
    deadline = tg.TTTDeadline(time.perf_counter() + 3600)
    assert phased(model, val, hp, deadline=deadline) == unguarded
    assert deadline.metrics()["ttt_deadline_hit"] is False


def test_a_deadline_reached_mid_run_stops_training_from_the_next_batch_on():
    hp, model, val = setup(PHASED_TTT_PREFIX_DOCS=0)
    recorder, deadline = Recorder(), tg.TTTDeadline(math.inf)

    def observe(kind, positions):  # the deadline passes during the first batch, which goes on adapting
        recorder(kind, positions)
        if kind == "train":
            deadline.at = -math.inf
    phased(model, val, hp, observe, deadline=deadline)
    docs = tg.val_documents(val.tokens)
    first = tg.ttt_batches(docs.lengths, hp.ttt_batch_size)[0]
    first_targets = {int(docs.starts[d]) + t for d in first for t in range(1, int(docs.lengths[d]) + 1)}
    assert recorder.scored == set(range(1, len(val.tokens)))
    assert recorder.trained and recorder.trained <= first_targets
    assert deadline.unadapted_docs == len(docs.starts) - len(first)


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("env,message", [
    (dict(TTT_MODE="lora"), "TTT_MODE"),
    (dict(TTT_MASK="k,x"), "TTT_MASK"),
    (dict(TTT_MASK="k,k"), "TTT_MASK"),
    (dict(TTT_MASK=" , "), "TTT_MASK"),
    (dict(TTT_EVAL_SEQ_LEN=65), "rotary"),
    (dict(TTT_CHUNK_SIZE=65), "TTT_EVAL_SEQ_LEN"),
    (dict(TTT_CHUNK_SIZE=0), "TTT_CHUNK_SIZE"),
    (dict(TTT_LORA_RANK=0), "TTT_LORA_RANK"),
    (dict(TTT_LORA_ALPHA=0), "TTT_LORA_ALPHA"),
    (dict(TTT_WIDTH_GROWTH=1.0), "TTT_WIDTH_GROWTH"),
    (dict(TTT_BETA2=1.0), "TTT_BETA2"),
    (dict(TTT_LORA_LR=-1), "TTT_LORA_LR"),
    (dict(PHASED_TTT_NUM_PHASES=0), "PHASED_TTT_NUM_PHASES"),
    (dict(PHASED_TTT_PREFIX_DOCS=-1), "PHASED_TTT_PREFIX_DOCS"),
    (dict(GLOBAL_TTT_MOMENTUM=1.0), "GLOBAL_TTT_MOMENTUM"),
    (dict(TTT_DEADLINE_SECONDS=-1), "TTT_DEADLINE_SECONDS"),
    (dict(TTT_DEADLINE_SECONDS="nan"), "TTT_DEADLINE_SECONDS"),
])
def test_phased_knobs_are_checked(env, message):
    with pytest.raises(tg.ConfigError, match=message):
        tg.check_config(hparams(**{**ENV, **env}), 1)


def test_the_phased_context_must_fit_the_rotary_table_only_when_phased_ttt_runs():
    tg.check_config(hparams(**{**ENV, "TTT_EVAL_SEQ_LEN": 65, "TTT_ENABLED": 0, "NGRAM_TILT": 0}), 1)
    tg.check_config(hparams(**{**ENV, "TTT_EVAL_SEQ_LEN": 65, "TTT_MODE": "full", "SLIDING_WINDOW_ENABLED": 1}), 1)


def test_the_phased_context_follows_eval_seq_len_unless_set():
    assert hparams(EVAL_SEQ_LEN=128).ttt_eval_seq_len == 128
    assert hparams(EVAL_SEQ_LEN=128, TTT_EVAL_SEQ_LEN=64).ttt_eval_seq_len == 64
    assert hparams().ttt_eval_seq_len == hparams().eval_seq_len == 2560


def test_phased_ttt_needs_no_sliding_window_but_full_ttt_does():
    tg.check_config(hparams(**{**ENV, "SLIDING_WINDOW_ENABLED": 0}), 1)
    with pytest.raises(tg.ConfigError, match="TTT_ENABLED"):
        tg.check_config(hparams(**{**ENV, "SLIDING_WINDOW_ENABLED": 0, "TTT_MODE": "full"}), 1)


# --- two ranks (gloo, in-process workers) ----------------------------------------------------------


def two_rank_worker(rank: int, init_file: str, out_dir: str, overrides: dict, late: tuple) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        hp, model, val = setup(**overrides)
        rt = dataclasses.replace(CPU, rank=rank, world_size=2, distributed=True)
        events = []
        deadline = tg.TTTDeadline(-math.inf if rank in late else math.inf) if late else None  # the `late` ranks: past it
        score = phased(model, val, hp, lambda kind, positions: events.append((kind, list(positions))), rt=rt,
                       deadline=deadline)
        torch.save(dict(score=score, events=events, params=[p.detach() for p in model.parameters()],
                        deadline=deadline and deadline.metrics()), f"{out_dir}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def run_two_ranks(tmp_path, late: tuple = (), **overrides) -> list[dict]:
    torch.multiprocessing.spawn(two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path), overrides, late), nprocs=2)
    return [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]


@pytest.mark.slow
def test_two_ranks_share_the_documents_and_the_global_phase(tmp_path):
    ranks = run_two_ranks(tmp_path)
    scored = [[p for kind, ps in r["events"] if kind == "score" for p in ps] for r in ranks]
    _, _, val = setup()
    assert sorted(scored[0] + scored[1]) == list(range(1, len(val.tokens)))  # each target by exactly one rank
    assert scored[0] and scored[1]
    assert ranks[0]["score"] == ranks[1]["score"]
    # the global phases train both ranks' copies with the summed gradient: the base weights stay identical
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    hp, model, _ = setup()
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["params"], model.parameters()))


@pytest.mark.slow
def test_two_ranks_at_zero_learning_rates_score_as_one(tmp_path):
    zero = dict(TTT_LORA_LR=0, GLOBAL_TTT_LR=0)
    hp, model, val = setup(**zero)
    one = phased(model, val, hp)
    assert run_two_ranks(tmp_path, **zero)[0]["score"] == pytest.approx(one, rel=1e-9)


@pytest.mark.slow
def test_one_late_rank_skips_the_global_phases_on_both_without_deadlock(tmp_path):
    ranks = run_two_ranks(tmp_path, late=(1,))
    hp, model, val = setup()
    scored = [[p for kind, ps in r["events"] if kind == "score" for p in ps] for r in ranks]
    trained = [[p for kind, ps in r["events"] if kind == "train" for p in ps] for r in ranks]
    assert sorted(scored[0] + scored[1]) == list(range(1, len(val.tokens)))
    assert trained[0] and not trained[1]  # rank 0 adapts all its batches, late rank 1 none, no global phase trains
    for r in ranks:
        assert all(torch.equal(a, b) for a, b in zip(r["params"], model.parameters()))
        assert r["deadline"]["ttt_skipped_phases"] == 2 and r["deadline"] == ranks[0]["deadline"]
    docs = tg.val_documents(val.tokens)
    batches = tg.ttt_batches(docs.lengths, hp.ttt_batch_size)
    assert 0 < ranks[0]["deadline"]["ttt_unadapted_docs"] < len(batches) * hp.ttt_batch_size


@pytest.mark.slow
def test_end_to_end_run_logs_the_phased_score_and_counts_its_time(tiny_data, tmp_path):
    env = dict(E2E, DATA_DIR=tiny_data["root"], RUN_ID="phased", ITERATIONS=10, MAX_WALLCLOCK_SECONDS=0,
               GPTQ_RESERVE_SECONDS=0, GPTQ_CALIBRATION_BATCHES=2, SLIDING_WINDOW_ENABLED=0, TTT_ENABLED=1,
               TTT_MODE="phased", TTT_EVAL_SEQ_LEN=64, TTT_CHUNK_SIZE=16, TTT_BATCH_SIZE=16, TTT_LORA_RANK=8,
               PHASED_TTT_PREFIX_DOCS=40)
    result = run_script([sys.executable, str(SCRIPT)], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "phased_ttt: global phase 1: SGD on the first 40 documents" in result.stdout
    assert re.search(r"quantized_phased_ttt val_loss:[\d.]+ val_bpb:[\d.]+ eval_time:\d+ms", result.stdout)
    metrics = json.loads((tmp_path / "logs" / "phased.json").read_text())["metrics"]
    assert math.isfinite(metrics["ttt_val_bpb"]) and metrics["ttt_eval_ms"] > 0
    assert "ttt_deadline: 450s not reached: 0 documents" in result.stdout
    assert metrics["ttt_deadline_hit"] is False and metrics["ttt_unadapted_docs"] == 0
