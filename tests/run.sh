#!/usr/bin/env bash
# The test command of the README: installs what the tests need, checks that everything
# compiles with the CUDA backend (and every kernel to CUDA PTX with NVRTC), and runs every
# test of the workspace. The kernel tests run
# on the wgpu runtime; on a machine without a GPU that is Mesa's lavapipe (Vulkan on the
# CPU), which this script installs when no Vulkan driver is present. Without an adapter they
# fail.
set -euo pipefail
cd "$(dirname "$0")/.."

bash examples/setup.sh
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

# The MPI engine's tests start ranks as processes with OpenMPI's mpirun; building rsmpi
# needs the MPI headers (mpicc) and libclang (bindgen).
if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null || ! /sbin/ldconfig -p | grep -q libclang; then
    echo "== installing OpenMPI and libclang (libopenmpi-dev openmpi-bin libclang-dev)"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev >/dev/null
fi

# The examples are type-checked, not built: building eight examples for three backends is
# most of a cold build, and they are run in release (README) rather than here.
# One feature set for every step, so that each crate builds once: CUDA (compiled, runs
# only on NVIDIA), MPI (its tests run ranks as processes under mpirun on this machine) and
# Burn's Learner (burn-train).
FEATURES="cuda,mpi,nccl,learner"

# rustfmt and clippy come with rustup's default profile; a minimal one lacks them.
for tool in fmt clippy; do
    if ! cargo "$tool" --version >/dev/null 2>&1; then
        echo "cargo $tool not found: rustup component add rustfmt clippy" >&2
        exit 1
    fi
done

echo "== cargo fmt --all --check (rustfmt.toml)"
cargo fmt --all -- --check

echo "== cargo check --workspace --all-targets --features $FEATURES (every target compiles)"
cargo check --workspace --all-targets --features "$FEATURES"

echo "== cargo clippy --workspace --all-targets --features $FEATURES -D warnings"
cargo clippy --workspace --all-targets --features "$FEATURES" -- -D warnings

# The kernel suites as tests/gpu.sh builds them for an NVIDIA machine (on CUDA instead of
# wgpu): type-checked here, run there.
echo "== cargo clippy --tests --features $FEATURES,test-cuda -D warnings (the suites on CUDA)"
cargo clippy --tests --features "$FEATURES,test-cuda" -- -D warnings

# The CUDA compile check (tests/cuda) compiles every kernel for sm_80/89/90 with NVRTC, which
# comes from NVIDIA's PyPI wheels (no CUDA toolkit, no driver).
source tests/nvrtc.sh

echo "== cargo test --workspace --features $FEATURES --lib --tests (unit and integration tests)"
cargo test --workspace --features "$FEATURES" --lib --tests --no-fail-fast -- --test-threads=2

echo "== cargo test --workspace --features $FEATURES --doc (crate docs and the docs/ chapters)"
cargo test --workspace --features "$FEATURES" --doc --no-fail-fast

echo "== cargo doc --workspace --no-deps --features $FEATURES (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --features "$FEATURES"
