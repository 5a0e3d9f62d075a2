#!/usr/bin/env bash
# Run a whole table of the paper as a plain shell loop over `ncm train --json`, then
# aggregate it with `ncm report`. Written the way a user would script a sweep.
#
#   benchmarks/reproduce.sh TABLE [OUT]
#
#   TABLE   table2 | table3 | cpu (the CPU-sized Fashion-MNIST comparison) | smoke (tiny, for tests)
#   OUT     where the runs go (default: sweeps/TABLE)
#
# Environment:
#   EPOCHS="90"        override train.epochs for every run (default: each preset's own)
#   SEEDS="0 1 2"      seeds per cell (default: 0 1 2)
#   EXTRA="--set ..."  more ncm train arguments for every run (e.g. --device cuda:1)
#   NCM="ncm"          the ncm command
#
# A run whose result.json already exists is skipped, so an interrupted sweep continues
# where it stopped. Examples:
#   EPOCHS=2 SEEDS="0" benchmarks/reproduce.sh table2            # quick check
#   benchmarks/reproduce.sh table3 sweeps/table3                 # the full run (GPU)
set -euo pipefail

TABLE="${1:?usage: reproduce.sh table2|table3|cpu|smoke [OUT]}"
OUT="${2:-sweeps/$TABLE}"
SEEDS="${SEEDS:-0 1 2}"
NCM="${NCM:-ncm}"
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"

cells=()   # "preset dropout" pairs; dropout "-" keeps the preset's own
case "$TABLE" in
  table2)
    for ds in mnist cifar10 cifar10plus cifar100; do
      for m in hinge lsoftmax2 lsoftmax3 lsoftmax4 cncm encm; do cells+=("$ds-$m -"); done
    done ;;
  table3)
    for ds in cifar10 cifar10plus cifar100; do
      for m in softmax cncm encm; do
        for p in 0 0.1 0.25 0.5; do cells+=("$ds-$m $p"); done
      done
    done ;;
  cpu)
    for m in softmax hinge lsoftmax2 lsoftmax4 center cncm encm; do cells+=("fashion-mnist-cpu-$m -"); done ;;
  smoke)
    cells=("quickstart -" "quickstart-softmax -") ;;
  *) echo "reproduce.sh: unknown table '$TABLE' (table2, table3, cpu, smoke)" >&2; exit 2 ;;
esac

mkdir -p "$OUT/logs"
start=$(date +%s)
for cell in "${cells[@]}"; do
  read -r preset p <<< "$cell"
  for seed in $SEEDS; do
    if [ "$p" = "-" ]; then name="$preset-s$seed"; else name="$preset-p$p-s$seed"; fi
    args=(train --preset "$preset" --set "seed=$seed" --out "$OUT/$name" --json --quiet)
    [ "$p" != "-" ] && args+=(--set "model.dropout=$p")
    [ -n "${EPOCHS:-}" ] && args+=(--set "train.epochs=$EPOCHS")
    if [ -f "$OUT/$name/result.json" ]; then echo "skip $name (done)" >&2; continue; fi
    echo "run  $name" >&2
    "$NCM" "${args[@]}" --force "${EXTRA_ARGS[@]}" > "$OUT/logs/$name.json"
  done
done
echo "sweep finished in $(( $(date +%s) - start )) s" >&2
"$NCM" report "$OUT" --format md | tee "$OUT/report.md"
