#!/usr/bin/env python3
"""Count the work of phased LoRA TTT (TTT_MODE=phased) on a validation set and project its time on 8 GPUs.

    python3 tools/phased_ttt_cost.py VAL_SHARD [--docs 50000 --targets 40540160] [--gpus 8] [--tflops 350]

Document lengths come from VAL_SHARD's BOS positions; with --docs and --targets they are stretched to that many
documents of that total (the shard's lengths cycled, then scaled to the wanted mean: the shape of its length
distribution is kept, its scale is FineWeb's), or with --lognormal SIGMA drawn log-normal of that shape.
The model shape and the TTT knobs are train_gpt.py's, from the
environment (defaults otherwise). Arithmetic, not a measurement: it runs no model. It walks the batches exactly as
phased_ttt_eval does (ttt_batches, padded window widths, assign_batches over the ranks, phase_ends) and counts

  - forward: rows x padded width of every chunk's window (the window is recomputed for every chunk);
  - backward for the adapters: the same tokens, on every chunk but a batch's last; input gradients only
    (the base weights are frozen), so ~1x the forward's matmuls and ~2x its attention;
  - global SGD: the prefix documents' targets once per phase, forward + backward with weight gradients (3x).

FLOPs per token: 2 x (matmul weights of the virtual layers + head + adapters) + causal attention 2·d·W per
layer for a W-token window. Time = the most loaded rank's FLOPs / the assumed sustained throughput, beside a
latency floor of --step-ms per chunk step (a forward + backward + AdamW step on small rows is launch-bound).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


def document_lengths(shard: Path, docs: int, targets: int, sigma: float) -> np.ndarray:
    """The shard's document lengths, or (docs > 0) `docs` of them cycled, or (sigma > 0) `docs` log-normal lengths
    of that shape parameter (seeded), scaled to sum to about `targets`."""
    lengths = tg.val_documents(np.asarray(tg.open_shard(shard)).astype(np.int64)).lengths
    if docs <= 0:
        return lengths
    if sigma > 0:
        cycled = np.random.default_rng(0).lognormal(0.0, sigma, docs)
    else:
        cycled = np.resize(lengths, docs).astype(np.float64)
    return np.maximum(1, np.round(cycled * targets / cycled.sum())).astype(np.int64)


def flops_per_token(hp: tg.Hyperparameters) -> tuple[float, float]:
    """(matmul FLOPs per token of one forward, attention FLOPs per token per key of context) at the knobs' shape."""
    model = tg.GPT(hp)
    slots, d = model.plan.num_slots, hp.model_dim
    block = sum(p.numel() for n, p in model.named_parameters()
                if n.startswith("blocks.") and p.ndim == 2 and min(p.shape) >= 64) / hp.num_layers
    adapters = sum(n * (i + o) * hp.ttt_lora_rank for n, i, o in tg.lora_shapes(model, tg.ttt_sites(hp)).values())
    return 2.0 * (slots * block + hp.vocab_size * d + adapters), 2.0 * d * slots


def rank_work(lengths: np.ndarray, hp: tg.Hyperparameters, gpus: int) -> list[dict]:
    """Per rank: forward tokens, forward token-keys (attention), backward tokens and token-keys, chunk steps."""
    batches = tg.ttt_batches(lengths, hp.ttt_batch_size)
    ends = [end for end, _ in tg.phase_ends(batches, hp.phased_ttt_prefix_docs, hp.phased_ttt_num_phases)]
    work = [dict(fwd=0, fwd_keys=0, bwd=0, bwd_keys=0, steps=0, useful=0) for _ in range(gpus)]
    for begin, end in zip([0, *ends], [*ends, len(batches)]):
        segment = batches[begin:end]
        costs = [tg.batch_cost(lengths[b], hp.ttt_chunk_size, hp.ttt_eval_seq_len) for b in segment]
        for rank, share in enumerate(tg.assign_batches(costs, gpus)):
            for i in share:
                add_batch(work[rank], lengths[segment[i]], hp)
    return work


def add_batch(work: dict, lengths: np.ndarray, hp: tg.Hyperparameters) -> None:
    chunk, context = hp.ttt_chunk_size, hp.ttt_eval_seq_len
    count = -(-int(lengths.max()) // chunk)
    for index in range(count):
        ends = np.minimum((index + 1) * chunk, lengths)
        live = index * chunk < lengths
        windows = (ends - np.maximum(0, ends - context))[live]
        width = tg.padded_width(int(windows.max()), chunk, context, hp.ttt_width_growth)
        tokens = len(lengths) * width
        work["fwd"] += tokens
        work["fwd_keys"] += tokens * width / 2  # causal: a token sees half the window on average
        work["useful"] += int(windows.sum())
        work["steps"] += 1
        if index < count - 1:
            work["bwd"] += tokens
            work["bwd_keys"] += tokens * width / 2


def global_sgd_tokens(lengths: np.ndarray, hp: tg.Hyperparameters) -> int:
    """Targets the global SGD phases train on, all ranks together (each phase: its whole cumulative prefix)."""
    batches = tg.ttt_batches(lengths, hp.ttt_batch_size)
    order = np.concatenate(batches)
    return sum(int(lengths[order[:docs]].sum())
               for _, docs in tg.phase_ends(batches, hp.phased_ttt_prefix_docs, hp.phased_ttt_num_phases))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shard", type=Path)
    parser.add_argument("--docs", type=int, default=0, help="documents to stretch the shard's lengths to (0: as is)")
    parser.add_argument("--targets", type=int, default=0, help="their total targets")
    parser.add_argument("--lognormal", type=float, default=0.0,
                        help="with --docs: log-normal lengths of this sigma instead of the shard's (0: the shard's)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--tflops", type=float, default=350.0, help="assumed sustained bf16 TFLOP/s per GPU")
    parser.add_argument("--step-ms", type=float, default=6.0, help="assumed latency floor of one chunk step")
    args = parser.parse_args()
    hp = tg.Hyperparameters.from_env(os.environ)
    lengths = document_lengths(args.shard, args.docs, args.targets, args.lognormal)
    mat, attn = flops_per_token(hp)
    work = rank_work(lengths, hp, args.gpus)
    flops = [w["fwd"] * mat + w["fwd_keys"] * attn + w["bwd"] * mat + 2 * w["bwd_keys"] * attn for w in work]
    sgd = global_sgd_tokens(lengths, hp)
    sgd_flops = sgd * (3 * mat + 3.5 * attn * min(hp.ttt_eval_seq_len, float(np.mean(lengths))) / 2) / args.gpus
    top = int(np.argmax(flops))
    w = work[top]
    rate = args.tflops * 1e12
    print(f"documents {len(lengths):,}, targets {int(lengths.sum()):,}, mean {lengths.mean():.0f}, median "
          f"{np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, max {lengths.max():,}")
    print(f"shape: {hp.num_layers} layers x {hp.model_dim}, {tg.GPT(hp).plan.num_slots} virtual, vocab "
          f"{hp.vocab_size}: {mat / 1e6:.1f} MFLOP/token of matmuls, {attn / 1e3:.1f} kFLOP/token per key of context")
    widths = tg.ttt_window_widths(hp.ttt_chunk_size, hp.ttt_eval_seq_len, hp.ttt_width_growth)
    print(f"knobs: chunk {hp.ttt_chunk_size}, context {hp.ttt_eval_seq_len}, batch {hp.ttt_batch_size}, rank "
          f"{hp.ttt_lora_rank}, widths {widths}, prefix {hp.phased_ttt_prefix_docs} docs in "
          f"{hp.phased_ttt_num_phases} phase(s)")
    total_fwd = sum(x["fwd"] for x in work)
    print(f"all ranks: window tokens forwarded {total_fwd:,} (padded; {sum(x['useful'] for x in work):,} unpadded), "
          f"{total_fwd / lengths.sum():.1f} per target; global SGD {sgd:,} targets")
    print(f"most loaded of {args.gpus} ranks: {w['fwd']:,} tokens forwarded, {w['bwd']:,} backpropagated, "
          f"{w['steps']:,} chunk steps; {flops[top] / 1e15:.1f} PFLOP scoring + {sgd_flops / 1e15:.2f} PFLOP "
          "global SGD")
    compute_s, sgd_s, floor_s = flops[top] / rate, sgd_flops / rate, w["steps"] * args.step_ms / 1000
    print(f"at {args.tflops:.0f} TFLOP/s: scoring {compute_s:.0f} s (latency floor {floor_s:.0f} s at "
          f"{args.step_ms:g} ms/step), global SGD {sgd_s:.1f} s; total ~{max(compute_s, floor_s) + sgd_s:.0f} s")


if __name__ == "__main__":
    main()
