#!/usr/bin/env bash
# The dense ResNet-20 on CIFAR-10 (JPEG q75) that the pruning issues start from.
# Phase 1: 20 epochs, cosine from 0.1 (1 warm-up epoch); phase 2: a warm restart of 12
# epochs, cosine from 0.05; phase 3: a 30-epoch cosine from 0.05. All: Nesterov SGD 0.9,
# weight decay 5e-4, batch 128, pad-4 crop + flip. Resumable: rerun the script after an
# interruption. Results and wall time: BENCHMARKS.md. Outputs: runs/resnet20-cifar10-b
# (phase 2, the pruning experiments' start) and runs/resnet20-cifar10-c (phase 3).
set -euo pipefail
cd "$(dirname "$0")/.."
L=target/release/lopper
cargo build --release
mkdir -p runs
if [ ! -f runs/resnet20-cifar10.safetensors ]; then
  resume=""; [ -f runs/resnet20-cifar10.ckpt ] && resume="--resume"
  $L train resnet20 --data cifar10 --epochs 20 --batch-size 128 --lr 0.1 --weight-decay 5e-4 \
    --warmup-epochs 1 --seed 0 --checkpoint runs/resnet20-cifar10.ckpt $resume \
    -o runs/resnet20-cifar10.safetensors
fi
if [ ! -f runs/resnet20-cifar10-b.safetensors ]; then
  resume=""; [ -f runs/resnet20-cifar10-b.ckpt ] && resume="--resume"
  $L train runs/resnet20-cifar10.safetensors --data cifar10 --epochs 12 --batch-size 128 --lr 0.05 \
    --weight-decay 5e-4 --seed 1 --checkpoint runs/resnet20-cifar10-b.ckpt $resume \
    -o runs/resnet20-cifar10-b.safetensors
fi
[ -f runs/resnet20-cifar10-c.safetensors ] && exit 0
resume=""; [ -f runs/resnet20-cifar10-c.ckpt ] && resume="--resume"
$L train runs/resnet20-cifar10-b.safetensors --data cifar10 --epochs 30 --batch-size 128 --lr 0.05 \
  --weight-decay 5e-4 --seed 2 --checkpoint runs/resnet20-cifar10-c.ckpt $resume \
  -o runs/resnet20-cifar10-c.safetensors
