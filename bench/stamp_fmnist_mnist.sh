#!/usr/bin/env bash
# STAMP setting 1 (issue 6): reference Fashion-MNIST → target MNIST, ResNet-8 at 28×28.
# 1. pretrain the reference net on Fashion-MNIST; 2. meta-train the generator on it;
# 3. on MNIST (10,000 training images, full test set), at ≤ 50 % of the MACs: STAMP,
#    (a) the dense net trained from scratch, (b) L1 pruning of the reference net + training,
#    (c) random channels of the reference net at STAMP's widths + training (random-widths;
#    "random" is uniform random pruning at the same MACs) — each trained 3 epochs
#    with the test accuracy after every epoch (--eval-every-epoch). γ = 1e-2 from bench/stamp_gamma.sh.
#    Outputs in runs/stamp/;
#    bench/stamp_table.py builds the table and the accuracy-vs-time plot. Resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
L=${LOPPER:-target/release/lopper}
O=runs/stamp
mkdir -p $O
REF=$O/ref-fmnist.safetensors
GEN=$O/gen-fmnist.safetensors
[ -f $REF ] || { $L train resnet8@1x28x28 --data fashion-mnist --epochs 3 --lr 0.05 --batch-size 128 --json -o $REF > $O/ref-train.json.tmp && mv $O/ref-train.json.tmp $O/ref-train.json; }
[ -f $O/meta.json ] || { $L stamp meta-train $REF --data fashion-mnist --iterations 100 --gamma 1e-2 -o $GEN --json > $O/meta.json.tmp && mv $O/meta.json.tmp $O/meta.json; }
t=(--data mnist --train-limit 10000 --finetune-epochs 3 --lr 0.05 --eval-every-epoch --json)
run() { local f=$O/$1.json; shift; [ -f "$f" ] || { "$L" prune "$@" > "$f.tmp" && mv "$f.tmp" "$f"; }; }
run stamp $REF --method stamp --generator $GEN --keep-macs 0.5 "${t[@]}"
run scratch resnet8@1x28x28 --method l1 --remove-channels 0 "${t[@]}"
run l1 $REF --method l1 --keep-macs 0.5 "${t[@]}"
run random $REF --method random --keep-macs 0.5 "${t[@]}"
run random-widths $REF --method stamp --generator $GEN --stamp-random --keep-macs 0.5 "${t[@]}"
