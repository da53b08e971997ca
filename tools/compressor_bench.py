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
    python3 tools/compressor_bench.py --artifact final_model.int6.ptz --contexts  # codes' entropy per context
    python3 tools/compressor_bench.py --artifact final_model.int6.ptz --roles  # pergroup's bytes per role
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


def order0_words(data: bytes) -> bytes:
    """ANS words of the codes under one histogram (the histogram itself not counted)."""
    symbols = np.frombuffer(data, dtype=np.int8).astype(np.int32)
    symbols = symbols - symbols.min()
    return tg.encode_classes(symbols, np.zeros(len(data), dtype=np.int64), 1, int(symbols.max()) + 1, 16)[1]


def coders(more: bool) -> dict:
    out = {"ANS order-0": lambda b: len(order0_words(b)),
           "brotli-11": lambda b: len(brotli.compress(b, quality=11))}
    if more:
        import pyppmd
        import zstandard
        out["zstd-22"] = lambda b: len(zstandard.ZstdCompressor(level=22).compress(b))
        out["PPMd order 2"] = lambda b: len(pyppmd.compress(b, max_order=2, mem_size=256 << 20))
        out["PPMd order 6"] = lambda b: len(pyppmd.compress(b, max_order=6, mem_size=256 << 20))
    return out


# --- Contexts (--contexts): what a static per-context ANS coder would reach. Each context splits a role's
# codes into classes coded with one histogram each; the size is the conditional entropy plus the side
# information the decoder needs to know each code's class (bucket ids, a permutation). Table costs are left
# out (a few hundred bytes per class). A context pays only if it beats "role" by more than that.


def conditional_bytes(classes: np.ndarray, symbols: np.ndarray) -> float:
    """Σ over classes of the class's order-0 entropy, in bytes."""
    width = int(symbols.max()) + 1
    classes = classes.astype(np.int64).ravel()
    joint = np.bincount(classes * width + symbols.ravel(), minlength=(int(classes.max()) + 1) * width)
    joint = joint.astype(np.float64)
    joint = joint.reshape(-1, width)
    totals = joint.sum(axis=1, keepdims=True)
    nonzero = joint > 0
    return float(-(joint[nonzero] * np.log2((joint / np.maximum(totals, 1))[nonzero])).sum() / 8)


def quantile_buckets(values: np.ndarray, count: int) -> np.ndarray:
    """Each value's rank bucket: 0..count-1, equal-sized."""
    return np.argsort(np.argsort(values, kind="stable"), kind="stable") * count // len(values)


def neighbour_class(codes: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(class = |previous code| capped at 7, the codes that follow it) along rows (axis 1) or columns (axis 0)."""
    prev = codes[:, :-1] if axis == 1 else codes[:-1]
    return np.minimum(np.abs(prev.astype(np.int64)), 7), codes[:, 1:] if axis == 1 else codes[1:]


def similarity_order(codes: np.ndarray, sketch_dims: int = 32) -> np.ndarray:
    """Greedy nearest-neighbour chain of the rows (L1 on a random-projection sketch, so O(rows² · 32))."""
    rng = np.random.default_rng(0)
    sketch = codes.astype(np.float32) @ rng.standard_normal((codes.shape[1], sketch_dims)).astype(np.float32)
    left, order = np.ones(len(codes), dtype=bool), [0]
    left[0] = False
    for _ in range(len(codes) - 1):
        dist = np.abs(sketch - sketch[order[-1]]).sum(axis=1)
        dist[~left] = np.inf
        order.append(int(dist.argmin()))
        left[order[-1]] = False
    return np.asarray(order)


def permutation_bytes(n: int) -> float:
    """log2(n!) / 8: an entropy-coded permutation of n rows."""
    return float(np.sum(np.log2(np.arange(1, n + 1))) / 8)


def context_sizes(name: str, q: dict) -> dict[str, float]:
    """Bytes of one tensor's codes under each context (shifted to 0.. so they index a histogram)."""
    codes = q["codes"].numpy().astype(np.int64)
    symbols = codes - codes.min()
    rows, cols = codes.shape
    scale_rank = quantile_buckets(q["scale"].float().numpy(), 16)
    col_rms = quantile_buckets(np.sqrt((codes.astype(np.float64) ** 2).mean(axis=0)), 4)
    out = {"tensor": conditional_bytes(np.zeros_like(symbols), symbols),
           "row scale rank /16 (free)": conditional_bytes(np.broadcast_to(scale_rank[:, None], codes.shape), symbols),
           "column rms /4 (+ ids)": conditional_bytes(np.broadcast_to(col_rms[None, :], codes.shape), symbols) + cols / 4}
    for axis, label in ((1, "|left code|"), (0, "|code above|")):
        classes, follow = neighbour_class(codes, axis)
        first_codes = rows if axis == 1 else cols  # coded without a context: ~6 bits each
        out[label] = conditional_bytes(classes, follow - codes.min()) + first_codes * 0.75
    order = similarity_order(codes)
    classes, follow = neighbour_class(codes[order], 0)
    out["|code above|, rows reordered (+ perm)"] = (conditional_bytes(classes, follow - codes.min()) + cols * 0.75
                                                   + permutation_bytes(rows))
    return out


def print_contexts(quantized: dict[str, dict]) -> None:
    """One row per role: the bytes of its codes under each context, summed over its tensors."""
    roles: dict[str, dict[str, float]] = {}
    pooled: dict[str, list[np.ndarray]] = {}
    for name, q in quantized.items():
        if "codes" in q and not tg.is_gate_tensor(name):
            sizes = roles.setdefault(tg.code_role(name), {})
            for label, size in context_sizes(name, q).items():
                sizes[label] = sizes.get(label, 0.0) + size
            pooled.setdefault(tg.code_role(name), []).append(q["codes"].numpy().ravel())
    labels = ["role"] + list(next(iter(roles.values())))
    print("| codes of | " + " | ".join(labels) + " |")
    totals = dict.fromkeys(labels, 0.0)
    for role, sizes in roles.items():
        codes = np.concatenate(pooled[role]).astype(np.int64)
        sizes = {"role": conditional_bytes(np.zeros_like(codes), codes - codes.min()), **sizes}
        for label in labels:
            totals[label] += sizes[label]
        print(f"| {role} | " + " | ".join(f"{sizes[label]:,.0f}" for label in labels) + " |", flush=True)
    print("| **all** | " + " | ".join(f"{totals[label]:,.0f} ({totals[label] - totals['role']:+,.0f})"
                                       for label in labels) + " |")
    print_scale_contexts(quantized)


def print_scale_contexts(quantized: dict[str, dict]) -> None:
    """The fp16 row scales: brotli-11 of their byte planes (as stored) vs order-0 of the high byte + the low
    byte given the high byte, per role and in all."""
    pooled: dict[str, list[np.ndarray]] = {}
    for name, q in quantized.items():
        if "codes" in q:
            pooled.setdefault(tg.code_role(name), []).append(q["scale"].numpy().view(np.uint16))
    print("| row scales of | rows | brotli-11 (byte planes) | H(high) + H(low given high) |")
    for role, parts in pooled.items():
        bits = np.concatenate(parts).astype(np.int64)
        planes = tg.byte_planes(bits.astype("<u2").tobytes(), 2)
        high, low = bits >> 8, bits & 255
        coded = conditional_bytes(np.zeros_like(high), high) + conditional_bytes(high, low)
        print(f"| {role} | {len(bits):,} | {len(brotli.compress(planes, quality=11)):,} | {coded:,.0f} |")


def print_pergroup_roles(quantized: dict[str, dict], hp: tg.Hyperparameters) -> None:
    """Per role, what COMPRESSOR=pergroup spends on its codes (ANS words + its histograms and column ids, brotli-11
    on their own: the artifact brotlis them with the rest of the side part) and on its row scales (ANS words +
    histogram and low bits, before brotli), against order-0 and brotli-11."""
    blob = tg.serialize_artifact(quantized, tg.dataclasses.replace(hp, compressor="pergroup"))
    raw = tg.decompress_pergroup(blob[5 + blob[4]:])
    print("| role | classes (rows x columns), level steps | codes: pergroup | codes: ANS order-0 + histogram | "
          "scales: brotli-11 (byte planes) | scales: pergroup (shift) |")
    for role, tensors in tg.roles_of(tg.code_tensors(raw)).items():
        (entry, side, words), seconds = timed(tg.encode_role, raw, tensors)
        codes = b"".join(raw[t.start:t.start + t.length] for t in tensors)
        bits = tg.scale_bits(raw, tensors)
        shift, scale_side, scale_words = tg.encode_scales(bits)
        lo, hi = int(np.frombuffer(codes, dtype=np.int8).min()), int(np.frombuffer(codes, dtype=np.int8).max())
        order0 = len(order0_words(codes)) + 2 + hi - lo + 1
        planes = tg.byte_planes(bits.astype("<u2").tobytes(), 2)
        pergroup_codes = len(brotli.compress(side[len(scale_side):], quality=11)) + len(words) - len(scale_words)
        print(f"| {role} | {entry['row_classes']} x {entry['col_classes']}, {entry['level_steps']} | {pergroup_codes:,} ({seconds:.1f} s) | "
              f"{order0:,} | {len(brotli.compress(planes, quality=11)):,} | "
              f"{len(scale_side) + len(scale_words):,} ({shift}) |", flush=True)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--more", action="store_true", help="also zstd-22 and PPMd")
    parser.add_argument("--artifact", type=Path, help="measure this artifact's state instead of Gaussian weights")
    parser.add_argument("--contexts", action="store_true", help="only the entropy of the codes under each context")
    parser.add_argument("--roles", action="store_true", help="only what pergroup spends per role, codes and scales")
    args = parser.parse_args()
    hp = tg.Hyperparameters.from_env(os.environ)
    quantized = tg.parse_artifact(args.artifact.read_bytes(), hp) if args.artifact else gaussian_state(hp)
    if args.contexts:
        print_contexts(quantized)
        return
    if args.roles:
        print_pergroup_roles(quantized, hp)
        return
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
