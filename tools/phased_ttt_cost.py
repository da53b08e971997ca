#!/usr/bin/env python3
"""Count the work of phased LoRA TTT (TTT_MODE=phased) on a validation set and project its time on 8 GPUs.

    python3 tools/phased_ttt_cost.py VAL_SHARD [--docs 50000 --targets 40540160] [--gpus 8] [--tflops 350]
        [--all-phases [--rates 350,220,100] [--load-s 2.3] [--hint-s-per-m 0.2] [--full-step-ms 63]]

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

With --all-phases it also projects every other phase evaluate_artifact times, at each of --rates TFLOP/s: the plain
score and the sliding window (forward tokens as `evaluate` and `score_windows` run them, padded windows included),
full-weight TTT (its sliding scores plus TTT_EPOCHS passes of forward + backward with weight gradients, or
--full-step-ms per SGD step when that is more), the artifact loads (--load-s each) and the n-gram hints
(--hint-s-per-m), then the sum of each configuration's phases against the 600 s budget.
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


def flops_per_token(hp: tg.Hyperparameters, adapters: bool = True) -> tuple[float, float]:
    """(matmul FLOPs per token of one forward, attention FLOPs per token per key of context) at the knobs' shape;
    with `adapters`, phased TTT's LoRA adapters included."""
    model = tg.GPT(hp)
    slots, d = model.plan.num_slots, hp.model_dim
    block = sum(p.numel() for n, p in model.named_parameters()
                if n.startswith("blocks.") and p.ndim == 2 and min(p.shape) >= 64) / hp.num_layers
    lora = sum(n * (i + o) * hp.ttt_lora_rank for n, i, o in tg.lora_shapes(model, tg.ttt_sites(hp)).values())
    return 2.0 * (slots * block + hp.vocab_size * d + (lora if adapters else 0)), 2.0 * d * slots


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


# --- --all-phases: every timed phase of evaluate_artifact, not only phased TTT's --------------------------------


def other_phase_work(hp: tg.Hyperparameters, targets: int, gpus: int) -> dict[str, dict]:
    """The busiest rank's work in the plain score, the sliding window and full-weight TTT, split as `evaluate` and
    `score_first_eval` split it: tokens forwarded (each with EVAL_SEQ_LEN/2 keys on average, causal), tokens
    trained on (forward + backward with weight gradients) and the optimizer steps (each a gradient all-reduce)."""
    width = hp.eval_seq_len
    plain = dict(fwd=-(-(targets // width) // gpus) * width, train=0, steps=0)
    windows = len(tg.sliding_windows(targets, width, hp.eval_stride))  # every window is padded to the full width
    sliding = dict(fwd=-(-windows // gpus) * width, train=0, steps=0)
    batch = max(1, tg.micro_batch_seqs(hp.val_batch_tokens, width))
    rows = steps = 0
    for chunk in range(-(-targets // hp.ttt_chunk_tokens) - 1):  # the last chunk is never trained on
        count = len(tg.ttt_chunk_starts(chunk, targets, hp))
        for i in range(0, count, batch):
            rows += -(-min(batch, count - i) // gpus)  # this step's sequences on the busiest rank
            steps += 1
    full = dict(fwd=sliding["fwd"], train=rows * width * hp.ttt_epochs, steps=steps * hp.ttt_epochs)
    return dict(post_quant_eval=plain, sliding_eval=sliding, full_ttt_eval=full)


def phase_seconds(hp: tg.Hyperparameters, lengths: np.ndarray, args: argparse.Namespace,
                  rate: float) -> dict[str, float]:
    """Seconds of each counted phase at `rate` FLOP/s on the busiest GPU: compute, and for the two TTTs the larger of
    compute and their steps' latency floor; artifact loads and the n-gram hints from the given measurements."""
    targets = int(lengths.sum())
    mat, attn = flops_per_token(hp, adapters=False)
    keys = hp.eval_seq_len / 2
    work = other_phase_work(hp, targets, args.gpus)
    flops = {k: w["fwd"] * (mat + attn * keys) + w["train"] * (3 * mat + 3.5 * attn * keys) for k, w in work.items()}
    full_train = work["full_ttt_eval"]["steps"] * args.full_step_ms / 1000
    phased = rank_work(lengths, hp, args.gpus)
    lora_mat, lora_attn = flops_per_token(hp)
    phased_flops = max(w["fwd"] * lora_mat + w["fwd_keys"] * lora_attn + w["bwd"] * lora_mat
                       + 2 * w["bwd_keys"] * lora_attn for w in phased)
    phased_floor = max(w["steps"] for w in phased) * args.step_ms / 1000
    sgd = global_sgd_tokens(lengths, hp) * (3 * lora_mat + 3.5 * lora_attn * min(hp.ttt_eval_seq_len, float(
        np.mean(lengths))) / 2) / args.gpus
    return dict(artifact_load=args.load_s, post_quant_eval=flops["post_quant_eval"] / rate,
                ngram_hint=args.hint_s_per_m * targets / 1e6, sliding_eval=flops["sliding_eval"] / rate,
                ttt_reload=args.load_s,
                full_ttt_eval=flops["sliding_eval"] / rate + max(flops["full_ttt_eval"] / rate - flops["sliding_eval"]
                                                                  / rate, full_train),
                phased_ttt_eval=max(phased_flops / rate, phased_floor) + sgd / rate)


# The phases each configuration runs (evaluate_artifact), in order; "phased" leaves the sliding window off.
CONFIGURATIONS = {
    "sliding window": ("artifact_load", "post_quant_eval", "sliding_eval"),
    "full TTT": ("artifact_load", "post_quant_eval", "sliding_eval", "ttt_reload", "full_ttt_eval"),
    "phased TTT": ("artifact_load", "post_quant_eval", "ttt_reload", "phased_ttt_eval"),
    "phased TTT + tilt": ("artifact_load", "post_quant_eval", "ngram_hint", "ttt_reload", "phased_ttt_eval"),
}


def print_all_phases(hp: tg.Hyperparameters, lengths: np.ndarray, args: argparse.Namespace) -> None:
    rates = [float(r) for r in args.rates.split(",")]
    table = {rate: phase_seconds(hp, lengths, args, rate * 1e12) for rate in rates}
    mat, attn = flops_per_token(hp, adapters=False)
    work = other_phase_work(hp, int(lengths.sum()), args.gpus)
    print(f"\nall phases, {int(lengths.sum()):,} targets on {args.gpus} GPUs; no adapters: {mat / 1e6:.1f} MFLOP/token "
          f"of matmuls + {attn * hp.eval_seq_len / 2 / 1e6:.1f} MFLOP/token of attention at EVAL_SEQ_LEN/2 keys")
    for name, w in work.items():
        print(f"  {name}: busiest rank forwards {w['fwd']:,} tokens, trains on {w['train']:,} in {w['steps']:,} steps")
    print(f"  assumed: artifact load {args.load_s:g} s, hints {args.hint_s_per_m:g} s per M targets (one core), "
          f"full TTT step >= {args.full_step_ms:g} ms, phased chunk step >= {args.step_ms:g} ms")
    print("| phase | " + " | ".join(f"s at {r:g} TFLOP/s" for r in rates) + " |")
    print("|---|" + "---:|" * len(rates))
    for phase in table[rates[0]]:
        print(f"| {phase} | " + " | ".join(f"{table[r][phase]:.1f}" for r in rates) + " |")
    for name, phases in CONFIGURATIONS.items():
        totals = [sum(table[r][p] for p in phases) for r in rates]
        print(f"| **{name}** ({' + '.join(phases)}) | " + " | ".join(
            f"**{t:.0f}** ({'fits' if t <= tg.CHALLENGE_SECONDS else 'OVER'})" for t in totals) + " |")


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
    parser.add_argument("--all-phases", action="store_true",
                        help="also project every counted phase of the evaluation and each configuration's total")
    parser.add_argument("--rates", default="350,220,100", help="--all-phases: sustained TFLOP/s per GPU to tabulate")
    parser.add_argument("--load-s", type=float, default=2.3, help="--all-phases: seconds of one artifact load")
    parser.add_argument("--hint-s-per-m", type=float, default=0.2,
                        help="--all-phases: seconds of the n-gram hints per million targets (rank 0, one core)")
    parser.add_argument("--full-step-ms", type=float, default=63.0,
                        help="--all-phases: latency floor of one full-weight TTT step (gradient all-reduce, SGD)")
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
    if args.all_phases:
        print_all_phases(hp, lengths, args)


if __name__ == "__main__":
    main()
