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
# udevadm: the stock-kernel guest names its NIC as a distro does (enp0sN).
command -v udevadm >/dev/null || need_apt+=(udev)
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

# Checked tier: the same suites built with overflow checks and debug
# assertions ([profile.checked] in Cargo.toml), so that arithmetic on guest
# values that overflows fails a test instead of wrapping. The tests find
# this profile's keel, keelctl and probe guest next to their own binaries
# (tests/support: target/checked/), not the release ones.
echo "== cargo test --profile checked --workspace --no-fail-fast (overflow checks on)"
set +e
cargo build --profile checked --workspace 2>&1 | tee -a "$log" &&
    cargo test --profile checked --workspace --no-fail-fast -- --skip linux_lab_ 2>&1 | tee -a "$log"
checked_rc=${PIPESTATUS[0]}
set -e
end_tier "checked tests"

# Lints: clippy on every target, warnings are errors.
echo "== cargo clippy --release --workspace --all-targets -- -D warnings"
set +e
cargo clippy --release --workspace --all-targets -- -D warnings
clippy_rc=$?
# The fuzz crate is outside the workspace (cargo-fuzz's layout) but is
# linted the same way; on the stable toolchain, nothing of it is run here.
echo "== (cd fuzz && cargo clippy --release --all-targets -- -D warnings)"
(cd fuzz && cargo clippy --release --all-targets --target-dir ../target/fuzz-clippy -- -D warnings) || clippy_rc=1
set -e
end_tier "clippy"

# Fuzzing (fuzz/, see the README's "Fuzzing"): every cargo-fuzz target for
# FUZZ_SECONDS (30) from a scratch copy of its seed corpus (the committed
# seeds stay as they are). Needs the nightly toolchain; without it, says
# loudly that it did not run. A crash fails the run; its input is kept in
# fuzz/artifacts/<target>/.
fuzz_rc=0
fuzz_failed=()
# Built targets are kept outside the checkout, so a fresh clone on the same
# machine rebuilds only what changed.
fuzz_target=${KEEL_FUZZ_TARGET:-/var/cache/keel/fuzz-target}
if cargo +nightly --version >/dev/null 2>&1; then
    cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz ||
        fuzz_failed+=("(cargo install cargo-fuzz)")
    echo "== fuzzing: cargo +nightly fuzz build -O, then each target ${FUZZ_SECONDS:-30}s"
    scratch=$(mktemp -d /tmp/keel-fuzz.XXXXXX)
    trap 'rm -f "$log"; rm -rf "$scratch"' EXIT
    if ((${#fuzz_failed[@]})); then
        :
    elif (cd fuzz && cargo +nightly fuzz build -O --target-dir "$fuzz_target"); then
        for t in $(cd fuzz && cargo +nightly fuzz list); do
            mkdir -p "$scratch/$t"
            cp fuzz/corpus/"$t"/* "$scratch/$t/"
            echo "-- fuzz target $t"
            flog="$scratch/$t.log"
            if (cd fuzz && cargo +nightly fuzz run -O --target-dir "$fuzz_target" "$t" "$scratch/$t" -- \
                -max_total_time="${FUZZ_SECONDS:-30}" -timeout=20 -print_final_stats=1) >"$flog" 2>&1; then
                grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units)' "$flog" | sed 's/^/   /' || true
            else
                tail -n 80 "$flog"
                fuzz_failed+=("$t")
            fi
        done
    else
        fuzz_failed+=("(build)")
    fi
    if ((${#fuzz_failed[@]})); then
        fuzz_rc=1
        echo "fuzzing FAILED: ${fuzz_failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
    fi
    end_tier "fuzzing"
else
    echo "=================================================================="
    echo "Fuzzing: NOT RUN (no nightly toolchain: cargo +nightly is missing;"
    echo "install one with 'rustup toolchain install nightly' to run it)"
    echo "=================================================================="
fi

# The Linux guest tier: real Linux guests under Keel, inside an emulated
# machine with hardware virtualization (or directly where the host has
# vmx/svm). See tests/linux_guest.rs and the README's "Linux guests". On by
# default; KEEL_LAB=0 skips it, loudly. The first run on a machine builds the
# minimal guest kernel and downloads Debian's stock kernel and the lab's QEMU
# into /var/cache/keel.
linux_rc=0
if [ "${KEEL_LAB:-1}" != 0 ]; then
    echo "== Linux guest tier (cargo test --release -p keel-tests --test linux_guest)"
    set +e
    cargo test --release -p keel-tests --test linux_guest --no-fail-fast 2>&1 | tee -a "$log"
    linux_rc=${PIPESTATUS[0]}
    set -e
    end_tier "Linux guest tier"
else
    echo "=================================================================="
    echo "Linux guest tier: NOT RUN (KEEL_LAB=0 skipped it; it takes about"
    echo "10 min: see the README's \"Linux guests\")"
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
retries=$(grep -c ': RETRY: ' "$log" || true)
if [ "${retries:-0}" -gt 0 ]; then
    echo "  Linux guest tier: $retries spoilt scenario attempt(s) or L2 boot(s), run again:"
    grep ': RETRY: ' "$log" | sed 's/^/    /'
fi
echo
echo "== time per tier"
for t in "${tiers[@]}"; do echo "  $t"; done
printf '  %-28s %5ds\n' "total" "$SECONDS"

if [ "$clippy_rc" -ne 0 ]; then
    echo "FAILED: cargo clippy found problems (see its output above)" >&2
fi
if [ "$test_rc" -ne 0 ] || [ "$linux_rc" -ne 0 ] || [ "$checked_rc" -ne 0 ] || [ "$clippy_rc" -ne 0 ] || [ "$fuzz_rc" -ne 0 ]; then
    echo "FAILED: some tests failed or a fuzz target crashed (see above)" >&2
    exit 1
fi
