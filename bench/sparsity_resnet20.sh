#!/usr/bin/env bash
# The post-training sparsity table (issue 5): the dense ResNet-20 on CIFAR-10 JPEG
# (runs/resnet20-cifar10-c.safetensors, bench/train_resnet20.sh) at 50/70/80/90 % sparsity,
# every method on the same 2,048-image calibration set (seed 0). One JSON report per run in
# runs/sparsity/ (skipped when present, so the script resumes); bench/sparsity_table.py
# builds the table. UniPTS: GA pop 10 / 5 generations / 4 parents / 3+3 children over a
# 1,024-image bootstrap, 10 sparse-training epochs; the training ablations reuse the full
# run's searched genome. POT: 5 layer-wise tuning iterations per level (reference 30).
set -euo pipefail
cd "$(dirname "$0")/.."
# Overrides: LOPPER (binary), MODEL (dense model), OUT (report directory), SPARSITIES,
# METHODS (space-separated names of the runs below, e.g. "pot" or "magnitude unipts").
L=${LOPPER:-target/release/lopper}
M=${MODEL:-runs/resnet20-cifar10-c.safetensors}
O=${OUT:-runs/sparsity}
mkdir -p $O
common=(--data cifar10 --calib 2048 --seed 0 --json)
run() { # name sparsity args...
  if [ -n "${METHODS:-}" ] && [[ " $METHODS " != *" $1 "* ]]; then return 0; fi
  local f=$O/$1_$2.json; shift 2
  [ -f "$f" ] && return 0
  echo "== $f" >&2
  $L sparsify $M "${common[@]}" "$@" > "$f.tmp" && mv "$f.tmp" "$f"
}
for s in ${SPARSITIES:-0.9 0.5 0.7 0.8}; do
  run magnitude $s --method magnitude --sparsity $s
  run global $s --method global --sparsity $s
  run wanda $s --method wanda --sparsity $s
  run pot $s --method pot --sparsity $s --pot-iters 5
  u=(--method unipts --sparsity $s --epochs 10 --search-samples 1024)
  run unipts $s "${u[@]}"
  run unipts-nosearch $s "${u[@]}" --search none
  run unipts-nobasedecay $s "${u[@]}" --genome-from $O/unipts_$s.json --no-base-decay
  run unipts-static $s "${u[@]}" --genome-from $O/unipts_$s.json --static-mask
done
