#!/usr/bin/env bash
# The test command of the README: installs what the tests need, checks that the CUDA
# build compiles, and runs every test of the workspace. The kernel tests run on the wgpu
# runtime; on a machine without a GPU that is Mesa's lavapipe (Vulkan on the CPU), which
# this script installs when no Vulkan driver is present. Without an adapter they fail.
set -euo pipefail
cd "$(dirname "$0")/.."

bash examples/setup.sh
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

echo "== cargo build --workspace --all-targets --features cuda (compile check; runs only on NVIDIA)"
cargo build --workspace --all-targets --features cuda

echo "== cargo test --workspace --features cuda (same build; the CUDA runtime is only used on NVIDIA)"
cargo test --workspace --features cuda --no-fail-fast -- --test-threads=2
