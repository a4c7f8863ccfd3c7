#!/usr/bin/env bash
# NVRTC and the CUDA headers for the CUDA compile check (tests/cuda), without a CUDA
# toolkit or a driver: NVIDIA's PyPI wheels (nvidia-cuda-nvrtc-cu12, nvidia-cuda-runtime-cu12),
# checked against their SHA-256 and unpacked once into the cache. Source it: it exports
# LD_LIBRARY_PATH (libnvrtc.so.12) and NVRTC_INCLUDE_PATH (cuda_runtime.h, cuda_fp8.h, ...).
#
#   source tests/nvrtc.sh && cargo test --features cuda --test cuda
NVRTC_HOME="${BURN_DEEPSEEK_CACHE:-$HOME/.cache/burn-deepseek}/nvrtc-12.9"
if [ ! -f "$NVRTC_HOME/ready" ]; then
    if ! command -v curl >/dev/null || ! command -v unzip >/dev/null; then
        echo "== installing curl and unzip (to fetch NVRTC's wheel)"
        SUDO=""
        if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq curl unzip ca-certificates >/dev/null
    fi
    echo "== fetching NVRTC 12.9 and the CUDA 12.9 headers (NVIDIA's PyPI wheels) into $NVRTC_HOME"
    rm -rf "$NVRTC_HOME" && mkdir -p "$NVRTC_HOME"
    fetch() { # url sha256 member-pattern...
        local url="$1" sha="$2" whl="$NVRTC_HOME/wheel.zip"
        shift 2
        curl -fsSL --retry 3 -o "$whl" "$url" || return 1
        echo "$sha  $whl" | sha256sum -c --quiet - || return 1
        unzip -q -o "$whl" "$@" -d "$NVRTC_HOME" || return 1
        rm -f "$whl"
    }
    # Sourced: a failure returns to the caller (tests/run.sh stops on it) instead of exiting.
    fetch "https://files.pythonhosted.org/packages/b8/85/e4af82cc9202023862090bfca4ea827d533329e925c758f0cde964cb54b7/nvidia_cuda_nvrtc_cu12-12.9.86-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl" \
        210cf05005a447e29214e9ce50851e83fc5f4358df8b453155d5e1918094dcb4 \
        'nvidia/cuda_nvrtc/lib/libnvrtc.so.12' 'nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.12.9' || return 1
    fetch "https://files.pythonhosted.org/packages/bc/46/a92db19b8309581092a3add7e6fceb4c301a3fd233969856a8cbf042cd3c/nvidia_cuda_runtime_cu12-12.9.79-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl" \
        25bba2dfb01d48a9b59ca474a1ac43c6ebf7011f1b0b8cc44f54eb6ac48a96c3 \
        'nvidia/cuda_runtime/include/*' || return 1
    touch "$NVRTC_HOME/ready"
fi
export LD_LIBRARY_PATH="$NVRTC_HOME/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NVRTC_INCLUDE_PATH="$NVRTC_HOME/nvidia/cuda_runtime/include"
