#!/usr/bin/env bash
# issue15_eval_compare.sh -- issue 15's CPU comparison of the evaluation methods on one trained artifact per seed.
#
# Usage (from the checkout; two seeds = two invocations, at most two at a time on a 2-core machine):
#   OMP_NUM_THREADS=1 tools/issue15_eval_compare.sh SEED [ROOT]      # ROOT: default /tmp/ev4_SEED
#   tools/issue15_eval_compare.sh --table ROOT...                     # the table of finished runs only
#
# For SEED it trains once with ../shared/bench/cpu_quality.sh (its tiny 4 x 160 shape, 180 s of training, the small
# 66K-token validation), unless ROOT/final_model.int6.ptz already exists, then scores that artifact with
# EVAL_ARTIFACT four ways, each an eval-only run of cpu_quality.sh in ROOT/<method> (so the model and data knobs
# are the training run's):
#   sliding  plain round trip + sliding window, stride 64, untilted (the default scores before the flip to phased)
#   full     TTT_ENABLED=1 TTT_MODE=full   (score-first full-weight TTT, its defaults)
#   phased   TTT_ENABLED=1 TTT_MODE=phased (per-document LoRA TTT, its defaults but TTT_EVAL_SEQ_LEN=128: the
#            phased context may not exceed the rotary table, max(TRAIN_SEQ_LEN, EVAL_SEQ_LEN) = 128 here)
#   tilt     phased + NGRAM_TILT=1 (the tilt applies to the sliding window and the phased TTT scores)
# and, when METHODS names it (METHODS="sliding full phased tilt phased_b4"):
#   phased_b4  phased with TTT_BATCH_SIZE=4 PHASED_TTT_PREFIX_DOCS=8 and no sliding window: at the defaults the
#              small validation's 21 documents are one batch and never reach a global SGD phase; here 6 batches and
#              a global phase after the first 8 documents
# Every eval-only run also computes the plain and sliding scores (SLIDING_WINDOW_ENABLED=1, needed by full TTT);
# NGRAM_TILT=0 everywhere but in tilt (the tilt is on by default since the flip, cpu_quality.sh leaves it alone):
# each row's eval_total counts every phase that ran, as a submission with those knobs would.
# Then it prints the table of ROOT: bpb and each timed phase (ms) from each run's logs/<method>.json.
# The whole body is one function, read before it runs: editing this file mid-run is safe.
main() {
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bench="$here/../shared/bench/cpu_quality.sh"
[[ -x "$bench" ]] || bench=/work/shared/bench/cpu_quality.sh

table() {
  python3 - "$@" <<'PY'
import json, sys
from pathlib import Path
phases = ("artifact_load_ms", "post_quant_eval_ms", "ngram_hint_ms", "sliding_eval_ms", "ttt_reload_ms",
          "ttt_eval_ms", "eval_total_ms")
print("| seed | method | post-quant bpb | sliding bpb | TTT bpb | " + " | ".join(p[:-3] for p in phases) + " |")
print("|---|---|" + "---:|" * (3 + len(phases)))
for root in map(Path, sys.argv[1:]):
    for method in ("sliding", "full", "phased", "tilt", "phased_b4"):
        path = root / method / "logs" / f"{method}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        m, seed = result["metrics"], result["hyperparameters"]["seed"]
        bpb = lambda k: f"{m[k]:.5f}" if k in m else "-"
        cells = [str(m.get(p, "-")) for p in phases]
        status = "" if result["status"] == "completed" else f" ({result['status']}: {result.get('error', '')})"
        print(f"| {seed} | {method}{status} | {bpb('post_quant_val_bpb')} | {bpb('sliding_val_bpb')} | "
              f"{bpb('ttt_val_bpb')} | " + " | ".join(cells) + " |")
PY
}

if [[ "${1:-}" == --table ]]; then shift; table "$@"; exit; fi
seed=${1:?usage: $0 SEED [ROOT] | --table ROOT...}
root=${2:-/tmp/ev4_$seed}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
artifact="$root/final_model.int6.ptz"
if [[ ! -f "$artifact" ]]; then
  RUN_DIR="$root" "$bench" "$here/train_gpt.py" SEED="$seed" OMP_NUM_THREADS="$OMP_NUM_THREADS" NGRAM_TILT=0 || exit
fi
declare -A knobs=(
  [sliding]="NGRAM_TILT=0"
  [full]="TTT_ENABLED=1 TTT_MODE=full NGRAM_TILT=0"
  [phased]="TTT_ENABLED=1 TTT_MODE=phased TTT_EVAL_SEQ_LEN=128 NGRAM_TILT=0"
  [tilt]="TTT_ENABLED=1 TTT_MODE=phased TTT_EVAL_SEQ_LEN=128 NGRAM_TILT=1"
  [phased_b4]="TTT_ENABLED=1 TTT_MODE=phased TTT_EVAL_SEQ_LEN=128 TTT_BATCH_SIZE=4 PHASED_TTT_PREFIX_DOCS=8 SLIDING_WINDOW_ENABLED=0 NGRAM_TILT=0"
)
for method in ${METHODS:-sliding full phased tilt}; do
  [[ -n "${knobs[$method]+x}" ]] || { echo "$0: unknown method '$method' in METHODS" >&2; exit 2; }
  [[ -f "$root/$method/logs/$method.json" ]] && grep -q '"status": "completed"' "$root/$method/logs/$method.json" \
    && continue  # finished earlier: rerunning would only repeat it
  # shellcheck disable=SC2086  # the knobs are KEY=VALUE words
  RUN_DIR="$root/$method" "$bench" "$here/train_gpt.py" SEED="$seed" OMP_NUM_THREADS="$OMP_NUM_THREADS" \
    RUN_ID="$method" EVAL_ARTIFACT="$artifact" ${knobs[$method]}
done
table "$root"
}
main "$@"
