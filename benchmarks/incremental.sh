#!/usr/bin/env bash
# Class-incremental Split Fashion-MNIST (Hsu et al.'s Split MNIST protocol on Fashion-MNIST):
# 5 tasks of 2 classes in label order, one head for all classes, the same MLP and budget
# (4 epochs of batch 128 per task, Adam lr 1e-3) in every arm. Run by
# `benchmarks/reproduce.sh incremental [OUT]`; the table is benchmarks/incremental_table.py OUT.
#
#   arms: E-NCM with 10 anchor slots and with 100 (pre-allocated, fixed), SoftMax with a head
#         that grows a row per new class; each with replay 0, 1100 and 4400 images;
#         joint training on all 10 classes (4 epochs) as the upper bound, E-NCM and SoftMax.
#
# Layout: OUT/ARM-sSEED/tK/ (task K's run folder, extended from t(K-1)/last.safetensors) with
# tK/eval.json (`ncm eval --json`: every class seen so far, and the accuracy of each task).
# Resumable like reproduce.sh: finished tasks are skipped, stopped ones continue with --resume.
set -euo pipefail
OUT="${1:-sweeps/incremental}"
NCM="${NCM:-ncm}"
SEEDS="${SEEDS:-0 1 2}"
TASKS="${TASKS:-5}"
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
mkdir -p "$OUT/logs"
start=$(date +%s)

train_task() {  # run_dir, then ncm train arguments
  local run="$1"; shift
  if [ -f "$run/result.json" ]; then return 0; fi
  if [ -f "$run/last.safetensors" ]; then
    "$NCM" train --resume "$run" --json --quiet > "$run.log.json"
  else
    mkdir -p "$(dirname "$run")"
    "$NCM" train "$@" --out "$run" --json --quiet --force "${EXTRA_ARGS[@]}" > "$run.log.json"
  fi
}

evaluate() {
  [ -f "$1/eval.json" ] || { "$NCM" eval "$1/last.safetensors" --json > "$1/eval.json.tmp" && mv "$1/eval.json.tmp" "$1/eval.json"; }
}

arms=()
for r in 0 1100 4400; do
  arms+=("encm-slots10-r$r split-fashion-mnist-encm --set anchors.slots=10 --set train.replay=$r")
  arms+=("encm-slots100-r$r split-fashion-mnist-encm --set anchors.slots=100 --set train.replay=$r")
  arms+=("softmax-r$r split-fashion-mnist-softmax --set train.replay=$r")
done
for seed in $SEEDS; do
  for arm in "${arms[@]}"; do
    read -r name preset rest <<< "$arm"
    read -r -a args <<< "$rest"
    chain="$OUT/$name-s$seed"
    echo "run  $name-s$seed  ($(date +%H:%M:%S))" >&2
    for t in $(seq 1 "$TASKS"); do
      classes="$((2 * t - 2)),$((2 * t - 1))"
      common=(--preset "$preset" "${args[@]}" --set "data.classes=$classes" --set "seed=$seed" --set train.num_threads=1)
      if [ "$t" -eq 1 ]; then train_task "$chain/t1" "${common[@]}"
      else train_task "$chain/t$t" "${common[@]}" --extend "$chain/t$((t - 1))/last.safetensors"; fi
      evaluate "$chain/t$t"
    done
  done
  for method in encm softmax; do
    run="$OUT/joint-$method-s$seed/t1"
    echo "run  joint-$method-s$seed  ($(date +%H:%M:%S))" >&2
    train_task "$run" --preset "split-fashion-mnist-$method" --set "seed=$seed" --set train.num_threads=1
    evaluate "$run"
  done
done
echo "incremental sweep finished in $(( $(date +%s) - start )) s" >&2
python "$(dirname "$0")/incremental_table.py" "$OUT" | tee "$OUT/table.md"
