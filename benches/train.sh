#!/usr/bin/env bash
# Training tokens/s of train_tiny (Burn's Flex CPU backend, MTP off) against the same model
# in transformers (DeepseekV3ForCausalLM, eager PyTorch, AdamW), same batch, same text, on
# this machine, one run, and the ratio. A benchmark, not a test: it makes its own Python
# environment (torch and transformers from PyPI, ~6 GB) unless HF_VENV names one.
#
#   bash benches/train.sh                    # 60 steps of batch 8 x 64
#   STEPS=200 BACKEND=ndarray bash benches/train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/venv.sh
STEPS="${STEPS:-60}"
BATCH="${BATCH:-8}"
SEQ="${SEQ:-64}"
cargo build --release --example train_tiny
OUT="$TARGET/train-bench"
# No checkpoint or sample inside the timed steps: one save at the end, no sampling.
"$TARGET/release/examples/train_tiny" --backend "${BACKEND:-flex}" --mtp 0 --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" \
    --save-every "$STEPS" --sample 0 --out "$OUT" | tr '\r' '\n' | grep -v '^$' | tee "$TARGET/train-bench-burn.txt" | tail -n 4
"$VENV/bin/python" benches/train_transformers.py --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" --burn "$TARGET/train-bench-burn.txt"
