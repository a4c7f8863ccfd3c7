#!/usr/bin/env bash
# The test command of the README: installs what the tests need, checks that the CUDA
# build compiles, and runs every test of the workspace. The kernel tests run on the wgpu
# runtime; on a machine without a GPU that is Mesa's lavapipe (Vulkan on the CPU), which
# this script installs when no Vulkan driver is present. Without an adapter they fail.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust >= 1.92 (https://rustup.rs) and run again" >&2
    exit 1
fi

# A Vulkan driver: the loader plus at least one ICD (lavapipe on CPU-only machines).
if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 || ! ldconfig -p | grep -q libvulkan.so.1; then
    echo "== installing Mesa lavapipe (mesa-vulkan-drivers libvulkan1)"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

echo "== cargo build --workspace --all-targets --features cuda (compile check; runs only on NVIDIA)"
cargo build --workspace --all-targets --features cuda

echo "== cargo test --workspace --features cuda (same build; the CUDA runtime is only used on NVIDIA)"
cargo test --workspace --features cuda --no-fail-fast -- --test-threads=2
