#!/usr/bin/env bash
# Run ../shared/bench/cpu_quality.sh (the 180 s CPU quality benchmark) for knob settings x seeds,
# one run at a time (each run uses every core), appending one TSV row per run.
#
# Usage: tools/cpu_ablation.sh OUT.tsv "LABEL:KEY=VAL,KEY=VAL" ...
#   e.g. tools/cpu_ablation.sh ablation.tsv "default:" "no_birkhoff:BIRKHOFF_MIX=0" "dial:LOOP_SAMPLE=1,2,3,EVAL_LOOPS=0,2,4"
# Environment: SEEDS (default "1337 42"), BENCH (default ../shared/bench/cpu_quality.sh),
#   DATA_DIR (passed through to the benchmark when set), RUNS_DIR (default ./ablation_runs),
#   SCRIPT (default: this repo's train_gpt.py; point it at a frozen copy to keep editing meanwhile).
# Each run's logs/LABEL_sSEED.{txt,json} land in RUNS_DIR/LABEL_sSEED/ (tools/summarize_runs.py reads them).
# ms_per_step is the benchmark's (wall-clock-capped runs) or, for runs that stop at ITERATIONS
# (MAX_WALLCLOCK_SECONDS=0), the run JSON's train_time_ms / steps. load1 is the 1-minute load average
# when the run starts: on a shared machine ms_per_step measures the other users' load as well.
# NGRAM_TILT=0 unless a setting says otherwise: sliding_bpb stays the untilted score of every earlier table
# (the tilt, on by default since issue 15, is an evaluation-side offset that says nothing about training).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$1; shift
bench=${BENCH:-$here/../shared/bench/cpu_quality.sh}
runs=${RUNS_DIR:-$PWD/ablation_runs}
fields=(steps ms_per_step pre_bpb post_bpb sliding_bpb ttt_bpb artifact_bytes wall_s)
ms_from_json() { # ms_from_json RUN.json : training ms per step of a finished run, NA if absent
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(round(r["train_time_ms"]/r["steps"]))' "$1" 2>/dev/null || echo NA
}
mkdir -p "$runs"
[[ -s $out ]] || (IFS=$'\t'; echo "label	seed	settings	${fields[*]}	load1") > "$out"
for spec in "$@"; do
  label=${spec%%:*}; settings=${spec#*:}
  kvs=()  # split at commas that start a new KEY=, so that values may hold commas (EVAL_LOOPS=0,1,2)
  [[ -z $settings ]] || mapfile -t kvs < <(sed -E 's/,([A-Z][A-Z0-9_]*=)/\n\1/g' <<< "$settings")
  for seed in ${SEEDS:-1337 42}; do
    dir="$runs/${label}_s$seed"; rm -rf "$dir"
    load1=$(cut -d' ' -f1 /proc/loadavg)
    summary=$(RUN_DIR="$dir" bash "$bench" "${SCRIPT:-$here/train_gpt.py}" SEED="$seed" RUN_ID="${label}_s$seed" NGRAM_TILT=0 "${kvs[@]}" 2>&1 | tail -2)
    row=("$label" "$seed" "${settings:--}")
    for f in "${fields[@]}"; do row+=("$(sed -n "s/.*\b$f=\([^ ]*\).*/\1/p" <<< "$summary" | head -1)"); done
    [[ ${row[4]} != NA ]] || row[4]=$(ms_from_json "$dir/logs/${label}_s$seed.json")
    row+=("$load1")
    (IFS=$'\t'; echo "${row[*]}") | tee -a "$out"
  done
done
