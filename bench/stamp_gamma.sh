#!/usr/bin/env bash
# STAMP γ sweep on setting 1 (issue 6; spec §5 says the KL weight must be tuned for the
# task size): meta-train the Fashion-MNIST generator with γ ∈ {1e-4, 1e-3, 1e-2}, then on
# MNIST prune (i) at the 1e-3 threshold alone (--remove-channels 0) (the compression STAMP chooses itself) and
# (ii) at ≤ 50 % MACs, each trained 3 epochs as in bench/stamp_fmnist_mnist.sh (which must
# have run first: it makes the reference net). Outputs runs/stamp/gamma-*/. Resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
L=${LOPPER:-target/release/lopper}
REF=runs/stamp/ref-fmnist.safetensors
t=(--data mnist --train-limit 10000 --finetune-epochs 3 --lr 0.05 --eval-every-epoch --json)
for g in ${GAMMAS:-1e-4 1e-3 1e-2}; do
  O=runs/stamp/gamma-$g
  mkdir -p $O
  [ -f $O/meta.json ] || { $L stamp meta-train $REF --data fashion-mnist --iterations 100 --gamma $g \
    -o $O/gen.safetensors --json > $O/meta.json.tmp && mv $O/meta.json.tmp $O/meta.json; }
  run() { local f=$O/$1.json; shift; [ -f "$f" ] || { "$L" prune "$@" > "$f.tmp" && mv "$f.tmp" "$f"; }; }
  run threshold $REF --method stamp --generator $O/gen.safetensors --remove-channels 0 "${t[@]}"
  run macs50 $REF --method stamp --generator $O/gen.safetensors --keep-macs 0.5 "${t[@]}"
done
