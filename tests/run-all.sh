#!/usr/bin/env bash
# Installs what the tests need, builds everything, runs every test.
# This is the README's test command; .ci/run calls it. Runs as root (the
# tests use /dev/kvm, hugepages, taps and loop devices). Downloads and
# builds the Linux guest tier needs are cached in /var/cache/keel.
#
# Every suite runs even when an earlier one fails (--no-fail-fast); the end
# is one summary of all suites (passed, failed, ignored each), the time each
# tier took, and the exit status is non-zero if anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."

tiers=()
tier_start=$SECONDS
# Records the tier that just ended with its duration.
end_tier() {
    tiers+=("$(printf '%-28s %5ds' "$1" $((SECONDS - tier_start)))")
    tier_start=$SECONDS
}

need_apt=()
command -v cc >/dev/null || need_apt+=(gcc)
command -v losetup >/dev/null || need_apt+=(util-linux)
# The config disk test reads the image's label as udev does.
command -v blkid >/dev/null || need_apt+=(util-linux)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v ping >/dev/null || need_apt+=(iputils-ping)
command -v grub-script-check >/dev/null || need_apt+=(grub-common)
# iasl: a unit test disassembles the DSDT (vmm acpi::tests).
command -v iasl >/dev/null || need_apt+=(acpica-tools)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v script >/dev/null || need_apt+=(bsdutils)
command -v chattr >/dev/null || need_apt+=(e2fsprogs)
# GuestOS-shaped boot disks (tests/boot_slot.rs): GPT, FAT and ext4 images.
command -v sfdisk >/dev/null || need_apt+=(fdisk)
command -v mkfs.vfat >/dev/null || need_apt+=(dosfstools)
command -v mcopy >/dev/null || need_apt+=(mtools)
# The Linux guest tier: QEMU for the emulated L1 machine, busybox, socat
# (AF_VSOCK and TCP in the scenarios), kmod and cpio to assemble L1.
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
command -v socat >/dev/null || need_apt+=(socat)
command -v modinfo >/dev/null || need_apt+=(kmod)
command -v cpio >/dev/null || need_apt+=(cpio)
# The lab's upgrade scenario: a test CA and an update-img.tar.zst.
command -v openssl >/dev/null || need_apt+=(openssl)
command -v zstd >/dev/null || need_apt+=(zstd)
if ((${#need_apt[@]})); then
    echo "== installing: ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
end_tier "install packages"

if [ ! -w /dev/kvm ]; then
    echo "FATAL: /dev/kvm is missing or not writable: Keel's tests need KVM" >&2
    exit 1
fi

echo "== cargo build --release (keel, probe-guest, tools)"
cargo build --release --workspace
end_tier "build"

log=$(mktemp /tmp/keel-run-all.XXXXXX)
trap 'rm -f "$log"' EXIT

echo "== cargo test --release --workspace --no-fail-fast (all but the Linux lab)"
set +e
cargo test --release --workspace --no-fail-fast -- --skip linux_lab_ 2>&1 | tee "$log"
test_rc=${PIPESTATUS[0]}
set -e
end_tier "unit + integration tests"

# The Linux guest tier: real Linux guests under Keel, inside an emulated
# machine with hardware virtualization (or directly where the host has
# vmx/svm). See tests/linux_guest.rs and the README's "Linux guests". It is
# not yet reliable enough to gate every run: the blk scenario's 2-vCPU guest
# now and then dies early in boot (a triple fault) or hangs, unexplained so
# far. It runs with KEEL_LAB=1, and otherwise says loudly that it did not.
linux_rc=0
if [ "${KEEL_LAB:-0}" = 1 ]; then
    echo "== Linux guest tier (cargo test --release -p keel-tests --test linux_guest)"
    set +e
    cargo test --release -p keel-tests --test linux_guest --no-fail-fast 2>&1 | tee -a "$log"
    linux_rc=${PIPESTATUS[0]}
    set -e
    end_tier "Linux guest tier"
else
    echo "=================================================================="
    echo "Linux guest tier: NOT RUN (set KEEL_LAB=1 to run it: about 6 min;"
    echo "see the README's \"Linux guests\" for why it is not on by default)"
    echo "=================================================================="
fi

# One line per test binary: cargo prints "Running <path>" (or "Doc-tests
# <crate>") before each suite and "test result: ..." after it.
echo
echo "== summary of all suites"
awk '
    /^ *Running / { bin = $NF; gsub(/[()]/, "", bin); sub(/.*\//, "", bin); sub(/-[0-9a-f]+$/, "", bin)
                    name = ($2 == "unittests") ? bin " " $3 : bin " " $2 }
    /^ *Doc-tests / { name = "doc " $2 }
    /^test result:/ {
        p = f = i = 0
        for (k = 1; k <= NF; k++) {
            if ($(k) ~ /^passed;?$/) p = $(k - 1)
            if ($(k) ~ /^failed;?$/) f = $(k - 1)
            if ($(k) ~ /^ignored;?$/) i = $(k - 1)
        }
        printf "  %-40s %5d passed %5d failed %5d ignored%s\n", name, p, f, i, (f > 0 ? "   <== FAILED" : "")
        tp += p; tf += f; ti += i; n++
    }
    /^error: test failed, to rerun pass/ { bad = bad "\n  " $0 }
    END {
        printf "  %d suites\n", n
        if (bad != "") print "  suites that failed:" bad
        printf "total: %d passed, %d failed, %d skipped\n", tp, tf, ti
    }
' "$log"
echo
echo "== time per tier"
for t in "${tiers[@]}"; do echo "  $t"; done
printf '  %-28s %5ds\n' "total" "$SECONDS"

if [ "$test_rc" -ne 0 ] || [ "$linux_rc" -ne 0 ]; then
    echo "FAILED: some tests failed (see the summary above)" >&2
    exit 1
fi
