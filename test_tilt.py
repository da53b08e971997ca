"""Tests of the causal n-gram tilt (NGRAM_TILT): hints against a slow reference, causality, normalization,
and its effect on sliding-window scores (CPU, the real train_gpt.py)."""

import json
import math
import re
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import CPU, E2E, SCRIPT, eval_setup, run_script


def reference_hints(tokens: list[int], order: int, threshold: float) -> list[int]:
    """The rule read literally, one position at a time: read the context's state, then add the target to it."""
    context, states, hints = order - 1, {}, []
    for t, target in enumerate(tokens):
        key = tuple(tokens[t - context:t]) if t >= context else None
        state = states.setdefault(key, {"counts": {}, "total": 0, "top": None, "top_count": 0}) if key else None
        if state and state["total"] and state["top_count"] / state["total"] >= threshold:
            hints.append(state["top"])
        else:
            hints.append(-1)
        if state:
            count = state["counts"][target] = state["counts"].get(target, 0) + 1
            state["total"] += 1
            if count > state["top_count"]:
                state["top"], state["top_count"] = target, count
    return hints


def repetitive_stream(n: int, vocab: int, seed: int) -> np.ndarray:
    """Random tokens with copied spans, small vocabularies and BOS tokens: contexts repeat with varied continuations."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=n)
    for _ in range(n // 20):
        length, src = rng.integers(2, 30), rng.integers(0, n - 30)
        dst = rng.integers(src, n - 30)
        tokens[dst:dst + length] = tokens[src:src + length]
    tokens[rng.random(n) < 0.02] = tg.BOS_ID
    return tokens.astype(np.uint16)


@pytest.mark.parametrize("order, threshold, vocab, seed", [(2, 0.5, 3, 0), (3, 0.8, 4, 1), (4, 0.34, 2, 2),
                                                           (16, 0.8, 5, 3), (16, 0.8, 512, 4), (5, 1.0, 3, 5)])
def test_hints_equal_the_slow_reference(order, threshold, vocab, seed):
    tokens = repetitive_stream(3000, vocab, seed)
    hints = tg.ngram_hints(tokens, order, threshold)
    assert hints.dtype == np.int32
    assert hints.tolist() == reference_hints(tokens.tolist(), order, threshold)
    assert (hints >= 0).sum() >= 20  # the streams do exercise the hints


def test_hint_follows_the_most_frequent_continuation_and_ties_keep_the_first():
    a, b, c = 5, 6, 7
    # Context a is followed by b, c, c, b: the top is b, then c once c reaches 2, and c stays when b ties at 2.
    tokens = np.array([a, b, a, c, a, c, a, b, a, 9], dtype=np.uint16)
    hints = tg.ngram_hints(tokens, order=2, threshold=1e-9)
    assert hints.tolist() == [-1, -1, -1, b, -1, b, a, c, a, c]
    assert tg.ngram_hints(tokens, order=2, threshold=0.6).tolist() == [-1, -1, -1, b, -1, -1, a, c, a, -1]


def test_hints_span_bos_and_need_a_full_context():
    bos = tg.BOS_ID
    tokens = np.array([bos, 3, 4, 5, bos, 3, 4, 5, bos, 3, 4], dtype=np.uint16)
    hints = tg.ngram_hints(tokens, order=3, threshold=0.8)
    # (4, 5) -> bos, (5, bos) -> 3, (bos, 3) -> 4, (3, 4) -> 5: every repeat after the first document fires,
    # the context (5, bos) included: tables never reset at a document boundary.
    assert hints.tolist() == [-1, -1, -1, -1, -1, -1, 4, 5, bos, 3, 4]
    assert tg.ngram_hints(tokens[:2], order=3, threshold=0.8).tolist() == [-1, -1]


def test_changing_a_token_at_or_after_t_never_changes_the_hint_at_t():
    tokens = repetitive_stream(800, 3, 7)
    base = tg.ngram_hints(tokens, 4, 0.5)
    rng = np.random.default_rng(0)
    for position in rng.choice(len(tokens), size=40, replace=False):
        changed = tokens.copy()
        changed[position:] = rng.integers(0, 3, size=len(tokens) - position)
        hints = tg.ngram_hints(changed, 4, 0.5)
        assert np.array_equal(hints[:position + 1], base[:position + 1])
    assert (base >= 0).sum() > 100


def test_a_hash_collision_costs_a_rehash_not_a_wrong_hint(monkeypatch):
    real = tg.context_hashes
    monkeypatch.setattr(tg, "context_hashes", lambda tokens, context, salt: real(tokens, context, salt) * np.uint64(salt))
    tokens = repetitive_stream(500, 3, 8)
    assert tg.ngram_hints(tokens, 3, 0.5).tolist() == reference_hints(tokens.tolist(), 3, 0.5)
    monkeypatch.setattr(tg, "context_hashes", lambda tokens, context, salt: np.zeros(len(tokens) - context, np.uint64))
    with pytest.raises(RuntimeError, match="collided"):
        tg.ngram_hints(tokens, 3, 0.5)


def tilt_inputs(n: int = 64, vocab: int = 50):
    torch.manual_seed(0)
    logits = 4 * torch.randn(n, vocab)
    targets = torch.randint(0, vocab, (n,))
    hints = torch.randint(0, vocab, (n,))
    hints[::3] = -1
    hints[1::4] = targets[1::4]  # some hints are right
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return logits, targets, hints, nll


@pytest.mark.parametrize("boost", [0.5, 2.625, 8.0])
def test_tilted_nll_is_minus_log_of_the_explicitly_renormalized_distribution(boost):
    logits, targets, hints, nll = tilt_inputs()
    tilted = tg.tilted_nll(nll, logits, targets, hints, boost)
    p = torch.softmax(logits.double(), dim=1)
    for i in range(len(targets)):
        weights = p[i].clone()
        if hints[i] >= 0:
            weights[hints[i]] *= math.exp(boost)
        renormalized = weights / weights.sum()
        assert renormalized.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert tilted[i].item() == pytest.approx(-math.log(renormalized[targets[i]].item()), abs=2e-5)
        if hints[i] < 0:
            assert tilted[i] == nll[i]
    assert (tilted < nll)[hints == targets].all() and (tilted >= nll)[(hints >= 0) & (hints != targets)].all()


def test_tilted_probabilities_sum_to_one():
    logits, _, hints, _ = tilt_inputs(n=8, vocab=20)
    for i in range(8):  # score every vocabulary entry as the target: exp(-nll) over the vocabulary sums to 1
        row = logits[i].expand(20, 20)
        nll = torch.nn.functional.cross_entropy(row, torch.arange(20), reduction="none")
        tilted = tg.tilted_nll(nll, row, torch.arange(20), hints[i].expand(20), 2.625)
        assert torch.exp(-tilted.double()).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_zero_boost_scores_exactly_as_without_the_tilt():
    logits, targets, hints, nll = tilt_inputs()
    assert torch.equal(tg.tilted_nll(nll, logits, targets, hints, 0.0), nll)


def tilt_for(val, boost: float) -> tg.NgramTilt:
    return tg.NgramTilt(torch.from_numpy(tg.ngram_hints(val.tokens, 16, 0.8)), boost)


def test_sliding_window_with_the_tilt_scores_better_on_a_repetitive_stream(tiny_data):
    hp, model, val = eval_setup(tiny_data)
    val = tg.Validation(np.tile(val.tokens[:1500], 3)[:4097], val.bytes)  # each document comes back twice
    plain = tg.score_first_eval(model, val, hp, CPU, epochs=0)
    assert tg.score_first_eval(model, val, hp, CPU, epochs=0, tilt=tilt_for(val, 0.0)) == plain
    tilted = tg.score_first_eval(model, val, hp, CPU, epochs=0, tilt=tilt_for(val, 2.625))
    assert tilted[1] < plain[1] - 0.05


def test_tilted_sliding_window_equals_the_softmax_of_boosted_logits_per_token(tiny_data):
    hp, model, val = eval_setup(tiny_data)
    val = tg.Validation(np.tile(val.tokens[:1500], 3)[:4097], val.bytes)
    tilt = tilt_for(val, 2.625)
    tokens = torch.from_numpy(val.tokens.astype(np.int64))
    total = 0.0
    with torch.no_grad():  # direct: add β to the hinted logit of each target, then an ordinary softmax
        for w in tg.sliding_windows(len(tokens) - 1, 64, 16):
            logits = model.forward_logits(tokens[None, w.start:w.start + w.length])[0]
            hints = tilt.hints[w.start + 1:w.start + w.length + 1].long()
            hinted = torch.nonzero(hints >= 0).squeeze(1)
            logits[hinted, hints[hinted]] += 2.625
            nll = torch.nn.functional.cross_entropy(logits, tokens[w.start + 1:w.start + w.length + 1], reduction="none")
            total += nll[w.first:].double().sum().item()
    loss, _ = tg.score_first_eval(model, val, hp, CPU, epochs=0, tilt=tilt)
    assert (tilt.hints >= 0).sum() > 500
    assert loss == pytest.approx(total / (len(tokens) - 1), rel=1e-6)


def test_ttt_scores_with_the_tilt_and_trains_without_it(tiny_data):
    hp, model, val = eval_setup(tiny_data)
    val = tg.Validation(np.tile(val.tokens[:1500], 3)[:4097], val.bytes)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = tg.score_first_eval(model, val, hp, CPU, epochs=1)
    model.load_state_dict(state)
    tilted = tg.score_first_eval(model, val, hp, CPU, epochs=1, tilt=tilt_for(val, 2.625))
    assert tilted[1] < plain[1] - 0.05


class ListLog:
    def __init__(self):
        self.lines, self.metrics = [], {}

    def __call__(self, message: str) -> None:
        self.lines.append(message)

    def metric(self, **values) -> None:
        self.metrics.update(values)


def test_build_ngram_tilt_uses_the_knobs_and_logs_its_time_as_eval_time(tiny_data):
    hp, _, val = eval_setup(tiny_data, NGRAM_TILT=1, NGRAM_TILT_ORDER=4, NGRAM_TILT_THRESHOLD=0.5, NGRAM_TILT_BOOST=1.5)
    log = ListLog()
    tilt = tg.build_ngram_tilt(val, hp, CPU, log)
    expected = tg.ngram_hints(val.tokens, 4, 0.5)
    assert tilt.boost == 1.5 and np.array_equal(tilt.hints.numpy(), expected)
    hinted = int((expected[1:] >= 0).sum())
    assert hinted > 0 and log.metrics["ngram_hinted"] == hinted and log.metrics["ngram_hint_ms"] >= 0
    assert re.fullmatch(rf"ngram_tilt: order 4 threshold 0.5 boost 1.5: {hinted} of {len(val.tokens) - 1} targets "
                        rf"hinted \(.*%\), \d+ right, in \d+ms", log.lines[0])
    assert "ngram_hint_ms" in tg.SCORED_EVAL_PHASES


@pytest.mark.slow
def test_end_to_end_two_ranks_score_with_the_tilt(tiny_data, tmp_path):
    env = dict(E2E, DATA_DIR=tiny_data["root"], RUN_ID="tilt", MAX_WALLCLOCK_SECONDS=8, GPTQ_RESERVE_SECONDS=2,
               GPTQ_CALIBRATION_BATCHES=2, EVAL_STRIDE=32, NGRAM_TILT=1)
    result = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         str(SCRIPT)], env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "logs" / "tilt.txt").read_text()
    assert re.search(r"^ngram_tilt: order 16 threshold 0.8 boost 2.625: \d+ of \d+ targets hinted", log, re.M)
    assert re.search(r"^quantized_sliding_window val_loss:\S+ val_bpb:\S+ eval_time:\d+ms$", log, re.M)
    metrics = json.loads((tmp_path / "logs" / "tilt.json").read_text())["metrics"]
    assert "ngram_hint_ms" in metrics and math.isfinite(metrics["sliding_val_bpb"])


def test_bench_tool_times_hints_on_shifted_copies(tiny_data, capsys):
    sys.path.insert(0, str(SCRIPT.parent / "tools"))
    import bench_ngram_hints

    shard = tiny_data["shards"] / "fineweb_val_000000.bin"
    tokens = bench_ngram_hints.stream([str(shard)], 3 * len(tiny_data["val_tokens"]))
    first = tiny_data["val_tokens"]
    assert np.array_equal(tokens[:len(first)], first) and np.array_equal(tokens[len(first):2 * len(first)], first + first.max() + 1)
    assert bench_ngram_hints.main([str(shard), "--tokens", "5000", "--repeat", "1"]) == 0
    assert re.match(r"tokens=5000 order=16 threshold=0.8 best_s=\S+ .* hinted=\S+% right=\S+%", capsys.readouterr().out)


@pytest.mark.parametrize("env, message", [({"NGRAM_TILT_ORDER": 1}, "NGRAM_TILT_ORDER"),
                                          ({"NGRAM_TILT_BOOST": -1}, "NGRAM_TILT_BOOST"),
                                          ({"NGRAM_TILT_THRESHOLD": 0}, "NGRAM_TILT_THRESHOLD"),
                                          ({"NGRAM_TILT": 1, "SLIDING_WINDOW_ENABLED": 0, "TTT_ENABLED": 0},
                                           "NGRAM_TILT")])
def test_tilt_knobs_are_checked(env, message):
    with pytest.raises(tg.ConfigError, match=message):
        tg.check_config(tg.Hyperparameters.from_env({k: str(v) for k, v in env.items()}), 1)


def test_a_stream_without_a_repeated_context_gets_no_hints():
    tokens = np.random.default_rng(0).integers(0, 8192, size=5000).astype(np.uint16)  # no 15-token context repeats
    assert (tg.ngram_hints(tokens, 16, 0.8) == -1).all()
    assert (tg.ngram_hints(tokens[:3], 2, 0.8) == -1).all()


def test_every_scored_position_of_the_eval_has_a_tilted_distribution_that_sums_to_one(tiny_data, monkeypatch):
    hp, model, val = eval_setup(tiny_data)
    val = tg.Validation(np.tile(val.tokens[:300], 3)[:833], val.bytes)  # repeats, so many positions are hinted
    tilt = tilt_for(val, 2.625)
    seen, real = [], tg.tilted_nll

    def recording(nll, logits, targets, hints, boost):  # the eval's own call: its logits, hints and boost
        seen.append((logits.detach().double(), hints.clone(), boost))
        return real(nll, logits, targets, hints, boost)
    monkeypatch.setattr(tg, "tilted_nll", recording)
    tg.score_first_eval(model, val, hp, CPU, epochs=0, tilt=tilt)
    hinted = 0
    for logits, hints, boost in seen:
        total = torch.zeros(len(hints), dtype=torch.float64)
        for v in range(logits.size(1)):  # score every vocabulary entry as the target with the function the eval used
            target = torch.full((len(hints),), v)
            nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
            total += torch.exp(-real(nll, logits, target, hints, boost))
        assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
        hinted += int((hints >= 0).sum())
    assert hinted > 200 and sum(len(h) for _, h, _ in seen) > 2000
