#!/usr/bin/env bash
# The GPU check: proves and times the CUDA path on an NVIDIA machine in minutes, from
# binaries built on a machine without a GPU, so that the GPU machine builds nothing.
#
#   bash tests/gpu.sh build   # here: release binaries and the CUDA headers, xz-compressed
#                             # into target/gpu-check/ (at most 64 MiB together)
#   bash tests/gpu.sh run     # there, from the repository root with target/gpu-check/:
#                             # writes target/gpu-check/results.md
#
# With the workplace's `device` tool: `run` with carry ["target/gpu-check"] and the command
# `bash tests/gpu.sh run; cp target/gpu-check/results.md $OUT/`.
#
# `run` runs, on CUDA: the FP8 and MoE kernel suites (tests/fp8, tests/moe built with the
# `test-cuda` feature: every kernel against its reference, the software FP8 codec against
# CUDA's native conversion on all 256 codes and random f32, native and software decode),
# then the benchmarks: the FP8 GEMM at DeepSeek-V3's shapes against Burn's f32 matmul on the
# same GPU (fp8_gemm) and PyTorch's bf16 matmul (cuBLAS, benches/torch_matmul.py), the MoE layer and its grouped GEMM (moe_layer, config v3), the MLA
# decode kernel's GB/s (batch 64, 128 heads, 4096 cached tokens) and train_tiny on CUDA.
# Every step has a time limit (480 s together: the check fits 8 minutes of a GPU); a failing step is recorded and the others still run; the
# exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${GPU_CHECK_DIR:-target/gpu-check}"
LIMIT_BYTES=$((64 * 1024 * 1024))
EXAMPLES="fp8_gemm moe_layer mla_decode train_tiny"
SUITES="fp8 moe"

build() {
    set -e
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/burn-deepseek/target}"
    source tests/nvrtc.sh
    rm -rf "$OUT" && mkdir -p "$OUT/bin"
    echo "== building the kernel suites for CUDA (release, feature test-cuda)"
    local log="$OUT/build-tests.log"
    cargo test --release --no-run --features cuda,test-cuda $(printf -- '--test %s ' $SUITES) 2>&1 | tee "$log" | grep -E "^error" || true
    for suite in $SUITES; do
        local exe
        exe=$(sed -n "s|.*Executable tests/$suite/main.rs (\(.*\))|\1|p" "$log" | tail -1)
        [ -x "$exe" ] || { echo "no test binary for $suite (see $log)" >&2; exit 1; }
        cp "$exe" "$OUT/bin/$suite"
    done
    echo "== building the benchmarks for CUDA (release): $EXAMPLES"
    # The suites' features, so that the library is built once for both.
    cargo build --release --features cuda,test-cuda $(printf -- '--example %s ' $EXAMPLES)
    for example in $EXAMPLES; do
        cp "$CARGO_TARGET_DIR/release/examples/$example" "$OUT/bin/$example"
    done
    strip "$OUT"/bin/*
    # The CUDA headers the kernels include (CubeCL compiles them with NVRTC at run time),
    # for a machine whose toolkit is elsewhere than CUDA_PATH or /usr/local/cuda. NVRTC
    # itself (106 MB) is not carried: the GPU machine's toolkit has it.
    mkdir -p "$OUT/cuda"
    cp -r "$NVRTC_HOME/nvidia/cuda_runtime/include" "$OUT/cuda/include"
    cp benches/torch_matmul.py "$OUT/bin/"
    echo "== compressing"
    tar -C "$OUT" -cf - bin cuda | xz -T0 -6 > "$OUT/gpu-check.tar.xz"
    rm -rf "$OUT/bin" "$OUT/cuda"
    local size
    size=$(stat -c %s "$OUT/gpu-check.tar.xz")
    echo "$OUT/gpu-check.tar.xz: $((size / 1024 / 1024)) MiB (limit 64 MiB)"
    [ "$size" -le "$LIMIT_BYTES" ] || { echo "above 64 MiB: the GPU machine takes at most 64 MiB" >&2; exit 1; }
}

# Whether the loader finds libnvrtc (ldconfig's cache or LD_LIBRARY_PATH).
have_nvrtc() {
    ldconfig -p 2>/dev/null | grep -q libnvrtc && return 0
    local IFS=: dir
    for dir in ${LD_LIBRARY_PATH:-}; do
        ls "$dir"/libnvrtc.so* >/dev/null 2>&1 && return 0
    done
    return 1
}

run() {
    [ -f "$OUT/gpu-check.tar.xz" ] || { echo "$OUT/gpu-check.tar.xz not found: run 'bash tests/gpu.sh build' on a build machine first" >&2; exit 1; }
    command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this is not an NVIDIA machine" >&2; exit 1; }
    local work="$OUT/run"
    rm -rf "$work" && mkdir -p "$work"
    xz -dc "$OUT/gpu-check.tar.xz" | tar -C "$work" -xf -
    # NVRTC from the machine's toolkit; the carried headers only where none are installed.
    for lib in "${CUDA_PATH:-/usr/local/cuda}/lib64" /usr/local/cuda/lib64; do
        [ -d "$lib" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$lib"
    done
    if ! have_nvrtc; then
        echo "libnvrtc not found: CubeCL compiles its CUDA kernels with NVRTC; install the CUDA toolkit or add its lib64 to LD_LIBRARY_PATH" >&2
        exit 1
    fi
    if [ -z "${CUDA_PATH:-}" ] && [ ! -d /usr/local/cuda/include ]; then export CUDA_PATH="$work/cuda"; fi
    local results="$OUT/results.md" failed=0
    {
        echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
        echo
        echo '```'
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        echo '```'
    } > "$results"
    step() { # name limit_s command...
        local name="$1" limit="$2"
        shift 2
        echo "== $name"
        local start=$SECONDS
        { echo; echo "## $name"; echo; echo '```'; echo "\$ $*"; } >> "$results"
        timeout "$limit" "$@" 2>&1 | tee -a "$work/$name.log" | grep -vE "^\s+(at |[0-9]+: )" >> "$results"
        local rc=${PIPESTATUS[0]}
        echo '```' >> "$results"
        echo "exit $rc in $((SECONDS - start)) s" >> "$results"
        [ "$rc" -eq 0 ] || failed=$((failed + 1))
    }
    local bin="$work/bin"
    step "FP8 kernel suite on CUDA" 120 "$bin/fp8" --test-threads=1
    step "MoE and MLA kernel suite on CUDA" 150 "$bin/moe" --test-threads=1
    step "FP8 GEMM: DeepSeek-V3 shapes against Burn's f32 matmul" 45 "$bin/fp8_gemm" --backend cuda --shapes 4096x7168x16384,128x7168x16384 --min-time-ms 500
    step "PyTorch bf16 matmul (cuBLAS) at the same shapes" 30 python3 "$bin/torch_matmul.py" 4096x7168x16384 128x7168x16384
    step "MoE layer and grouped GEMM (config v3)" 60 "$bin/moe_layer" --backend cuda --config v3 --tokens 4096 --min-time-ms 500
    step "MLA decode (batch 64, 128 heads, 4096 cached tokens)" 45 "$bin/mla_decode" --backend cuda --config v3 --batch 64 --contexts 4096 --min-time-ms 500
    step "train_tiny on CUDA" 45 "$bin/train_tiny" --backend cuda --steps 100
    echo "$failed failed step(s); results in $results"
    return "$failed"
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    *)
        echo "usage: bash tests/gpu.sh build|run (see the header of tests/gpu.sh)" >&2
        exit 2
        ;;
esac
