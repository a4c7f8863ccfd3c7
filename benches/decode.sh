#!/usr/bin/env bash
# Decode tokens/s of burn-deepseek's `model::Batch` against transformers' `generate`: the
# same checkpoint (a random DeepseekV3ForCausalLM at the tiny model's shape, written by
# transformers), the same prompts, greedy, on this machine, one run. A benchmark, not a
# test: it makes its own Python environment (torch and transformers from PyPI, ~6 GB).
#
#   bash benches/decode.sh                 # batch 1, 8, 32; 64 tokens per sequence
#   BATCH=1,4 TOKENS=32 bash benches/decode.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/venv.sh
DIR="$TARGET/decode-bench-model"
ARGS=(--batch "${BATCH:-1,8,32}" --prompt "${PROMPT:-16}" --tokens "${TOKENS:-64}")
"$VENV/bin/python" benches/decode_transformers.py --write "$DIR"
cargo build --release --example decode_bench
"$TARGET/release/examples/decode_bench" --model "$DIR" "${ARGS[@]}" | tee "$TARGET/decode-bench-burn.txt"
"$VENV/bin/python" benches/decode_transformers.py --model "$DIR" "${ARGS[@]}" --burn "$TARGET/decode-bench-burn.txt"
