#!/usr/bin/env bash
# Installs what the tests need, builds everything, runs every test.
# This is the README's test command; .ci/run calls it. Runs as root (the
# tests use /dev/kvm, hugepages, and later taps and loop devices).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null || need_apt+=(gcc)
command -v losetup >/dev/null || need_apt+=(util-linux)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v ping >/dev/null || need_apt+=(iputils-ping)
command -v grub-script-check >/dev/null || need_apt+=(grub-common)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
if ((${#need_apt[@]})); then
    echo "== installing: ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

if [ ! -w /dev/kvm ]; then
    echo "FATAL: /dev/kvm is missing or not writable: Keel's tests need KVM" >&2
    exit 1
fi

echo "== cargo build --release (keel, probe-guest, tools)"
cargo build --release --workspace

echo "== cargo test --release --workspace"
cargo test --release --workspace

# The Linux guest tier needs hardware virtualization: on a software-only
# KVM it cannot boot (see resources/linux-guest/README.md). It is marked
# #[ignore] so that it shows up as ignored, never as passed.
if grep -qwE 'vmx|svm' /proc/cpuinfo; then
    echo "== Linux guest tier (hardware virtualization present)"
    cargo test --release -p keel-tests --test linux_guest -- --ignored
else
    echo "=================================================================="
    echo "Linux guest tier: not run: no hardware virtualization"
    echo "(no vmx/svm in /proc/cpuinfo; counted as ignored, not as passed)"
    echo "=================================================================="
fi
