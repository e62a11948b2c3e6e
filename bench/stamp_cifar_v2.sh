#!/usr/bin/env bash
# STAMP setting 2 with the two meta-training options the planted-channel toy needed
# (--frozen-bn --center-embedding, BENCHMARKS §10), everything else as bench/stamp_cifar.sh
# (which must have run first: reference net, baselines). Outputs in runs/stamp-cifar/v2/.
set -euo pipefail
cd "$(dirname "$0")/.."
L=${LOPPER:-target/release/lopper}
O=runs/stamp-cifar/v2
mkdir -p $O
REF=runs/stamp-cifar/ref-cifar6.safetensors
GEN=$O/gen-cifar6.safetensors
[ -f $O/meta.json ] || { $L stamp meta-train $REF --data cifar10 --classes 0,1,2,3,4,5 --iterations 100 --n-way 3 --gamma 3e-3 \
  --frozen-bn --center-embedding -o $GEN --json > $O/meta.json.tmp && mv $O/meta.json.tmp $O/meta.json; }
t=(--data cifar10 --classes 6,7,8,9 --finetune-epochs 5 --lr 0.05 --eval-every-epoch --json)
run() { local f=$O/$1.json; shift; [ -f "$f" ] || { "$L" prune "$@" > "$f.tmp" && mv "$f.tmp" "$f"; }; }
run stamp $REF --method stamp --generator $GEN --keep-macs 0.5 "${t[@]}"
run random-widths $REF --method stamp --generator $GEN --stamp-random --keep-macs 0.5 "${t[@]}"
