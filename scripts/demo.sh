#!/usr/bin/env bash
# The main job on a fresh machine, with no download: build medmine, train a U-Net++ on the
# 18 labelled demo X-rays (assets/demo), predict the 6 validation images at their original size
# and evaluate them against the ground truth.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
BIN=./target/release/medmine
RUN=${RUN:-runs/demo}
$BIN train --data assets/demo --train-list assets/demo/train.txt --val-list assets/demo/val.txt \
  --size 64 --base 8 --epochs 25 --batch 6 --lr 3e-3 --force --out "$RUN"
$BIN predict --checkpoint "$RUN/best.safetensors" --images assets/demo --list assets/demo/val.txt \
  --out "$RUN/pred" --probs "$RUN/probs"
$BIN evaluate --pred "$RUN/pred" --gt assets/demo/masks --list assets/demo/val.txt --json "$RUN/eval.json"
