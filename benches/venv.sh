# Sourced by the benchmarks that compare with transformers: sets VENV to a Python
# environment with the pinned torch and transformers, creating it when missing (~6 GB from
# PyPI; HF_VENV names an existing one), and TARGET to cargo's target directory.
VENV="${HF_VENV:-$HOME/.cache/burn-deepseek/hf-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, transformers" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.15.0 transformers==5.20.2
fi
TARGET="${CARGO_TARGET_DIR:-target}"
