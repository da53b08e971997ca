"""Shared test helpers and fixtures: small models and configurations, a subprocess runner for the
script, and a small dataset in the challenge's exact format, made from generated text.

Nothing here needs the network or ../shared: data/build_dataset.py trains a SentencePiece BPE model
with the challenge's settings on a generated pseudo-language and writes its train/val shards.
Tests marked `slow` (pytest.ini) run the script end to end or train in-process; `pytest -m "not slow"` skips them.
"""

import os
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from data import build_dataset as bd

REPO = Path(__file__).resolve().parent
SCRIPT = REPO / "train_gpt.py"


# --- models and configurations ------------------------------------------------------------------


def hparams(**env) -> tg.Hyperparameters:
    """Hyperparameters from an environment dict, the way the script reads them."""
    return tg.Hyperparameters.from_env({k: str(v) for k, v in env.items()})


SMALL = dict(VOCAB_SIZE=512, NUM_LAYERS=5, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=4,
             XSA_LAST_N=5, PARALLEL_START_LAYER=3, NUM_LOOPS=2, LOOP_START=1, LOOP_END=2,
             TRAIN_SEQ_LEN=16, EVAL_SEQ_LEN=16)


def loop_plan(**env) -> tg.LoopPlan:
    return tg.LoopPlan.from_hyperparameters(hparams(**env))


def small_model(**overrides) -> tg.GPT:
    torch.manual_seed(0)
    return tg.GPT(hparams(**{**SMALL, **overrides}))


def randomize(model: tg.GPT) -> None:
    """Move every parameter off its (partly zero) init so that every gradient path is live."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "step_scales" in name or name.endswith("_scale") or name.endswith("q_gain"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)


# --- in-process evaluation ----------------------------------------------------------------------

# A one-process CPU runtime, for calling the script's functions directly.
CPU = tg.Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), distributed=False,
                 attn_backend="sdpa", compile=False, activation_dtype=torch.float32)


# The evaluation knobs' defaults before issue 15 made phased TTT + tilt the default score: the sliding window
# alone (TTT_MODE=full for tests that turn TTT on). Tests of something else score this way: it is fast.
SLIDING_EVAL = dict(SLIDING_WINDOW_ENABLED=1, TTT_ENABLED=0, TTT_MODE="full", NGRAM_TILT=0)


def eval_setup(tiny_data, **overrides):
    env = dict(SLIDING_EVAL, DATA_DIR=tiny_data["root"], VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1,
               ROPE_DIMS=4, XSA_LAST_N=2, NUM_LOOPS=1, LOOP_START=0, LOOP_END=0, EVAL_SEQ_LEN=64, TRAIN_SEQ_LEN=64,
               VAL_BATCH_TOKENS=8 * 64 * 4, EVAL_STRIDE=16, TTT_CHUNK_TOKENS=1024, TTT_EPOCHS=1, TTT_LR=0.05)
    hp = hparams(**{**env, **overrides})
    torch.manual_seed(0)
    model = tg.GPT(hp)
    randomize(model)
    val = tg.Validation(tg.load_validation_tokens(hp), tg.byte_counts(tiny_data["sp"]))
    return hp, model, val


def every_path(model: tg.GPT, val: tg.Validation, hp: tg.Hyperparameters) -> tuple[float, float, float, torch.Tensor]:
    """Loss from the plain evaluation, sliding windows at stride = window, score-first TTT with 0 epochs,
    and the GPTQ calibration Hessian of the head input (which comes from hidden_states)."""
    plain = tg.evaluate(model, val, hp, CPU)[0]
    sliding = tg.score_first_eval(model, val, hp, CPU, epochs=0)[0]
    ttt = tg.score_first_eval(model, val, hp, CPU, epochs=0, observer=lambda kind, positions: None)[0]
    batch = torch.from_numpy(val.tokens[:4 * 64].astype(np.int64)).view(4, 64)
    return plain, sliding, ttt, tg.collect_hessians(model, [batch], CPU)["tok_emb.weight"]


# --- end-to-end runs ----------------------------------------------------------------------------

# A configuration small enough to train for a few seconds on 2 CPU cores with tiny_data.
E2E = dict(SLIDING_EVAL, VOCAB_SIZE=512, NUM_LAYERS=4, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=8, XSA_LAST_N=4,
           PARALLEL_START_LAYER=3, NUM_LOOPS=1, LOOP_START=1, LOOP_END=2, ENABLE_LOOPING_AT=0.3,
           TRAIN_SEQ_LEN=64, EVAL_SEQ_LEN=64, TRAIN_BATCH_TOKENS=4096, VAL_BATCH_TOKENS=8192,
           ITERATIONS=400, MAX_WALLCLOCK_SECONDS=25, WARMUP_STEPS=2, VAL_LOSS_EVERY=20, TRAIN_LOG_EVERY=10,
           EMA_DECAY=0.9, MUON_MOMENTUM_WARMUP_STEPS=10, WARMDOWN_FRAC=0.5, TIED_EMBED_LR=0.05)


def run_script(args, env, cwd, timeout=300) -> subprocess.CompletedProcess:
    """Run a command with `env` on top of this environment (minus torchrun's rank variables)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full_env.update({k: str(v) for k, v in env.items()})
    full_env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(args, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --- data ---------------------------------------------------------------------------------------

VOCAB = 512


def pseudo_language(num_docs: int, seed: int) -> list[str]:
    """Documents with learnable structure: Zipf-distributed words, bigram habits, digits, non-ASCII."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do", "fa", "gu", "zo", "qui", "é", "ñu"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)})
    weights = [1.0 / (i + 1) for i in range(len(words))]
    follow = {w: rng.sample(words, 3) for w in words}
    docs = []
    for _ in range(num_docs):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            w = rng.choices(words, weights)[0]
            out = [w.capitalize()]
            for _ in range(rng.randint(4, 12)):
                w = rng.choice(follow[w]) if rng.random() < 0.7 else rng.choices(words, weights)[0]
                out.append(w)
            if rng.random() < 0.2:
                out.append(str(rng.randint(0, 2026)))
            sentences.append(" ".join(out) + rng.choice([".", ".", "!", " — 中文."]))
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    docs = pseudo_language(1200, seed=0)
    # characters the tokenizer never saw reach the val split only through byte-fallback tokens
    val_docs = [d + " ∑ 😀 ж" if i % 10 == 0 else d for i, d in enumerate(docs[:100])]
    bd.build(val_docs + docs[100:], root, VOCAB, val_docs=100, shard_tokens=30_000, log=lambda _: None)
    shards = root / "datasets" / f"fineweb10B_sp{VOCAB}"
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"))
    val = np.fromfile(shards / "fineweb_val_000000.bin", dtype="<u2", offset=1024).astype(np.int64)
    return {"root": root, "shards": shards, "sp": sp, "val_docs": val_docs, "val_tokens": val, "vocab": VOCAB}

