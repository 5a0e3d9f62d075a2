#!/usr/bin/env bash
# One call that checks ncm on a GPU and measures it, in at most 8 minutes on one GPU:
#
#   benchmarks/device-check.sh [OUT]          # on a CUDA machine (OUT: default $OUT, else device-check-out)
#   benchmarks/device-check.sh --dry-run [OUT] # the same script on the CPU with tiny sizes, in about a minute
#
# Every training runs with NCM_SYNC_DEBUG=warn: the step loop turns on
# torch.cuda.set_sync_debug_mode("warn") between its log reads, so each host sync inside a
# step prints a warning, and this script counts them per run. It covers:
#   quickstart       the embedded data on CUDA (precision auto: bf16)
#   cifar10-fp32     the cifar10-encm net for 1 epoch in fp32 on real CIFAR-10 JPEG folders,
#                    unpacked from $CIFAR_ARCHIVE (default device-data/cifar10-jpeg.tar.gz, a
#                    git-ignored copy of ../shared/datasets/cifar10-jpeg.tar.gz)
#   compile-fp16-ema train.compile=true, fp16 with its GradScaler, and EMA, on 10,000 CIFAR images
#   resume           a run stopped by SIGINT mid-epoch and resumed must end bit-identical to a
#                    straight one (train.deterministic=true)
#   torchrun         torchrun --nproc-per-node 1 (NCCL on CUDA, gloo on the CPU)
#   gpu.py           images/s, model alone and through the data path, and TFLOP/s, fp32 and bf16
# It writes OUT/device-check.json (one summary) beside each run's folder and log.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-device-check-out}}"
HERE="$(cd "$(dirname "$0")" && pwd)"
NCM="${NCM:-ncm}"
PY="${PYTHON:-python}"
mkdir -p "$OUT_DIR"
W="$OUT_DIR/work"
mkdir -p "$W"
# Every sync warning printed, not once per source line (Python's default filter).
export NCM_SYNC_DEBUG=warn NCM_CACHE="$W/cache" PYTHONWARNINGS="always::UserWarning"
start=$(date +%s)

if [ "$DRY" = 1 ]; then
  DEV=cpu; SMALL=(--set data.limit_train=256 --set data.limit_test=64 --set train.batch_size=32 --set train.num_threads=1)
  GPU_ARGS=(--dry-run)
else
  DEV=cuda; SMALL=(); GPU_ARGS=()
fi

run() {  # name, then the ncm arguments: one line per run in runs.tsv (name, rc, seconds, warnings)
  local name="$1"; shift
  local t0=$(date +%s)
  "$@" > "$W/$name.json" 2> "$W/$name.err"
  local rc=$?
  local warns
  warns=$(grep -c "called a synchronizing CUDA operation" "$W/$name.err" || true)
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$warns" >> "$W/runs.tsv"
  echo "$name: exit $rc, $warns sync warnings" >&2
}
: > "$W/runs.tsv"

# -- The data: CIFAR-10 JPEG folders from the carried archive (the dry run makes a tiny folder)
CIFAR="$W/cifar10"
if [ "$DRY" = 1 ]; then
  "$PY" - "$CIFAR" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root = Path(sys.argv[1])
rng = np.random.default_rng(0)
for split, n in (("train", 24), ("test", 8)):
    for c in ("cat", "dog", "ship"):
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
EOF
elif [ ! -d "$CIFAR/train" ]; then
  ARCHIVE="${CIFAR_ARCHIVE:-device-data/cifar10-jpeg.tar.gz}"
  mkdir -p "$CIFAR.tmp" && tar -xzf "$ARCHIVE" -C "$CIFAR.tmp" && mv "$(dirname "$(find "$CIFAR.tmp" -type d -name train | head -1)")" "$CIFAR"
fi
C=(--set data.name=folder --set "data.root=$CIFAR" --set model.dropout=0.1)
[ "$DRY" = 1 ] && C+=(--set data.limit_train=48 --set data.limit_test=24 --set train.batch_size=24)

# -- The runs
run quickstart "$NCM" train --preset quickstart --device "$DEV" --set train.epochs=2 "${SMALL[@]}" --out "$W/r-quickstart" --force --json --quiet
run cifar10-fp32 "$NCM" train --preset cifar10-encm --set train.epochs=1 --set train.precision=fp32 --device "$DEV" "${SMALL[@]}" "${C[@]}" --out "$W/r-cifar10-fp32" --force --json --quiet
if [ "$DRY" = 1 ]; then EXTRA=(--set train.ema_decay=0.999); else EXTRA=(--set train.compile=true --set train.precision=fp16 --set train.ema_decay=0.999 --set data.limit_train=10000); fi
run compile-fp16-ema "$NCM" train --preset cifar10-encm --set train.epochs=1 --device "$DEV" "${SMALL[@]}" "${C[@]}" "${EXTRA[@]}" --out "$W/r-compile" --force --json --quiet
R=(--preset quickstart --set train.epochs=3 --set train.deterministic=true --set optim.schedule=plateau --device "$DEV" "${SMALL[@]}")
run resume-straight "$NCM" train "${R[@]}" --out "$W/r-straight" --force --json --quiet
# The stopped run: SIGINT as soon as its first epoch's checkpoint exists (two epochs still to
# go), then --resume; the summary compares the two last.safetensors tensor for tensor.
"$NCM" train "${R[@]}" --out "$W/r-stopped" --force --json --quiet > "$W/resume-stopped.json" 2> "$W/resume-stopped.err" &
pid=$!
for _ in $(seq 1 1200); do [ -f "$W/r-stopped/last.safetensors" ] && break; sleep 0.05; done
kill -INT "$pid" 2>/dev/null; wait "$pid"
run resume-resumed "$NCM" train --resume "$W/r-stopped" --json --quiet
if command -v torchrun >/dev/null 2>&1; then
  run torchrun torchrun --standalone --nproc-per-node 1 --no-python "$NCM" train --preset quickstart --set train.epochs=1 --device "$DEV" "${SMALL[@]}" --out "$W/r-torchrun" --force --json --quiet
fi
for p in fp32 bf16; do
  "$PY" "$HERE/gpu.py" --precision "$p" "${GPU_ARGS[@]}" --json "$W/gpu-$p.json" > "$W/gpu-$p.txt" 2>&1
  echo "gpu.py $p: exit $?" >&2
done

# -- One summary
"$PY" - "$W" "$OUT_DIR/device-check.json" "$(( $(date +%s) - start ))" "$DRY" <<'EOF'
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

work, out, seconds, dry = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
runs = {}
for line in (work / "runs.tsv").read_text().splitlines():
    name, rc, secs, warns = line.split("\t")
    rec = {"exit_code": int(rc), "seconds": int(secs), "sync_warnings": int(warns or 0)}
    try:
        result = json.loads((work / f"{name}.json").read_text())
        rec.update({k: result.get(k) for k in ("test_acc", "train_images_per_s", "device", "wall_time_s")})
    except (OSError, ValueError):
        pass
    runs[name] = rec
identical = None
a, b = work / "r-straight" / "last.safetensors", work / "r-stopped" / "last.safetensors"
if a.is_file() and b.is_file():
    ta, tb = load_file(str(a)), load_file(str(b))
    identical = ta.keys() == tb.keys() and all(bool((ta[k] == tb[k]).all()) for k in ta)
stopped = json.loads((work / "resume-stopped.json").read_text() or "{}") if (work / "resume-stopped.json").is_file() else {}
gpu = {p: json.loads((work / f"gpu-{p}.json").read_text()) for p in ("fp32", "bf16") if (work / f"gpu-{p}.json").is_file()}
summary = {"dry_run": dry, "seconds": seconds, "runs": runs,
           "resume": {"stopped_at": {k: stopped.get(k) for k in ("status", "epoch", "step")}, "bit_identical": identical},
           "gpu": gpu, "ok": all(r["exit_code"] == 0 for r in runs.values()) and identical is True and len(gpu) == 2}
out.write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
