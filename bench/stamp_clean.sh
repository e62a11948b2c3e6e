#!/usr/bin/env bash
# Re-times the STAMP comparisons of both settings one process at a time on an otherwise idle
# machine (the first runs shared the 2 cores with other jobs, which spoils wall-clock time
# to accuracy). Reuses the reference nets and the reference-design generators of
# bench/stamp_gamma.sh (setting 1, γ = 1e-2) and bench/stamp_cifar.sh (setting 2,
# γ = 3e-3); same pruning and training arguments as those scripts. Outputs
# runs/stamp-clean/{s1,s2}/; `bench/stamp_table.py runs/stamp-clean/s1 stamp_fmnist_mnist`.
set -euo pipefail
cd "$(dirname "$0")/.."
L=${LOPPER:-target/release/lopper}
run() { local f=$O/$1.json; shift; [ -f "$f" ] || { "$L" prune "$@" > "$f.tmp" && mv "$f.tmp" "$f"; }; }
O=runs/stamp-clean/s1; mkdir -p $O
REF=runs/stamp/ref-fmnist.safetensors GEN=runs/stamp/gamma-1e-2/gen.safetensors
cp runs/stamp/gamma-1e-2/meta.json $O/meta.json
t=(--data mnist --train-limit 10000 --finetune-epochs 3 --lr 0.05 --eval-every-epoch --json)
run stamp $REF --method stamp --generator $GEN --keep-macs 0.5 "${t[@]}"
run scratch resnet8@1x28x28 --method l1 --remove-channels 0 "${t[@]}"
run l1 $REF --method l1 --keep-macs 0.5 "${t[@]}"
run random $REF --method random --keep-macs 0.5 "${t[@]}"
run random-widths $REF --method stamp --generator $GEN --stamp-random --keep-macs 0.5 "${t[@]}"
O=runs/stamp-clean/s2; mkdir -p $O
REF=runs/stamp-cifar/ref-cifar6.safetensors GEN=runs/stamp-cifar/gen-cifar6.safetensors
cp runs/stamp-cifar/meta.json $O/meta.json
t=(--data cifar10 --classes 6,7,8,9 --finetune-epochs 5 --lr 0.05 --eval-every-epoch --json)
run stamp $REF --method stamp --generator $GEN --keep-macs 0.5 "${t[@]}"
run l1 $REF --method l1 --keep-macs 0.5 "${t[@]}"
run random-widths $REF --method stamp --generator $GEN --stamp-random --keep-macs 0.5 "${t[@]}"
run scratch resnet20 --method l1 --remove-channels 0 "${t[@]}"
run random $REF --method random --keep-macs 0.5 "${t[@]}"
