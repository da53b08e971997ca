"""Tests of the progressive training context (TRAIN_SEQ_SCHEDULE): parsing and its errors, the
fraction -> length map, the loader's slots, and a tiny in-process run that switches length."""

import json
import re
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import CPU, E2E, REPO, hparams



# --- parsing and configuration errors ------------------------------------------------------------


def test_schedule_parses_into_length_fraction_pairs():
    assert hparams(TRAIN_SEQ_SCHEDULE=" 1024@0.1, 2048@0.7,3072@1.0 ").train_seq_schedule == (
        (1024, 0.1), (2048, 0.7), (3072, 1.0))
    assert hparams().train_seq_schedule == ()


@pytest.mark.parametrize("raw", ["1024", "1024@x", "a@1.0", "1024@0.5@1"])
def test_malformed_schedules_are_named(raw):
    with pytest.raises(tg.ConfigError, match=re.escape(f"TRAIN_SEQ_SCHEDULE={raw!r}: expected comma-separated "
                                                       "LENGTH@FRACTION pairs")):
        hparams(TRAIN_SEQ_SCHEDULE=raw)


BATCH = dict(TRAIN_BATCH_TOKENS=8 * 3072 * 4, TRAIN_SEQ_LEN=3072, EVAL_SEQ_LEN=3072)


@pytest.mark.parametrize("schedule, message", [
    ("0@0.5,3072@1.0", "lengths must be positive"),
    ("1024@0.5,2048@0.5,3072@1.0", "fractions must be positive and increasing"),
    ("1024@0,3072@1.0", "fractions must be positive and increasing"),
    ("1024@0.7,2048@0.5,3072@1.0", "fractions must be positive and increasing"),
    ("1024@0.5,3072@0.9", "the last fraction must be 1.0"),
    ("1024@0.5,3072@1.5", "the last fraction must be 1.0"),
    ("1024@0.5,4096@1.0", "lengths must be <= the rotary table, max(TRAIN_SEQ_LEN, EVAL_SEQ_LEN)=3072"),
    ("1000@0.5,3072@1.0", "length 1000: TRAIN_BATCH_TOKENS=98304 must be a multiple of 8 micro-batches x 1000"),
])
def test_bad_schedules_are_named(schedule, message):
    hp = hparams(**BATCH, TRAIN_SEQ_SCHEDULE=schedule)
    with pytest.raises(tg.ConfigError, match=re.escape(message)) as caught:
        tg.check_config(hp, world_size=1)
    assert str(caught.value).startswith("TRAIN_SEQ_SCHEDULE=")


def test_a_good_schedule_passes_and_may_reach_the_eval_length():
    tg.check_config(hparams(**BATCH, TRAIN_SEQ_SCHEDULE="1024@0.1,2048@0.7,3072@1.0"), world_size=1)
    # the rotary table covers max(TRAIN_SEQ_LEN, EVAL_SEQ_LEN), so a schedule may go past TRAIN_SEQ_LEN
    tg.check_config(hparams(**dict(BATCH, TRAIN_SEQ_LEN=1024), TRAIN_SEQ_SCHEDULE="1024@0.5,3072@1.0"), world_size=1)


def test_the_fraction_picks_the_first_stage_that_reaches_it():
    hp = hparams(TRAIN_SEQ_SCHEDULE="1024@0.1,2048@0.7,3072@1.0")
    fracs = [0.0, 0.1, 0.1001, 0.7, 0.7001, 0.99, 1.0, 1.01]
    assert [tg.seq_len_at(f, hp) for f in fracs] == [1024, 1024, 2048, 2048, 3072, 3072, 3072, 3072]
    assert tg.train_seq_lens(hp) == [1024, 2048, 3072]
    assert tg.seq_len_at(0.5, hparams(TRAIN_SEQ_LEN=512)) == 512 and tg.train_seq_lens(hparams(TRAIN_SEQ_LEN=512)) == [512]


# --- the loader ----------------------------------------------------------------------------------


def position_loader(seq_len: int, slot_len=None) -> tg.TrainLoader:
    """A loader over two shards whose tokens are their own positions, so a batch shows where it was cut."""
    loader = tg.TrainLoader([], seq_len, 1 << 40, seed=3, rank=0, world_size=1, device=torch.device("cpu"),
                            slot_len=slot_len)
    loader.shards = [np.arange(0, 1000), np.arange(10_000, 11_000)]
    return loader


def test_the_loader_serves_the_scheduled_length_without_re_serving_tokens():
    loader = position_loader(16, slot_len=48)
    first, _ = loader.next_batch(4)  # three 16-token pieces of one slot, then the next slot's first piece
    assert first.shape == (4, 16)
    assert first[1, 0] == first[0, 0] + 16 and first[2, 0] == first[0, 0] + 32
    loader.set_seq_len(32)  # mid-slot: the rest of that slot is skipped
    x, y = loader.next_batch(5)
    assert x.shape == (5, 32) and torch.equal(x[:, 1:], y[:, :-1])
    assert (loader.cursor, loader.piece) == (7, 0)  # slot 1 was left after one piece; slots 2..6 gave one each
    ranges = [(int(row[0]), int(row[0]) + len(row)) for row in [*first, *x]]
    assert all(a_end <= b or b_end <= a for i, (a, a_end) in enumerate(ranges) for b, b_end in ranges[i + 1:])
    with pytest.raises(ValueError, match="exceeds the loader's slots of 48"):
        loader.set_seq_len(64)


def test_without_a_schedule_each_slot_is_one_sequence_as_before():
    loader = position_loader(16)
    x, _ = loader.next_batch(5)
    assert x[:, 0].tolist() == [int(loader.shards[shard][start]) for shard, start in loader.order[:5]]
    assert (loader.cursor, loader.piece) == (5, 0)


# --- a tiny in-process run -----------------------------------------------------------------------


def tiny_trainer(tiny_data, tmp_path, monkeypatch, **env) -> tg.Trainer:
    monkeypatch.chdir(tmp_path)
    hp = hparams(**{**E2E, "DATA_DIR": tiny_data["root"], "RUN_ID": "ctx", "ITERATIONS": 8, "MAX_WALLCLOCK_SECONDS": 0,
                    "WARMUP_STEPS": 1, "VAL_LOSS_EVERY": 0, "ENABLE_LOOPING_AT": 0.5, **env})
    tg.check_config(hp, world_size=1)
    return tg.Trainer(hp, CPU, tg.RunLog(hp, CPU, "code"))


def step_losses(trainer: tg.Trainer, steps: int) -> tuple[list[float], list[int]]:
    """Run the timed steps of a step-based schedule; the loss and the micro-batch length of each."""
    record, losses, lengths = tg.TrainingRecord(), [], []
    for step in range(steps):
        losses.append(trainer.timed_step(record, step / steps).item())
        lengths.append(trainer.loader.seq_len)
        record.steps += 1
    return losses, lengths


def test_a_schedule_of_train_seq_len_alone_trains_exactly_as_no_schedule(tiny_data, tmp_path, monkeypatch):
    runs = []
    for env in (dict(), dict(TRAIN_SEQ_SCHEDULE="64@1.0")):
        trainer = tiny_trainer(tiny_data, tmp_path, monkeypatch, **env)
        trainer.warm_up()
        runs.append(step_losses(trainer, 4))
    assert runs[0] == runs[1] and runs[0][1] == [64] * 4


def test_a_run_switches_length_at_the_scheduled_steps(tiny_data, tmp_path, monkeypatch):
    trainer = tiny_trainer(tiny_data, tmp_path, monkeypatch, TRAIN_SEQ_SCHEDULE="16@0.25,32@0.5,64@1.0")
    trainer.warm_up()
    text = (tmp_path / "logs" / "ctx.txt").read_text()
    for seq_len in (16, 32, 64):  # every (length, loop count) pair is warmed up
        for loops in (0, 1):
            assert f"warmup: 1 steps loops:{loops} done" in text and f"(seq_len {seq_len})" in text
    assert len(re.findall(r"^warmup: .*\(seq_len \d+\)$", text, re.M)) == 6
    assert trainer.loader.seq_len == 16 and trainer.seqs_per_micro == 4096 // (8 * 16)
    losses, lengths = step_losses(trainer, 8)  # frac = step / 8
    assert lengths == [16, 16, 16, 32, 32, 64, 64, 64] and all(np.isfinite(losses))
    text = (tmp_path / "logs" / "ctx.txt").read_text()
    assert "seq_len: 16 -> 32 at step 3 frac 0.375" in text and "seq_len: 32 -> 64 at step 5 frac 0.625" in text
    assert trainer.seqs_per_micro == 4096 // (8 * 64)


def test_a_recorded_schedule_is_written_back_as_the_env_value_that_reproduces_it():
    sys.path.insert(0, str(REPO / "tools"))
    import package_record
    hp = hparams(TRAIN_SEQ_SCHEDULE="1024@0.1,2048@0.7,3072@1.0", LOOP_SAMPLE="1,2")
    recorded = json.loads(json.dumps(hp.as_dict()))  # as logs/{RUN_ID}.json stores it
    for name in ("train_seq_schedule", "loop_sample"):
        raw = package_record.env_value(recorded[name])
        assert hparams(**{name.upper(): raw}).as_dict()[name] == getattr(hp, name)
    assert package_record.env_value(recorded["train_seq_schedule"]) == "1024@0.1,2048@0.7,3072@1.0"
