#!/usr/bin/env python3
"""Time phased TTT adapting against phased TTT past its deadline (score-only), one process, on CPU or a GPU.

    OMP_NUM_THREADS=1 VOCAB_SIZE=1024 NUM_LAYERS=4 MODEL_DIM=160 NUM_HEADS=4 NUM_KV_HEADS=2 LOOP_START=1 LOOP_END=2 \
    PARALLEL_START_LAYER=-1 XSA_LAST_N=4 TRAIN_SEQ_LEN=128 EVAL_SEQ_LEN=128 TTT_BATCH_SIZE=16 \
    python3 tools/ttt_deadline_ratio.py --docs 64 --repeat 2

The model is built from the environment's knobs (train_gpt.py's defaults otherwise) with random weights; the
validation stream is --docs documents of random tokens with log-normal lengths (--log-mean, --log-sigma). Prints
each timing and the ratio score-only / adapting: the share of the remaining work a rank still does once
TTT_DEADLINE_SECONDS has passed (README, "The deadline"). The global phases are off (PHASED_TTT_PREFIX_DOCS=0):
past the deadline they are skipped, so they are not part of what remains.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


def document_stream(docs: int, vocab: int, log_mean: float, log_sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(docs):
        parts += [[tg.BOS_ID], rng.integers(2, vocab, max(1, int(rng.lognormal(log_mean, log_sigma))))]
    return np.concatenate(parts).astype(np.uint16)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=64, help="documents in the synthetic validation stream")
    parser.add_argument("--log-mean", type=float, default=5.5, help="mean of the log document length")
    parser.add_argument("--log-sigma", type=float, default=1.0, help="sigma of the log document length")
    parser.add_argument("--repeat", type=int, default=2, help="timings of each mode")
    args = parser.parse_args(argv)
    hp = dataclasses.replace(tg.Hyperparameters.from_env(os.environ), phased_ttt_prefix_docs=0)
    rt = tg.init_runtime(hp, {})  # one process, the script's own device, backend, compile and dtype choices
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp).to(rt.device)
    tokens = document_stream(args.docs, hp.vocab_size, args.log_mean, args.log_sigma, hp.seed)
    ones, no = torch.ones(hp.vocab_size), torch.zeros(hp.vocab_size, dtype=torch.bool)
    val = tg.Validation(tokens, tg.ByteCounts(ones, no, no))
    best = {}
    for rep in range(args.repeat):
        for mode, deadline in (("adapting", None), ("score-only", -math.inf)):
            guard = None if deadline is None else tg.TTTDeadline(deadline)
            t0 = time.perf_counter()
            tg.phased_ttt_eval(model, val, hp, rt, lambda message: None, deadline=guard)
            seconds = time.perf_counter() - t0
            best[mode] = min(best.get(mode, math.inf), seconds)
            print(f"repeat {rep + 1} {mode}: {seconds:.2f}s ({len(tokens)} tokens, {args.docs} documents)", flush=True)
    print(f"ratio score-only / adapting (best of {args.repeat}): {best['score-only'] / best['adapting']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
