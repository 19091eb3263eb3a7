#!/usr/bin/env bash
# Runs a lab scenario inside an emulated AMD machine with hardware
# virtualization ("L1"), or directly on a host that has vmx/svm.
#
# This project's machines have only a software KVM, on which Linux cannot
# boot. QEMU's software emulation (TCG) emulates AMD's SVM with nested paging
# well enough for Debian's stock kernel to load kvm_amd and offer a working
# /dev/kvm: L1. Keel runs there and boots real Linux guests (L2).
# Everything in L1 comes from Debian packages (qemu-system-x86,
# busybox-static, the current linux-image-<abi>-amd64, unpacked and never
# installed) plus the files the caller names.
#
# usage: tests/lab/l1.sh SCENARIO.sh
#   Every environment variable LAB_<NAME>=<path> names a file the scenario
#   needs: it is copied into L1 below /lab/files (an ELF binary with the
#   libraries ldd lists) and LAB_<NAME> names the copy there. SCENARIO.sh runs as root once /dev/kvm, tun, bridge
#   and loop are there, with tests/lab/lib.sh as $LAB_LIB. L1's console goes to
#   stdout. Exit status: the scenario's (98 when L1 never said, 99 when L1 had
#   no /dev/kvm).
#
#   LAB_MODE=direct runs SCENARIO.sh here instead (for hosts with vmx/svm).
#   `l1.sh --print-kernel` prints the path of the Debian kernel (fetched
#   into the cache if needed): the scenarios boot it as a guest too.
#   `l1.sh --stock-initrd BASE OUT` writes BASE plus that kernel's virtio
#   modules to OUT: the initramfs the scenarios give it.
#   LAB_TIMEOUT (seconds, default 900) bounds the whole L1 run.
#   LAB_L1_SILENCE (seconds, default 90): L1 is stopped as wedged when its
#   heartbeat has been silent that long.
#   LAB_L1_CPUS (default 2): L1's vCPUs.
#   LAB_TCG_THREAD (multi or single, default multi): QEMU's TCG threading.
#   LAB_L0_MONITOR: a Unix socket path for QEMU's monitor of L1 (diagnostics).
#   LAB_L0_QEMU=system: emulate L1 with the host's QEMU even when it is older
#   than 10 (by default an older one is replaced by the backports QEMU).
#
# Downloads and unpacked packages are cached in $KEEL_LAB_CACHE (default
# /var/cache/keel/lab, outside the checkout so a fresh clone on the same
# machine reuses them), keyed by the package's version.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
arg=${1:?usage: l1.sh SCENARIO.sh | --print-kernel}
export LAB_LIB="$here/lib.sh"

if [ "$arg" != --print-kernel ] && [ "${LAB_MODE:-l1}" = direct ]; then
    exec bash "$(realpath "$arg")"
fi

cache=${KEEL_LAB_CACHE:-/var/cache/keel/lab}
mkdir -p "$cache"
log() { echo "[lab] $*" >&2; }

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v modinfo >/dev/null || need+=(kmod)
command -v udevadm >/dev/null || need+=(udev)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi

# unpack_debs DEST WHAT APT-GET-ARGS...: unless DEST/.done says it was done,
# downloads what `apt-get APT-GET-ARGS` does (a `download`) and unpacks every
# package into DEST, never installed. Returns 1 when the download fails,
# leaving no download directory behind.
unpack_debs() {
    local dest=$1 what=$2 tmp d
    shift 2
    [ ! -f "$dest/.done" ] || return 0
    log "fetching $what"
    rm -rf "$dest" && mkdir -p "$dest"
    tmp=$(mktemp -d "$cache/dl.XXXXXX")
    chmod 755 "$tmp" # apt's download user writes there
    if ! (cd "$tmp" && apt-get "$@" >&2); then
        rm -rf "$tmp"
        return 1
    fi
    for d in "$tmp"/*.deb; do dpkg-deb -x "$d" "$dest"; done
    rm -rf "$tmp"
    touch "$dest/.done"
}

# L1's kernel: the package linux-image-amd64 depends on, unpacked once.
resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
pkg=$(resolve)
if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(resolve)
fi
[ -n "$pkg" ] || { log "cannot resolve linux-image-amd64"; exit 1; }
ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
kdir="$cache/$pkg-$ver"
(
    flock 9
    unpack_debs "$kdir" "$pkg $ver" download -qq "$pkg=$ver" || { log "cannot download $pkg $ver"; exit 1; }
) 9>"$cache/.lock"
kver=${pkg#linux-image-}
vmlinuz="$kdir/boot/vmlinuz-$kver"
moddir="$kdir/lib/modules/$kver"
# --print-kernel: the Debian kernel's path (downloaded if needed), for the
# scenarios that boot it as a guest too.
if [ "$arg" = --print-kernel ]; then
    echo "$vmlinuz"
    exit 0
fi
[ "$arg" = --stock-initrd ] || scenario=$(realpath "$arg")

work=$(mktemp -d /tmp/keel-lab.XXXXXX)
trap 'rm -rf "$work"' EXIT
ir="$work/root"
mkdir -p "$ir"/{bin,sbin,proc,sys,dev,tmp,run,lab/modules,etc,mnt}
cp /bin/busybox "$ir/bin/busybox"

# Modules with their dependencies (modinfo reads them from each .ko), in
# load order.
order=()
moddest="$ir/lab/modules"
add_module() {
    local name=$1 path dep
    for m in "${order[@]:-}"; do [ "$m" = "$name" ] && return 0; done
    path=$(find "$moddir/kernel" -name "$name.ko" -o -name "$name.ko.xz" | head -n1)
    [ -n "$path" ] || { log "module $name not in $pkg (built in?)"; return 0; }
    for dep in $(modinfo -F depends "$path" | tr ',' ' '); do add_module "$dep"; done
    case "$path" in
        *.xz) xz -dc "$path" > "$moddest/$name.ko" ;;
        *) cp "$path" "$moddest/$name.ko" ;;
    esac
    order+=("$name")
}
# --stock-initrd BASE OUT: BASE (the lab's guest initramfs) with the Debian
# kernel's virtio modules appended as a second archive (Linux unpacks
# concatenated archives in turn); the guest's /init loads /lab-modules/*.ko
# in the order of /lab-modules/order. Debian's kernel builds virtio as
# modules, so this is how its guest finds Keel's devices.
if [ "$arg" = --stock-initrd ]; then
    base=${2:?--stock-initrd BASE OUT}
    dest=${3:?--stock-initrd BASE OUT}
    moddest="$work/stock/lab-modules"
    mkdir -p "$moddest"
    for m in virtio_mmio virtio_pci virtio_blk virtio_net vmw_vsock_virtio_transport button evdev; do
        add_module "$m"
    done
    echo "${order[*]}" > "$moddest/order"
    # udev, to give NICs the names a distro does (enp0sN on PCI): udevadm
    # (systemd-udevd is the same binary) with its libraries, the two rules
    # that name network interfaces and the default .link policy.
    sr=$work/stock
    for f in /bin/udevadm $(ldd /bin/udevadm | grep -o '/[^ ]*'); do
        mkdir -p "$sr$(dirname "$f")"
        cp -Ln "$f" "$sr$f"
    done
    mkdir -p "$sr/lib/systemd/network" "$sr/lib/udev/rules.d"
    ln -sf /bin/udevadm "$sr/lib/systemd/systemd-udevd"
    cp /lib/udev/rules.d/75-net-description.rules /lib/udev/rules.d/80-net-setup-link.rules "$sr/lib/udev/rules.d/"
    cp /lib/systemd/network/99-default.link "$sr/lib/systemd/network/"
    (cd "$work/stock" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/modules.cpio.gz"
    cat "$base" "$work/modules.cpio.gz" > "$dest.tmp"
    mv "$dest.tmp" "$dest"
    exit 0
fi
for m in kvm-amd tun bridge loop; do add_module "$m"; done
echo "${order[*]}" > "$ir/lab/modules/order"

# copy_with_libs FILE DEST: FILE to DEST in L1, with the libraries ldd lists
# (at their own paths).
copy_with_libs() {
    local f=$1 dest=$2 lib
    mkdir -p "$ir$(dirname "$dest")"
    cp -L "$f" "$ir$dest"
    if head -c 4 "$f" | grep -q ELF; then
        # A static ELF (a kernel) has no libraries: ldd fails, nothing to copy.
        { ldd "$f" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while read -r lib; do
            mkdir -p "$ir$(dirname "$lib")"
            cp -Ln "$lib" "$ir$lib"
        done
    fi
}
: > "$ir/lab/env"
while IFS='=' read -r name value; do
    case "$name" in
        LAB_MODE | LAB_TIMEOUT | LAB_LIB | LAB_TCG_THREAD | LAB_L0_MONITOR | LAB_L0_QEMU | LAB_L1_CPUS | LAB_L1_SILENCE) continue ;;
    esac
    if [ -f "$value" ]; then
        # Below /lab/files: L1 mounts a tmpfs on /tmp, which would hide
        # files copied to their own /tmp paths.
        copy_with_libs "$(realpath "$value")" "/lab/files$(realpath "$value")"
        echo "export $name=/lab/files$(realpath "$value")" >> "$ir/lab/env"
    else
        printf 'export %s=%q\n' "$name" "$value" >> "$ir/lab/env"
    fi
done < <(env | grep '^LAB_' | sort)
cp "$scenario" "$ir/lab/scenario.sh"
cp "$LAB_LIB" "$ir/lab/lib.sh"
echo "export LAB_LIB=/lab/lib.sh" >> "$ir/lab/env"
cat > "$ir/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs -o size=1536m tmp /tmp; mkdir -p /run/keel
for m in $(cat /lab/modules/order); do insmod /lab/modules/$m.ko || echo "lab: insmod $m failed"; done
ip link set lo up
# A heartbeat on L1's second serial port, which l1.sh watches: an L1 that
# falls silent there is wedged.
(while :; do cut -d' ' -f1 /proc/uptime >/dev/ttyS1; sleep 5; done) &
if [ -c /dev/kvm ]; then
    echo "lab: L1 ready: /dev/kvm present"
    . /lab/env
    sh /lab/scenario.sh
    echo "lab: scenario exit $?"
else
    echo "lab: no /dev/kvm in L1"
    echo "lab: scenario exit 99"
fi
poweroff -f
INIT
chmod +x "$ir/init"
(cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/l1.cpio.gz"

# L0's emulator. QEMU 7.2 (bookworm's) spoils about a third of the lab's
# runs: its multi-threaded TCG lets an interrupt into L1 inside KVM's world
# switch, where SVM's GIF must hold it off, and L1's kernel panics. Under
# QEMU 10 (bookworm-backports) L1 has not panicked (README, "Linux guests").
# So unless the host's
# own QEMU is 10 or newer, the lab fetches qemu-system-x86 and the packages
# holding its modules, firmware and data from "<codename>-backports" with a
# private apt list (the host's apt set-up is left alone), unpacks them into
# the cache, and runs that QEMU in a private mount namespace where its own
# modules replace the host's (QEMU loads modules only from its build).
# LAB_L0_QEMU=system forces the host's qemu-system-x86_64.
qemu_major() { "$@" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'; }
l0_qemu=(qemu-system-x86_64)
if [ "${LAB_L0_QEMU:-auto}" != system ] && [ "$(qemu_major qemu-system-x86_64)" -lt 10 ] 2>/dev/null; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    adir="$cache/apt-$codename-backports"
    apto=(-o "Dir::Etc::SourceList=$adir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$adir/lists" -o "Dir::Cache=$adir/cache" -o Dir::State::status=/dev/null
        -o Debug::NoLocking=1)
    qpkgs=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
    qcand() { apt-cache "${apto[@]}" policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ {print $2}'; }
    # qfetch [last]: unpack the candidate version into $cache/qemu-<version>
    # unless it is there; say where in $adir/current. "last": say why not.
    qfetch() {
        local qver
        qver=$(qcand)
        case "$qver" in
            "" | "(none)")
                [ "${1:-}" != last ] || log "no qemu-system-x86 in $codename-backports"
                return 1
                ;;
        esac
        unpack_debs "$cache/qemu-$qver" "QEMU $qver from $codename-backports" \
            "${apto[@]}" download -qq "${qpkgs[@]}" || return 1
        echo "$cache/qemu-$qver" > "$adir/current"
    }
    (
        flock 9
        mkdir -p "$adir/lists/partial" "$adir/cache"
        echo "deb http://deb.debian.org/debian $codename-backports main" > "$adir/sources.list"
        # The index is read once and kept; it is read again only when what it
        # names cannot be had (none yet, or a version the mirror has dropped).
        qfetch || { apt-get "${apto[@]}" update -qq >&2 && qfetch last; } || {
            log "cannot fetch QEMU from $codename-backports (LAB_L0_QEMU=system uses the host's $(qemu_major qemu-system-x86_64 | sed 's/^/QEMU /'), which spoils many runs)"
            exit 1
        }
    ) 9>"$cache/.lock"
    qdir=$(cat "$adir/current")
    [ -x "$qdir/usr/bin/qemu-system-x86_64" ] || { log "no QEMU in $qdir"; exit 1; }
    # $0 is the unpacked tree; the bind is needed only where the host has
    # modules of its own QEMU.
    l0_qemu=(unshare -m sh -c 'm=/usr/lib/x86_64-linux-gnu/qemu
        if [ -d $m ]; then mount --bind "$0$m" $m || exit 1; fi
        exec "$0/usr/bin/qemu-system-x86_64" -L "$0/usr/share/qemu" -L "$0/usr/share/seabios" "$@"' "$qdir")
fi

out="$work/console.log"
beat="$work/heartbeat.log"
log "booting L1 ($pkg, $(qemu_major "${l0_qemu[@]}" | sed 's/^/QEMU /') TCG, EPYC with SVM)"
# L1's kernel now and then wedges under QEMU's multi-threaded TCG with nested
# SVM (single-threaded TCG would avoid it but is several times slower). L1's
# init writes a heartbeat to its second serial port every 5 s; when that has
# been silent for LAB_L1_SILENCE seconds (default 90), L1 is stopped and
# reported (exit 98), and the harness runs the scenario once more. A soft
# lockup report alone is not a wedge: L1 may get over it.
: > "$out"
: > "$beat"
monitor=(-monitor none)
[ -n "${LAB_L0_MONITOR:-}" ] && monitor=(-monitor "unix:$LAB_L0_MONITOR,server,nowait")
started=$(date +%s)
(
    set +e
    timeout "${LAB_TIMEOUT:-900}" "${l0_qemu[@]}" -accel "tcg,thread=${LAB_TCG_THREAD:-multi}" \
        -cpu EPYC,+svm,+npt -smp "${LAB_L1_CPUS:-2}" -m 3072 "${monitor[@]}" \
        -display none -parallel none -serial stdio -serial "file:$beat" -no-reboot -nic none \
        -kernel "$vmlinuz" -initrd "$work/l1.cpio.gz" \
        -append "console=ttyS0 panic=-1 quiet" </dev/null \
        2> >(grep --line-buffered -v "TCG doesn't support requested feature" >&2) | tee "$out"
    echo "${PIPESTATUS[0]}" > "$work/qemu.rc"
) &
qemu_job=$!
silence=${LAB_L1_SILENCE:-90}
last_size=0
last_change=$started
while kill -0 "$qemu_job" 2>/dev/null; do
    now=$(date +%s)
    size=$(stat -c %s "$beat" 2>/dev/null || echo 0)
    if [ "$size" != "$last_size" ]; then
        last_size=$size
        last_change=$now
    elif [ $((now - last_change)) -ge "$silence" ]; then
        echo "lab: L1 wedged: no heartbeat for $silence s, $((now - started)) s after boot ($(grep -c 'soft lockup' "$out") soft lockup report(s) on its console): stopped"
        pkill -f "$work/l1.cpio.gz" || true
        break
    fi
    sleep 2
done
wait "$qemu_job" || true
rc=$(sed -n 's/^lab: scenario exit \([0-9]*\).*/\1/p' "$out" | tail -1)
if [ -z "$rc" ]; then
    echo "lab: L1 ended without its scenario's result: QEMU exit status $(cat "$work/qemu.rc" 2>/dev/null || echo unknown), $(($(date +%s) - started)) s after boot"
fi
exit "${rc:-98}"
