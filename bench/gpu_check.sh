#!/usr/bin/env bash
# The GPU check (issue 21), ready to run as-is on a machine with an NVIDIA GPU and its driver:
#
#     bench/gpu_check.sh            # device cuda (= cuda:0); or cuda:N
#     bench/gpu_check.sh cpu        # the CPU half alone (what runs on this project's machines)
#
# 1. builds lopper (with `--features cuda` for a GPU; the toolkit comes from PyPI wheels via
#    bench/cuda_env.sh unless nvcc is already on PATH);
# 2. parity: tests/device_parity.rs with LOPPER_TEST_DEVICE set — train- and eval-mode
#    logits and every parameter gradient of five networks, the device against lopper's CPU
#    kernels (on `cpu`: candle's ops on the CPU against lopper's kernels);
# 3. timings, on the device and on the CPU, printed side by side: one ResNet-20 epoch on
#    CIFAR-10 JPEG (batch 128), an L1 prune of the shipped ResNet-20 to 50 % MACs with one
#    fine-tuning epoch, and a UniPTS sparsify to 70 % (reduced search, 1 sparse-training epoch
#    over 2,048 calibration images).
# Needs ../shared/data (or LOPPER_DATA). Under ten minutes with a GPU; the CPU columns
# dominate (≈ 5 min on 2 cores).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$HERE"
DEV="${1:-cuda}"
lscpu | grep -m1 "Model name" || true
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

if [ "$DEV" = cpu ]; then
  FEATURES=()
  TARGET=target
else
  if ! command -v nvcc >/dev/null 2>&1; then
    # shellcheck source=/dev/null
    source bench/cuda_env.sh
  fi
  FEATURES=(--features cuda)
  TARGET=target/cuda
fi
echo "== build (${FEATURES[*]:-cpu})"
cargo build --release "${FEATURES[@]}" --target-dir "$TARGET"
BIN="$TARGET/release/lopper"

echo "== parity: $DEV vs lopper's CPU kernels (tests/device_parity.rs)"
LOPPER_TEST_DEVICE="$DEV" cargo test --release "${FEATURES[@]}" --target-dir "$TARGET" \
  --test device_parity -- --nocapture 2>&1 | grep -E "logits|test result|panicked|differ"

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
# Seconds of wall time of one command (its output kept in $OUT/last.log).
timed() {
  local t0 t1
  t0=$(date +%s.%N)
  if ! "$@" >"$OUT/last.log" 2>&1; then
    echo "FAILED: $*" >&2
    tail -5 "$OUT/last.log" >&2
    touch "$OUT/failed"
    echo "nan"
    return
  fi
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }'
}
declare -A T
DEVICES=("$DEV")
[ "$DEV" = cpu ] || DEVICES+=(cpu)
for d in "${DEVICES[@]}"; do
  echo "== timings on $d"
  T[train,$d]=$(timed "$BIN" train resnet20 --data cifar10 --epochs 1 --batch-size 128 \
    --lr 0.1 --device "$d" --json)
  echo "  train ResNet-20, 1 epoch of CIFAR-10: ${T[train,$d]} s"
  T[prune,$d]=$(timed "$BIN" prune resnet20-cifar10 --data cifar10 --method l1 --keep-macs 0.5 \
    --round-to 8 --finetune-epochs 1 --device "$d" --output "$OUT/pruned-$d.safetensors" --json)
  echo "  prune L1 to 50 % MACs + 1 fine-tuning epoch: ${T[prune,$d]} s"
  grep -oE '"(top1_after|top1_before|top1)": [0-9.]+' "$OUT/last.log" | head -3 | sed 's/^/    /' || true
  T[sparsify,$d]=$(timed "$BIN" sparsify resnet20-cifar10 --data cifar10 --method unipts \
    --sparsity 0.7 --calib 2048 --ga-pop 6 --ga-gens 2 --search-samples 256 \
    --finetune-epochs 1 --eval-limit 2000 --device "$d" --output "$OUT/sparse-$d.safetensors" --json)
  echo "  UniPTS sparsify to 70 % (reduced search, 1 DST epoch): ${T[sparsify,$d]} s"
done

echo
printf "%-44s" "step"; for d in "${DEVICES[@]}"; do printf "%12s" "$d s"; done; echo
for s in train prune sparsify; do
  case $s in
    train) label="train ResNet-20, 1 epoch CIFAR-10 (b128)";;
    prune) label="prune L1 50 % MACs + 1 epoch fine-tune";;
    sparsify) label="UniPTS sparsify 70 % (reduced)";;
  esac
  printf "%-44s" "$label"
  for d in "${DEVICES[@]}"; do printf "%12.1f" "${T[$s,$d]}"; done; echo
done
if [ -e "$OUT/failed" ]; then
  echo "gpu_check: a step failed (see above)" >&2
  exit 1
fi
