#!/usr/bin/env python3
"""Check that no validation document of a dataset is also a document of its training shards.

    python3 tools/check_overlap.py DATA_DIR VOCAB [--recompute] [--chunk-tokens N]

Runs train_gpt.py's own check on the shards a run with DATA_DIR and VOCAB_SIZE=VOCAB would read (other
dataset knobs come from the environment, as for a run): every BOS-delimited document is hashed, and each
val document whose key turns up in training is confirmed token by token. Like a run, it reuses the
verdict cached beside the shards when the shards are unchanged, and caches a new one there when it can;
--recompute ignores and leaves the cache (for timing). Prints the verdict and the speed; --trace-memory
also the peak memory of the check's arrays (tracing slows it). Exit status: 0 no overlap, 1 overlap, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tracemalloc
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


def verdict(args) -> dict:
    hp = tg.Hyperparameters.from_env({**os.environ, "DATA_DIR": args.data_dir, "VOCAB_SIZE": args.vocab})
    if not args.recompute:
        return tg.overlap_verdict(hp, args.chunk_tokens)
    result = tg.train_val_overlap(tg.find_shards(hp, "train"), tg.find_shards(hp, "val"), args.chunk_tokens)
    return dict(result, cached=False, cache=None, not_cached="--recompute")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="the run's DATA_DIR (holding datasets/ and tokenizers/)")
    parser.add_argument("vocab", help="the run's VOCAB_SIZE")
    parser.add_argument("--recompute", action="store_true", help="ignore the cached verdict and do not write one")
    parser.add_argument("--trace-memory", action="store_true", help="report the arrays' peak memory (slower)")
    parser.add_argument("--chunk-tokens", type=int, default=tg.OVERLAP_CHUNK_TOKENS, help="tokens read per piece")
    args = parser.parse_args(argv)
    if args.chunk_tokens < 1:
        parser.error(f"--chunk-tokens {args.chunk_tokens}: must be positive")
    if args.trace_memory:
        tracemalloc.start()
    try:
        result = verdict(args)
        peak = f"; peak array memory {tracemalloc.get_traced_memory()[1] / 2**20:.0f} MiB" if args.trace_memory else ""
    except (tg.ConfigError, tg.DataError) as exc:
        print(f"check_overlap.py: {exc}", file=sys.stderr)
        return 2
    finally:
        tracemalloc.stop()
    print("\n".join(tg.describe_overlap(result)))
    tokens = result["train_tokens"] + result["val_tokens"]
    print(f"{result['train_docs']} train / {result['val_docs']} val documents, {tokens} tokens; check took "
          f"{result['seconds']:.2f}s ({result['tokens_per_s'] / 1e6:.1f}M tokens/s, pieces of {args.chunk_tokens} "
          f"tokens){peak}")
    print(json.dumps({k: result[k] for k in ("overlap_docs", "val_docs", "overlap_fraction")}))
    return 1 if result["overlap_docs"] else 0


if __name__ == "__main__":
    sys.exit(main())
