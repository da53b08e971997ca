#!/usr/bin/env bash
# Issue 13's CPU ablation: the old defaults (the 04-09 stack + our three additions), the new defaults,
# and the new defaults with each issue-13/14 technique switched back in turn, through tools/cpu_ablation.sh
# (one TSV row per config x seed) at a fixed step count, so that the other users' load changes ms/step
# but not the model. "old" also has per-document attention and LQER off (both came after the 04-09 stack);
# the order is the priority in which to run them when time is short.
#
# Usage: tools/issue13_ablation.sh OUT.tsv [LABEL ...]     (no LABEL: every config below, in order)
# Environment: as tools/cpu_ablation.sh (SEEDS, SCRIPT, BENCH, DATA_DIR, RUNS_DIR); ITERATIONS (150).
#
# On cpu_quality.sh's 4-layer model (loop band 1-2) the default PARALLEL_START_LAYER=8 has no layer,
# so "lanes on" is PARALLEL_START_LAYER=3 (the only decoder layer past the loop band) with the GPT-J
# parallel residual that cpu_quality.sh sets (PARALLEL_RESIDUAL_START=3) off, the two being exclusive;
# "lanes off" is the benchmark's PARALLEL_RESIDUAL_START=3, as the 04-09 stack has from layer 7 of 11.
# MAX_WALLCLOCK_SECONDS=0 makes the schedule step-based: looping at 0.35 x ITERATIONS, the warm-down over
# the last WARMDOWN_FRAC of the steps; EMA 0.9 and the 50-step momentum warm-up are step-based already.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1; shift
export ITERATIONS=${ITERATIONS:-150} MAX_WALLCLOCK_SECONDS=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

lanes_on="PARALLEL_START_LAYER=3,PARALLEL_RESIDUAL_START=-1"
lanes_off="PARALLEL_START_LAYER=-1,PARALLEL_RESIDUAL_START=3"
old_recipe="MUON_MOMENTUM=0.99,MIN_LR=0,WARMDOWN_FRAC=0.72,MATRIX_LR=0.022,BETA2=0.95"
old_quant="EMBED_BITS=8,EMBED_CLIP_SIGMAS=20,MLP_CLIP_SIGMAS=12.85,ATTN_CLIP_SIGMAS=12.85,GATED_ATTN_QUANT_GATE=0"
old_arch="SPARSE_ATTN_GATE_ENABLED=0,SMEAR_GATE_ENABLED=0,ASYM_LOGIT_RESCALE=0,$lanes_off"
declare -A configs=(
  [old]="$old_arch,MUON_NS_COEFFS=quintic,$old_recipe,$old_quant,LOSS_CHUNK_TOKENS=0,DOC_ATTENTION=0,LQER_ENABLED=0"
  [new]="$lanes_on"
  [new_quintic]="$lanes_on,MUON_NS_COEFFS=quintic"
  [new_old_recipe]="$lanes_on,$old_recipe"
  [new_no_lanes]="$lanes_off"
  [new_no_sparse_gate]="$lanes_on,SPARSE_ATTN_GATE_ENABLED=0"
  [new_no_smear]="$lanes_on,SMEAR_GATE_ENABLED=0"
  [new_no_asym]="$lanes_on,ASYM_LOGIT_RESCALE=0"
  [new_no_chunk]="$lanes_on,LOSS_CHUNK_TOKENS=0"
  [new_old_quant]="$lanes_on,$old_quant"
  [new_no_docattn]="$lanes_on,DOC_ATTENTION=0"
  [new_no_lqer]="$lanes_on,LQER_ENABLED=0"
)
order=(new old new_no_docattn new_no_lanes new_no_sparse_gate new_no_smear new_no_asym new_no_lqer new_old_quant
       new_quintic new_old_recipe new_no_chunk)
specs=()
for label in "${@:-${order[@]}}"; do
  [[ -n ${configs[$label]+x} ]] || { echo "unknown config '$label' (want one of: ${order[*]})" >&2; exit 2; }
  specs+=("$label:${configs[$label]}")
done
exec bash "$here/cpu_ablation.sh" "$out" "${specs[@]}"
