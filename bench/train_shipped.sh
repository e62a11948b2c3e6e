#!/usr/bin/env bash
# Trains the dense models shipped in models/ (the recipes' and the README's starting points)
# and records their provenance in models/models.toml: the exact command, seed, wall time,
# CPU, date, the test accuracy as `lopper eval` measures it (correct / total on the full
# test split) and the file's SHA-1. tests/shipped_models.rs checks every entry (checksum,
# accuracy to the sample). Resumable: a model already in models/ is kept.
#   bench/train_shipped.sh                # all
#   ONLY="lenet5-mnist mlp-mnist" bench/train_shipped.sh
set -euo pipefail
cd "$(dirname "$0")/.."
L=${LOPPER:-target/release/lopper}
M=models
CPU=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
mkdir -p $M runs/shipped
declare -A CMD DATA CLASSES
CMD[lenet5-mnist]="train lenet5 --data mnist --epochs 3 --lr 0.05 --batch-size 64 --seed 0"
DATA[lenet5-mnist]=mnist
CMD[mlp-mnist]="train mlp:784-512-256-10 --data mnist --epochs 3 --lr 0.05 --batch-size 64 --seed 0"
DATA[mlp-mnist]=mnist
CMD[stamp-ref-fmnist]="train resnet8@1x28x28 --data fashion-mnist --epochs 3 --lr 0.05 --batch-size 128 --seed 0"
DATA[stamp-ref-fmnist]=fashion-mnist
# One 40-epoch cosine from 0.1 (1 warm-up epoch), Nesterov SGD, batch 128, pad-4 crop + flip.
CMD[resnet20-cifar10]="train resnet20 --data cifar10 --epochs 40 --batch-size 128 --lr 0.1 --weight-decay 5e-4 --warmup-epochs 1 --seed 0 --checkpoint runs/shipped/resnet20-cifar10.ckpt"
DATA[resnet20-cifar10]=cifar10
# STAMP setting 2's reference net (BENCHMARKS §10): ResNet-20 on CIFAR-10 classes 0-5.
CMD[stamp-ref-cifar6]="train resnet20 --data cifar10 --classes 0,1,2,3,4,5 --epochs 10 --lr 0.1 --warmup-epochs 1 --batch-size 128 --seed 0 --checkpoint runs/shipped/stamp-ref-cifar6.ckpt"
DATA[stamp-ref-cifar6]=cifar10
CLASSES[stamp-ref-cifar6]=0,1,2,3,4,5
# The small ViT of issue 20 (zoo `vit`: dim 128, 6 blocks of 4 heads, patch 4, FFN x2):
# AdamW, cosine from 1e-3 after 2 warm-up epochs, weight decay 0.05, label smoothing 0.1,
# pad-4 crop + flip. ~130 s per epoch on 2 cores.
CMD[vit-cifar10]="train vit --data cifar10 --epochs 40 --batch-size 128 --optimizer adamw --lr 1e-3 --weight-decay 0.05 --warmup-epochs 2 --label-smoothing 0.1 --seed 0 --checkpoint runs/shipped/vit-cifar10.ckpt"
DATA[vit-cifar10]=cifar10
ORDER="lenet5-mnist mlp-mnist stamp-ref-fmnist resnet20-cifar10 stamp-ref-cifar6 vit-cifar10"
for name in ${ONLY:-$ORDER}; do
  out=$M/$name.safetensors
  if [ ! -f "$out" ]; then
    resume=""
    [[ "${CMD[$name]}" == *--checkpoint* && -f runs/shipped/$name.ckpt ]] && resume="--resume"
    t0=$(date +%s)
    $L ${CMD[$name]} $resume -o "$out.tmp.safetensors"
    mv "$out.tmp.safetensors" "$out"
    echo "$(( $(date +%s) - t0 ))" > runs/shipped/$name.seconds
    # A resumed run: the wall time is the sum of every epoch's, from the checkpoint's history.
    if [ -n "$resume" ]; then
      python3 - "runs/shipped/$name.ckpt" > runs/shipped/$name.seconds <<'PY'
import json, struct, sys
f = open(sys.argv[1], "rb")
meta = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))["__metadata__"]
print(round(sum(e["seconds"] for e in json.loads(meta["lopper.history"]))))
PY
    fi
  fi
  cls=()
  [ -n "${CLASSES[$name]:-}" ] && cls=(--classes "${CLASSES[$name]}")
  ev=$($L eval "$out" --data "${DATA[$name]}" "${cls[@]}" --json --quiet)
  correct=$(echo "$ev" | jq .result.correct); n=$(echo "$ev" | jq .result.n)
  secs=$(cat runs/shipped/$name.seconds 2>/dev/null || echo null)
  cmd="lopper ${CMD[$name]} -o $out"
  cmd=${cmd/ --checkpoint runs\/shipped\/$name.ckpt/}
  entry="[[model]]
name = \"$name\"
file = \"$name.safetensors\"
sha1 = \"$(sha1sum "$out" | cut -d' ' -f1)\"
data = \"${DATA[$name]}\"${CLASSES[$name]:+
classes = \"${CLASSES[$name]}\"}
correct = $correct
total = $n
command = \"$cmd\"
seconds = $secs
cpu = \"$CPU\"
date = \"$(date -u +%Y-%m-%d)\"
"
  # Replace this model's entry in the manifest (entries are separated by blank lines).
  touch $M/models.toml
  python3 - "$M/models.toml" "$name" "$entry" <<'PY'
import sys
path, name, entry = sys.argv[1:]
blocks = [b.strip() for b in open(path).read().split("\n\n") if b.strip()]
keep = [b for b in blocks if f'name = "{name}"' not in b]
header = [b for b in keep if not b.lstrip().startswith("[[model]]")]
models = [b for b in keep if b.lstrip().startswith("[[model]]")] + [entry.strip()]
open(path, "w").write("\n\n".join(header + models) + "\n")
PY
  echo "$name: $correct/$n"
done
