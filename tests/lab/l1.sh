#!/usr/bin/env bash
# Runs a scenario inside an emulated AMD machine with hardware virtualization.
#
# This project's machines have only a software KVM on which Linux cannot
# boot. QEMU's software emulation (TCG) emulates AMD's SVM with nested
# paging well enough for Debian's stock kernel to load kvm_amd and offer a
# working /dev/kvm: the "L1" machine this script boots. Everything in it
# comes from Debian packages (qemu-system-x86, busybox-static and the
# current linux-image-<abi>-amd64, unpacked, never installed) plus the files
# the caller names.
#
# usage: tests/lab/l1.sh SCENARIO.sh [FILE...]
#   SCENARIO.sh runs as L1's /scenario.sh once /dev/kvm is there; each FILE
#   (a binary: its libraries come along) is copied to the same path in L1.
#   L1's console goes to stdout. Exit status: the scenario's.
#
# Downloads and unpacked packages are cached in .cache/lab/ (keyed by the
# package's version), so a second run downloads nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cache="$root/.cache/lab"
mkdir -p "$cache"

scenario=${1:?usage: l1.sh SCENARIO.sh [FILE...]}
shift

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx insmod || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
if ((${#need[@]})); then
    echo "lab: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi

# The kernel: the package linux-image-amd64 depends on, unpacked once.
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$pkg" ] || { echo "lab: cannot resolve linux-image-amd64" >&2; exit 1; }
ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
kdir="$cache/$pkg-$ver"
if [ ! -f "$kdir/.done" ]; then
    echo "lab: fetching $pkg $ver" >&2
    rm -rf "$kdir" && mkdir -p "$kdir"
    (cd "$cache" && apt-get download -qq "$pkg=$ver" >&2)
    dpkg-deb -x "$cache/${pkg}_"*"_amd64.deb" "$kdir"
    rm -f "$cache/${pkg}_"*"_amd64.deb"
    touch "$kdir/.done"
fi
kver=${pkg#linux-image-}
vmlinuz="$kdir/boot/vmlinuz-$kver"
mods="$kdir/lib/modules/$kver/kernel"

work=$(mktemp -d /tmp/keel-lab.XXXXXX)
trap 'rm -rf "$work"' EXIT
ir="$work/root"
mkdir -p "$ir"/{bin,sbin,proc,sys,dev,tmp,run,modules,etc}
cp /bin/busybox "$ir/bin/busybox"
for m in virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko drivers/crypto/ccp/ccp.ko arch/x86/kvm/kvm-amd.ko; do
    src="$mods/$m"
    [ -f "$src" ] || src="$src.xz"
    case "$src" in
        *.xz) xz -dc "$src" > "$ir/modules/$(basename "$m")" ;;
        *) cp "$src" "$ir/modules/" ;;
    esac
done
copy_with_libs() {
    local f=$1
    mkdir -p "$ir$(dirname "$f")"
    cp -L "$f" "$ir$f"
    ldd "$f" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
        mkdir -p "$ir$(dirname "$lib")"
        cp -Ln "$lib" "$ir$lib"
    done
}
for f in "$@"; do copy_with_libs "$(realpath "$f")"; done
cp "$scenario" "$ir/scenario.sh"
cat > "$ir/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in irqbypass kvm ccp kvm-amd; do insmod /modules/$m.ko || echo "lab: insmod $m failed"; done
if [ -c /dev/kvm ]; then
    echo "lab: /dev/kvm ready"
    sh /scenario.sh
    echo "lab: scenario exit $?"
else
    echo "lab: no /dev/kvm in L1"
    echo "lab: scenario exit 99"
fi
poweroff -f
INIT
chmod +x "$ir/init" "$ir/scenario.sh"
(cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/l1.cpio.gz"

out="$work/console.log"
timeout 600 qemu-system-x86_64 -accel tcg -cpu EPYC,+svm,+npt -smp 2 -m 2048 \
    -nographic -no-reboot -nic none \
    -kernel "$vmlinuz" -initrd "$work/l1.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet" </dev/null | tee "$out"
rc=$(sed -n 's/^lab: scenario exit \([0-9]*\).*/\1/p' "$out" | tail -1)
exit "${rc:-98}"
