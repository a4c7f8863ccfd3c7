#!/usr/bin/env bash
# The test command of the README: installs what the tests need, checks that everything
# compiles with the CUDA backend, and runs every test of the workspace. The kernel tests run
# on the wgpu runtime; on a machine without a GPU that is Mesa's lavapipe (Vulkan on the
# CPU), which this script installs when no Vulkan driver is present. Without an adapter they
# fail.
set -euo pipefail
cd "$(dirname "$0")/.."

bash examples/setup.sh
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

# The examples are type-checked, not built: building eight examples for three backends is
# most of a cold build, and they are run in release (README) rather than here.
echo "== cargo check --workspace --all-targets --features cuda (every target compiles; CUDA runs only on NVIDIA)"
cargo check --workspace --all-targets --features cuda

echo "== cargo test --workspace --features cuda --lib --tests (unit and integration tests)"
cargo test --workspace --features cuda --lib --tests --no-fail-fast -- --test-threads=2

echo "== cargo test --workspace --features cuda --doc (crate docs and the docs/ chapters)"
cargo test --workspace --features cuda --doc --no-fail-fast

echo "== cargo doc --workspace --no-deps (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
