#!/usr/bin/env python3
"""Artifact coders compared per tensor group on a default-shape quantized state (issue 14).

Without --artifact the state is the model shape of the environment's knobs (default: 11 x 512, vocab
8192) with Gaussian matrices quantized by `gptq_quantize` without a Hessian (round to nearest): its
int codes are close to a trained model's in distribution but have none of a trained model's
structure across rows and columns, so it measures the order-0 part of the gain only. Every size is
exact bytes of a real compression; times are wall seconds.

    OMP_NUM_THREADS=1 python3 tools/compressor_bench.py          # H0, ANS, brotli-11 per group + both artifacts
    OMP_NUM_THREADS=1 python3 tools/compressor_bench.py --more   # also zstd-22 and PPMd (pip zstandard, pyppmd)
    python3 tools/compressor_bench.py --artifact final_model.int6.ptz  # a trained run's state instead (same
                                                                       # architecture knobs in the environment)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import brotli
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


def gaussian_state(hp: tg.Hyperparameters) -> dict[str, dict]:
    torch.manual_seed(0)
    model = tg.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            if tg.is_quantized(p):
                p.normal_(0.0, 0.02)
    return tg.quantize_state(model, {}, hp)


def groups_of(quantized: dict[str, dict]) -> dict[str, bytes]:
    """The bytes each coder sees: codes per role as stored, scales and small tensors as byte planes."""
    parts: dict[str, list[bytes]] = {}
    for name, q in quantized.items():
        if "codes" in q:
            parts.setdefault(f"codes {tg.code_role(name)} (int{q['bits']})", []).append(q["codes"].numpy().tobytes())
            parts.setdefault("row scales (fp16)", []).append(q["scale"].numpy().tobytes())
        else:
            parts.setdefault("small tensors (fp16)", []).append(q["fp16"].numpy().tobytes())
    return {g: b"".join(p) if g.startswith("codes") else tg.byte_planes(b"".join(p), 2) for g, p in parts.items()}


def entropy_bytes(data: bytes) -> int:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return int(-(p * np.log2(p)).sum() * len(data) / 8)


def coders(more: bool) -> dict:
    out = {"ANS order-0": lambda b: len(tg.ans_encode("g", np.frombuffer(b, dtype=np.int8))[1]),
           "brotli-11": lambda b: len(brotli.compress(b, quality=11))}
    if more:
        import pyppmd
        import zstandard
        out["zstd-22"] = lambda b: len(zstandard.ZstdCompressor(level=22).compress(b))
        out["PPMd order 2"] = lambda b: len(pyppmd.compress(b, max_order=2, mem_size=256 << 20))
        out["PPMd order 6"] = lambda b: len(pyppmd.compress(b, max_order=6, mem_size=256 << 20))
    return out


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--more", action="store_true", help="also zstd-22 and PPMd")
    parser.add_argument("--artifact", type=Path, help="measure this artifact's state instead of Gaussian weights")
    args = parser.parse_args()
    hp = tg.Hyperparameters.from_env(os.environ)
    quantized = tg.parse_artifact(args.artifact.read_bytes(), hp) if args.artifact else gaussian_state(hp)
    print("| group | raw bytes | order-0 entropy | " + " | ".join(coders(args.more)) + " |")
    for group, data in groups_of(quantized).items():
        cells = []
        for name, fn in coders(args.more).items():
            if name == "ANS order-0" and not group.startswith("codes"):
                cells.append("—")
                continue
            size, seconds = timed(fn, data)
            cells.append(f"{size:,} ({seconds:.1f} s)")
        print(f"| {group} | {len(data):,} | {entropy_bytes(data):,} | " + " | ".join(cells) + " |", flush=True)
    for compressor in ("pergroup", "brotli"):
        run_hp = tg.dataclasses.replace(hp, compressor=compressor)
        blob, write_s = timed(tg.serialize_artifact, quantized, run_hp)
        _, read_s = timed(tg.parse_artifact, blob, run_hp)
        print(f"artifact {compressor}: {len(blob):,} bytes, serialize {write_s:.1f} s, parse {read_s:.1f} s", flush=True)


if __name__ == "__main__":
    main()
