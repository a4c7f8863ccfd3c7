#!/usr/bin/env bash
# Installs what the examples and tests need on a fresh Debian machine: a Vulkan driver for
# the wgpu backend (Mesa's lavapipe, Vulkan on the CPU, when no driver is present).
# Rust itself (>= 1.92) must already be installed.
set -euo pipefail

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust >= 1.92 (https://rustup.rs) and run again" >&2
    exit 1
fi

if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 || ! /sbin/ldconfig -p | grep -q libvulkan.so.1; then
    echo "== installing Mesa lavapipe (mesa-vulkan-drivers libvulkan1)"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
