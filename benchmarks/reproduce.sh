#!/usr/bin/env bash
# Run a whole table of the paper as a plain shell loop over `ncm train --json`, then
# aggregate it with `ncm report`. Written the way a user would script a sweep.
#
#   benchmarks/reproduce.sh TARGET [OUT]
#
#   TARGET  table2 | table3 | figure2 | study | study-long | cpu | smoke
#           table2/table3/figure2: the paper's cells on the paper's nets (a GPU's work)
#           study:  the CPU convergence study of REPRODUCTION.md (real CIFAR-10 as JPEG folders
#                   and Fashion-MNIST; about 2 hours on 2 cores); needs CIFAR10_DIR
#           study-long: the study's cells at 40 epochs instead of 12 (trained until they fit):
#                   CIFAR-10 p=0 for SoftMax, E-NCM, C-NCM, then CIFAR-10+ p=0.1 and CIFAR-10
#                   p=0.25 (about 11 minutes a run, 2 seeds: 2.5 hours); needs CIFAR10_DIR
#           scale:  loss.scale 1/2/auto/4/8/learn for E-NCM and C-NCM against SoftMax, on
#                   Fashion-MNIST (10k sample, tiny net) and CIFAR-10 (4k sample); each run is
#                   then evaluated (ECE, feature norm, open-set vs CIFAR-10); needs CIFAR10_DIR
#           longtail: CIFAR-10-LT (data.imbalance=exp:100 on a 20k stratified sample, so
#                   n_max = 2000), SoftMax vs E-NCM/C-NCM, logit adjustment; needs CIFAR10_DIR
#           incremental: class-incremental Split Fashion-MNIST (5 tasks of 2 classes), E-NCM
#                   with 10 and 100 pre-allocated anchor slots vs a growing SoftMax head, replay
#                   0/1100/4400, and joint training; runs benchmarks/incremental.sh (about 40 min)
#           openset: the two known/unknown pairs of docs/guides/open-set.md's table; needs CIFAR10_DIR
#           cpu:    the short Fashion-MNIST comparison;  smoke: tiny, for tests
#   OUT     where the runs go (default: sweeps/TARGET)
#
# Environment:
#   EPOCHS="90"        override train.epochs for every run (default: each preset's own)
#   SEEDS="0 1 2"      seeds per cell (default: 0 1 2; the study's default is "0 1")
#   EXTRA="--set ..."  more ncm train arguments for every run (e.g. --device cuda:1)
#   NCM="ncm"          the ncm command
#   PARALLEL=1         runs at once (e.g. PARALLEL=8 on one big GPU: the paper's small nets
#                      leave most of an H200 idle); each run's stderr goes to OUT/logs/RUN.err
#   CIFAR10_DIR=...    study: a folder with train/<class>/ and test/<class>/ CIFAR-10 images
#
# A cell may end in ":: NAME:ARGS;;NAME2:ARGS2": after training, `ncm eval RUN/last.safetensors
# --json ARGS` is written to RUN/NAME.json for each (skipped when it exists).
#
# Resumable: a run whose result.json exists is skipped, and a run that was stopped (Ctrl-C,
# SIGTERM, a killed session) continues from its last.safetensors with --resume. Examples:
#   EPOCHS=2 SEEDS="0" benchmarks/reproduce.sh table2            # quick check
#   benchmarks/reproduce.sh table3 sweeps/table3                 # the full run (GPU)
#   CIFAR10_DIR=/data/cifar10 benchmarks/reproduce.sh study      # the CPU study
set -euo pipefail

TARGET="${1:?usage: reproduce.sh table2|table3|figure2|study|study-long|scale|longtail|incremental|openset|cpu|smoke [OUT]}"
OUT="${2:-sweeps/$TARGET}"
NCM="${NCM:-ncm}"
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
if [[ "$TARGET" == study* ]]; then SEEDS="${SEEDS:-0 1}"
elif [[ "$TARGET" == openset ]]; then SEEDS="${SEEDS:-0}"
else SEEDS="${SEEDS:-0 1 2}"; fi

if [[ "$TARGET" == incremental ]]; then  # chains of --extend runs, not independent cells
  SEEDS="$SEEDS" exec "$(dirname "$0")/incremental.sh" "$OUT"
fi

cells=()   # "name preset [--set k=v ...]": one cell, run once per seed
case "$TARGET" in
  table2)
    for ds in mnist cifar10 cifar10plus cifar100; do
      for m in hinge lsoftmax2 lsoftmax3 lsoftmax4 cncm encm; do cells+=("$ds-$m $ds-$m"); done
    done ;;
  table3)
    for ds in cifar10 cifar10plus cifar100; do
      for m in softmax cncm encm; do
        for p in 0 0.1 0.25 0.5; do cells+=("$ds-$m-p$p $ds-$m --set model.dropout=$p"); done
      done
    done ;;
  figure2)
    for m in softmax cncm encm; do cells+=("mnist2d-$m mnist2d-$m"); done ;;
  study)
    : "${CIFAR10_DIR:?the study needs CIFAR10_DIR (a folder with train/ and test/; see REPRODUCTION.md)}"
    # CIFAR-10 as JPEG folders: a stratified 8,000-image training sample, a stratified 4,000-image
    # test sample, Table 1's CIFAR-10 layout at quarter width, 12 epochs of batch 128 (Liu et
    # al.'s batch, for every method: twice the paper's 256's steps in a CPU budget), lr cut /10
    # after epochs 6 and 9 for every method (one schedule, so that only the loss differs).
    C="--set data.name=folder --set data.root=$CIFAR10_DIR --set data.limit_train=8000 --set data.limit_test=4000"
    C="$C --set model.arch=cifar10-cpu --set train.epochs=12 --set train.batch_size=128 --set optim.schedule=multistep"
    C="$C --set optim.milestone_unit=epoch --set optim.milestones=6,9"
    # Liu et al.'s lambda annealing spans 30,000 iterations; here a run is 12 x 63 = 756
    # iterations of 128, so gamma is scaled by 30000/756 (CIFAR-10: 2e-5 -> 7.9e-4,
    # CIFAR-10+: 1e-5 -> 4.0e-4; Fashion-MNIST with the MNIST files: 2.5e-5 x 30000/1884 -> 4.0e-4).
    F="--set data.limit_train=20000 --set model.arch=tiny --set train.epochs=12 --set train.batch_size=128"
    F="$F --set optim.schedule=multistep"
    F="$F --set optim.milestone_unit=epoch --set optim.milestones=6,9"
    # In priority order: the cells that answer the main question first.
    for p in 0.1 0; do
      for m in encm softmax cncm; do cells+=("c10-$m-p$p cifar10-$m $C --set model.dropout=$p"); done
    done
    for m in encm softmax cncm; do cells+=("c10plus-$m-p0.1 cifar10plus-$m $C"); done
    for m in encm softmax cncm; do cells+=("c10-$m-p0.25 cifar10-$m $C --set model.dropout=0.25"); done
    cells+=("c10-lsoftmax2 cifar10-lsoftmax2 $C --set loss.lambda_gamma=0.00079")
    cells+=("c10-hinge cifar10-hinge $C")
    cells+=("c10plus-lsoftmax2 cifar10plus-lsoftmax2 $C --set loss.lambda_gamma=0.0004")
    cells+=("c10plus-hinge cifar10plus-hinge $C")
    for m in encm softmax cncm; do cells+=("fmnist-$m fashion-mnist-$m $F"); done
    cells+=("fmnist-lsoftmax2 mnist-lsoftmax2 $F --set data.name=fashion-mnist --set loss.lambda_gamma=0.0004")
    cells+=("fmnist-hinge mnist-hinge $F --set data.name=fashion-mnist") ;;
  study-long)
    : "${CIFAR10_DIR:?the study needs CIFAR10_DIR (a folder with train/ and test/; see REPRODUCTION.md)}"
    # The study's CIFAR-10 sample, net and batch, but 40 epochs with lr /10 after epochs 20 and
    # 30: the 12-epoch study left every net underfit (training accuracy 43-70%). p = 0, the
    # paper's "without data augmentation and dropout" claim (Table 3). E-NCM and SoftMax first.
    C="--set data.name=folder --set data.root=$CIFAR10_DIR --set data.limit_train=8000 --set data.limit_test=4000"
    C="$C --set model.arch=cifar10-cpu --set train.epochs=40 --set train.batch_size=128 --set optim.schedule=multistep"
    C="$C --set optim.milestone_unit=epoch --set optim.milestones=20,30 --set model.dropout=0"
    for m in encm softmax cncm; do cells+=("c10long-$m-p0 cifar10-$m $C"); done
    # Then the other two claims at the same budget: CIFAR-10+ at Table 2's p = 0.1 (E-NCM vs
    # SoftMax), and p = 0.25 on CIFAR-10 (does dropout help E-NCM more than SoftMax?).
    for m in encm softmax; do cells+=("c10pluslong-$m-p0.1 cifar10plus-$m $C --set model.dropout=0.1"); done
    for m in encm softmax; do cells+=("c10long-$m-p0.25 cifar10-$m $C --set model.dropout=0.25"); done
    for m in cncm; do
      cells+=("c10pluslong-$m-p0.1 cifar10plus-$m $C --set model.dropout=0.1")
      cells+=("c10long-$m-p0.25 cifar10-$m $C --set model.dropout=0.25")
    done ;;
  scale)
    : "${CIFAR10_DIR:?the scale study needs CIFAR10_DIR (a folder with train/ and test/; see REPRODUCTION.md)}"
    # One thread a run, so that two studies share a 2-core machine. Fashion-MNIST: a stratified
    # 10,000-image training sample, the tiny net, 8 epochs of batch 128, lr /10 after epochs 5
    # and 7 for every arm; evaluated on 2,000 test images against 2,000 CIFAR-10 test images
    # converted to grayscale 28x28.
    F="--set data.name=fashion-mnist --set data.limit_train=10000 --set model.arch=tiny --set train.epochs=8"
    F="$F --set train.batch_size=128 --set optim.schedule=multistep --set optim.milestones=5,7 --set train.num_threads=1"
    FE=":: eval:--limit 2000 --ood $CIFAR10_DIR"
    for s in 1 auto learn 4 2 8; do
      for m in encm cncm; do cells+=("fmnist-$m-s$s fashion-mnist-cpu-$m $F --set loss.scale=$s $FE"); done
    done
    cells+=("fmnist-softmax fashion-mnist-cpu-softmax $F $FE")
    # CIFAR-10 JPEGs: stratified 4,000/2,000-image samples (half the earlier study's, to fit
    # beside the long-tail study), the cifar10-cpu net without dropout, 10 epochs, lr /10 after
    # epochs 6 and 8. SoftMax and scale 1 first.
    C="--set data.name=folder --set data.root=$CIFAR10_DIR --set data.limit_train=4000 --set data.limit_test=2000"
    C="$C --set model.arch=cifar10-cpu --set model.dropout=0 --set train.epochs=10 --set train.batch_size=128"
    C="$C --set optim.schedule=multistep --set optim.milestones=6,8 --set train.num_threads=1"
    cells+=("c10-softmax cifar10-softmax $C :: eval:")
    for s in 1 auto learn 4; do cells+=("c10-encm-s$s cifar10-encm $C --set loss.scale=$s :: eval:"); done
    cells+=("c10-cncm-sauto cifar10-cncm $C --set loss.scale=auto :: eval:") ;;
  longtail)
    : "${CIFAR10_DIR:?the long-tail study needs CIFAR10_DIR (a folder with train/ and test/; see REPRODUCTION.md)}"
    # CIFAR-10-LT: a stratified 20,000-image sample (2,000 a class), then Cao et al.'s exp
    # profile at IF 100 (2000 ... 20 images, 4,962 in all); 2,000 balanced test images; the
    # cifar10-cpu net without dropout, 15 epochs of batch 128 at lr 0.01, /10 after epochs 10
    # and 13, one thread a run. (At the paper's lr 0.1 SoftMax collapsed onto the head class:
    # 10% test accuracy for all 15 epochs, both seeds; 0.01 trains every arm.) Every run is also
    # evaluated with post-hoc logit adjustment (tau = 1).
    L="--set data.name=folder --set data.root=$CIFAR10_DIR --set data.limit_train=20000 --set data.limit_test=2000"
    L="$L --set model.arch=cifar10-cpu --set model.dropout=0 --set train.epochs=15 --set train.batch_size=128 --set optim.lr=0.01"
    L="$L --set optim.schedule=multistep --set optim.milestones=10,13 --set train.num_threads=1"
    LE=":: eval:;;eval-la1:--logit-adjust 1"
    for imb in exp:100 exp:10; do
      tag="if${imb#exp:}"
      cells+=("lt-$tag-softmax cifar10-softmax $L --set data.imbalance=$imb $LE")
      cells+=("lt-$tag-encm-sauto cifar10-encm $L --set data.imbalance=$imb --set loss.scale=auto $LE")
      [ "$imb" = exp:10 ] && continue  # IF 10: SoftMax and the main NCM arm only
      cells+=("lt-$tag-encm-s1 cifar10-encm $L --set data.imbalance=$imb $LE")
      cells+=("lt-$tag-encm-sauto-la1 cifar10-encm $L --set data.imbalance=$imb --set loss.scale=auto --set loss.logit_adjust=1 $LE")
      cells+=("lt-$tag-cncm-sauto cifar10-cncm $L --set data.imbalance=$imb --set loss.scale=auto $LE")
      cells+=("lt-$tag-encm-simplex-sauto cifar10-encm $L --set data.imbalance=$imb --set loss.scale=auto --set anchors.method=simplex $LE")
    done
    # Run IF 100 first (the question), then IF 10.
    cells=("${cells[0]}" "${cells[1]}" "${cells[@]:4}" "${cells[2]}" "${cells[3]}") ;;
  openset)
    : "${CIFAR10_DIR:?the open-set check needs CIFAR10_DIR (a folder with train/ and test/)}"
    # Two real known/unknown pairs for `ncm eval --ood`, each at scale 1 and auto: the
    # fashion-mnist-cpu-encm preset (all 60k images) against all 10,000 CIFAR-10 test images in
    # grayscale 28x28; and CIFAR-10's
    # 6 known / 4 unknown split (CAC's split 0: known airplane, automobile, bird, deer, dog,
    # truck) on a 6,000-image stratified sample, the cifar10-cpu net, 15 epochs, against 2,000 of
    # the 4,000 unknown test images.
    U="$OUT/unknown4/test"
    for c in cat frog horse ship; do
      if [ ! -d "$U/$c" ]; then mkdir -p "$U/$c" && ln -s "$CIFAR10_DIR"/test/"$c"/* "$U/$c/"; fi
    done
    for s in 1 auto; do
      cells+=("fmnist-encm-s$s fashion-mnist-cpu-encm --set loss.scale=$s --set train.num_threads=1 :: ood:--ood $CIFAR10_DIR")
    done
    K="--set data.name=folder --set data.root=$CIFAR10_DIR --set data.classes=0,1,2,4,5,9"
    K="$K --set data.limit_train=6000 --set data.limit_test=3000 --set model.arch=cifar10-cpu --set model.dropout=0"
    K="$K --set train.epochs=15 --set train.batch_size=128 --set optim.schedule=multistep --set optim.milestones=10,13"
    K="$K --set train.num_threads=1"
    for s in 1 auto; do cells+=("c10-6known-encm-s$s cifar10-encm $K --set loss.scale=$s :: ood:--ood $U --limit 2000"); done ;;
  cpu)
    for m in softmax hinge lsoftmax2 lsoftmax4 center cncm encm; do cells+=("fashion-mnist-cpu-$m fashion-mnist-cpu-$m"); done ;;
  smoke)
    cells=("quickstart quickstart" "quickstart-softmax quickstart-softmax") ;;
  *) echo "reproduce.sh: unknown target '$TARGET' (table2, table3, figure2, study, study-long, scale, longtail, incremental, openset, cpu, smoke)" >&2; exit 2 ;;
esac

mkdir -p "$OUT/logs"
start=$(date +%s)
PARALLEL="${PARALLEL:-1}"
train_one() {  # run, preset, cell arguments...: train (or resume) one run into $OUT/run
  local run="$1" preset="$2"; shift 2
  if [ -f "$OUT/$run/last.safetensors" ]; then
    echo "resume $run" >&2
    "$NCM" train --resume "$OUT/$run" --json --quiet "${EXTRA_ARGS[@]}" > "$OUT/logs/$run.json"
    return
  fi
  local args=(train --preset "$preset" "$@" --out "$OUT/$run" --json --quiet --force)
  [ -n "${EPOCHS:-}" ] && args+=(--set "train.epochs=$EPOCHS")
  echo "run  $run  ($(date +%H:%M:%S))" >&2
  "$NCM" "${args[@]}" "${EXTRA_ARGS[@]}" > "$OUT/logs/$run.json"
}
for cell in "${cells[@]}"; do
  read -r name preset rest <<< "$cell"
  evals=""
  if [[ "$rest" == *"::"* ]]; then evals="${rest#*::}"; rest="${rest%%::*}"; fi
  read -r -a cell_args <<< "${rest:-}"
  for seed in $SEEDS; do
    run="$name-s$seed"
    if [ -f "$OUT/$run/result.json" ]; then echo "skip $run (done)" >&2; continue; fi
    if [ "$PARALLEL" -gt 1 ]; then
      # PARALLEL=N: N runs at once on one device (the paper's small nets cannot fill a big GPU
      # alone); each run's output goes to its own log, a failed run does not stop the others.
      while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n || true; done
      train_one "$run" "$preset" "${cell_args[@]}" --set "seed=$seed" 2> "$OUT/logs/$run.err" &
    else
      train_one "$run" "$preset" "${cell_args[@]}" --set "seed=$seed"
    fi
  done
done
wait  # the last parallel runs
# Evaluations after training (a second pass, so that a resumed sweep evaluates what it skipped).
for cell in "${cells[@]}"; do
  read -r name preset rest <<< "$cell"
  [[ "$rest" == *"::"* ]] || continue
  IFS=';' read -r -a specs <<< "${rest#*::}"
  for seed in $SEEDS; do
    run="$name-s$seed"
    [ -f "$OUT/$run/result.json" ] || continue
    for spec in "${specs[@]}"; do
      [ -n "${spec// /}" ] || continue
      ename="${spec%%:*}"; ename="${ename// /}"; read -r -a eargs <<< "${spec#*:}"
      [ -f "$OUT/$run/$ename.json" ] && continue
      "$NCM" eval "$OUT/$run/last.safetensors" --json "${eargs[@]}" > "$OUT/$run/$ename.json.tmp" 2>> "$OUT/logs/$run.eval.err" \
        && mv "$OUT/$run/$ename.json.tmp" "$OUT/$run/$ename.json"
    done
  done
done
echo "sweep finished in $(( $(date +%s) - start )) s" >&2
"$NCM" report "$OUT" --format md | tee "$OUT/report.md"
