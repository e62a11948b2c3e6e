#!/usr/bin/env bash
# STAMP setting 2 (issue 6): reference CIFAR-10 JPEG classes {airplane, automobile, bird,
# cat, deer, dog} (0-5) → target {frog, horse, ship, truck} (6-9), never seen in
# meta-training. ResNet-20 pretrained on the reference classes by lopper; generator
# meta-trained on them; on the target at ≤ 50 % MACs: STAMP vs (a) scratch, (b) L1 + training,
# (c) random + training, each 5 epochs on the 20,000 target training images with the test
# accuracy per epoch. γ = 3e-3: setting 1's best γ (1e-2, bench/stamp_gamma.sh) scaled down for
# ResNet-20's 4× more gates, each of which matters less to the loss. Outputs in
# runs/stamp-cifar/. Resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
L=${LOPPER:-target/release/lopper}
O=runs/stamp-cifar
mkdir -p $O
REF=$O/ref-cifar6.safetensors
GEN=$O/gen-cifar6.safetensors
[ -f $REF ] || { $L train resnet20 --data cifar10 --classes 0,1,2,3,4,5 --epochs 10 --lr 0.1 --warmup-epochs 1 \
  --batch-size 128 --checkpoint $O/ref.ckpt --resume --json -o $REF > $O/ref-train.json.tmp && mv $O/ref-train.json.tmp $O/ref-train.json; }
[ -f $O/meta.json ] || { $L stamp meta-train $REF --data cifar10 --classes 0,1,2,3,4,5 --iterations 100 --n-way 3 --gamma 3e-3 \
  -o $GEN --json > $O/meta.json.tmp && mv $O/meta.json.tmp $O/meta.json; }
t=(--data cifar10 --classes 6,7,8,9 --finetune-epochs 5 --lr 0.05 --eval-every-epoch --json)
run() { local f=$O/$1.json; shift; [ -f "$f" ] || { "$L" prune "$@" > "$f.tmp" && mv "$f.tmp" "$f"; }; }
run stamp $REF --method stamp --generator $GEN --keep-macs 0.5 "${t[@]}"
run scratch resnet20 --method l1 --remove-channels 0 "${t[@]}"
run l1 $REF --method l1 --keep-macs 0.5 "${t[@]}"
run random $REF --method random --keep-macs 0.5 "${t[@]}"
run random-widths $REF --method stamp --generator $GEN --stamp-random --keep-macs 0.5 "${t[@]}"
