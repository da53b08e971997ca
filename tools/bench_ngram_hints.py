#!/usr/bin/env python3
"""Time train_gpt.py's n-gram tilt hints (NGRAM_TILT) on real token shards, one process.

    OMP_NUM_THREADS=1 python3 tools/bench_ngram_hints.py SHARD [SHARD ...] --tokens 1000000 [--repeat 3]

Concatenates the shards' tokens (shifted copies if they hold fewer than --tokens, see stream()), builds the hints
for the first --tokens tokens with NGRAM_TILT_ORDER / NGRAM_TILT_THRESHOLD from the environment (defaults
otherwise), and prints the best of --repeat timings, tokens/s, the process's peak resident memory, and the
fraction of targets hinted and hinted right. The hint builder is numpy only, single-threaded.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


def stream(shards: list[str], count: int) -> np.ndarray:
    """The shards' tokens, then copies of them with ids shifted past the vocabulary until `count` tokens:
    a stream with the text's statistics and no copy-to-copy repeats (which would make hints trivial)."""
    tokens = np.concatenate([np.asarray(tg.open_shard(Path(s))) for s in shards]).astype(np.int64)
    copies = -(-count // len(tokens))
    shift = int(tokens.max()) + 1
    if copies * shift > 1 << 16:
        raise SystemExit(f"--tokens {count}: {copies} shifted copies of {len(tokens)} tokens would pass uint16 ids")
    return np.concatenate([tokens + c * shift for c in range(copies)])[:count].astype(np.uint16)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="token shards in the challenge's format")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="stream length to build hints for")
    parser.add_argument("--repeat", type=int, default=3, help="timings taken; the best is reported")
    args = parser.parse_args(argv)
    hp = tg.Hyperparameters.from_env(os.environ)
    tokens = stream(args.shards, args.tokens)
    seconds = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        hints = tg.ngram_hints(tokens, hp.ngram_tilt_order, hp.ngram_tilt_threshold)
        seconds.append(time.perf_counter() - t0)
    hinted = hints[1:] >= 0
    right = (hints[1:][hinted] == tokens[1:][hinted]).mean() if hinted.any() else 0.0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"tokens={len(tokens)} order={hp.ngram_tilt_order} threshold={hp.ngram_tilt_threshold} "
          f"best_s={min(seconds):.3f} all_s={','.join(f'{s:.3f}' for s in seconds)} "
          f"tokens_per_s={len(tokens) / min(seconds):,.0f} peak_rss_mib={peak_mib:.0f} "
          f"hinted={hinted.mean():.4%} right={right:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
