#!/usr/bin/env bash
# Run ../shared/bench/cpu_quality.sh (180 s CPU quality benchmark) for a list of knob settings x seeds,
# one run at a time (each run uses every core), and append one TSV row per run.
#
# Usage: tools/cpu_ablation.sh OUT.tsv "LABEL:KEY=VAL,KEY=VAL" ... 
#   e.g. tools/cpu_ablation.sh ablation.tsv "default:" "no_birkhoff:BIRKHOFF_MIX=0"
# Environment: SEEDS (default "1337 42"), BENCH (default ../shared/bench/cpu_quality.sh),
#   DATA_DIR (passed through to the benchmark when set), RUNS_DIR (default ./ablation_runs),
#   SCRIPT (default: this repo's train_gpt.py; point it at a frozen copy to keep editing meanwhile).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$1; shift
bench=${BENCH:-$here/../shared/bench/cpu_quality.sh}
runs=${RUNS_DIR:-$PWD/ablation_runs}
mkdir -p "$runs"
[[ -s $out ]] || printf 'label\tseed\tsettings\tsteps\tms_per_step\tpre_bpb\tlive_bpb\twall_s\n' > "$out"
for spec in "$@"; do
  label=${spec%%:*}; settings=${spec#*:}
  IFS=',' read -r -a kvs <<< "$settings"
  for seed in ${SEEDS:-1337 42}; do
    dir="$runs/${label}_s$seed"; rm -rf "$dir"
    summary=$(RUN_DIR="$dir" bash "$bench" "${SCRIPT:-$here/train_gpt.py}" SEED="$seed" "${kvs[@]}" 2>&1 | tail -2)
    get() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<< "$summary" | head -1; }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$seed" "${settings:--}" "$(get steps)" \
      "$(get ms_per_step)" "$(get pre_bpb)" "$(get live_bpb)" "$(get wall_s)" | tee -a "$out"
  done
done
