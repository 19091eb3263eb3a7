#!/usr/bin/env bash
# Builds the Keel Linux guest: an ELF `vmlinux` with a PVH entry note (from
# Debian's linux-source package, tinyconfig + kernel.config) and a busybox
# initramfs whose /init is ./init.
#
# Outputs go to a cache directory (default <repo>/.cache/linux-guest, or
# $KEEL_LINUX_GUEST_CACHE):
#   kernel-<key>/vmlinux, kernel-<key>/config       key: kernel.config + linux-source version
#   initramfs-<key>/initramfs.cpio.gz               key: init + busybox-static version
# and an unchanged input means a cache hit: nothing is rebuilt.
#
# Progress goes to stderr; the last two lines on stdout are the results:
#   KEEL_LINUX_GUEST_VMLINUX=<path>
#   KEEL_LINUX_GUEST_INITRAMFS=<path>
#
# Environment:
#   KEEL_LINUX_GUEST_CACHE      cache directory (default <repo>/.cache/linux-guest)
#   KEEL_LINUX_GUEST_KEEP_WORK  1 keeps the extracted kernel tree after a build
#   KEEL_LINUX_GUEST_JOBS       make -j value (default: nproc)
# Missing Debian build dependencies are installed with apt-get (as root, or
# through sudo when it is there).
set -euo pipefail

# Bump when a change to this script changes what it produces.
KERNEL_RECIPE=1
INITRAMFS_RECIPE=2
ARCH=x86_64
export ARCH

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/../.." && pwd)
fragment=$script_dir/kernel.config
init_script=$script_dir/init
lab_script=$script_dir/lab.sh
# Debian tools the lab scenarios run in the guest (with their libraries).
lab_tools=(/usr/bin/socat /usr/sbin/mke2fs /usr/sbin/e2fsck)
check_config=$script_dir/check-config.sh
cache=${KEEL_LINUX_GUEST_CACHE:-$repo_root/.cache/linux-guest}
jobs=${KEEL_LINUX_GUEST_JOBS:-$(nproc)}

log() { echo "[linux-guest] $*" >&2; }
die() { echo "[linux-guest] ERROR: $*" >&2; exit 1; }
run() { log "+ $*"; "$@" >&2; }

# --- Debian packages ---------------------------------------------------------
pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

apt_updated=0
ensure_pkgs() {
    local missing=() p
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 ||
            die "missing Debian packages: ${missing[*]} (not root and no sudo: install them and re-run)"
        sudo=(sudo)
    fi
    log "installing missing Debian packages: ${missing[*]}"
    if [ "$apt_updated" -eq 0 ]; then
        run "${sudo[@]}" apt-get update -q
        apt_updated=1
    fi
    run "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}

command -v dpkg-query >/dev/null 2>&1 || die "this script needs a Debian-based system (dpkg/apt-get)"

# The cache keys need both versions, so these two are installed up front.
ensure_pkgs linux-source busybox-static socat e2fsprogs

# linux-source depends on linux-source-<major.minor>, which ships the tarball.
src_pkg=$(dpkg-query -W -f='${Depends}' linux-source | grep -o 'linux-source-[0-9.]*' | head -n1)
[ -n "$src_pkg" ] || die "cannot tell which linux-source-X.Y package linux-source depends on"
src_version=$(dpkg-query -W -f='${Version}' "$src_pkg")
tarball=/usr/src/$src_pkg.tar.xz
[ -f "$tarball" ] || die "$tarball not found (package $src_pkg $src_version)"
busybox_version=$(dpkg-query -W -f='${Version}' busybox-static)
busybox_bin=/bin/busybox
[ -x "$busybox_bin" ] || busybox_bin=$(dpkg -L busybox-static | grep -E '/busybox$' | head -n1)
[ -x "$busybox_bin" ] || die "busybox binary of busybox-static not found"

kernel_key=$( { echo "kernel-recipe $KERNEL_RECIPE"; echo "$src_pkg $src_version"; cat "$fragment"; } |
    sha256sum | cut -c1-16)
tools_version=$(dpkg-query -W -f='${Version} ' socat e2fsprogs libc6 libssl3 2>/dev/null || true)
initramfs_key=$( { echo "initramfs-recipe $INITRAMFS_RECIPE"; echo "busybox-static $busybox_version"; echo "tools $tools_version"; cat "$init_script" "$lab_script"; } |
    sha256sum | cut -c1-16)
kernel_dir=$cache/kernel-$kernel_key
initramfs_dir=$cache/initramfs-$initramfs_key
vmlinux=$kernel_dir/vmlinux
initramfs=$initramfs_dir/initramfs.cpio.gz

log "cache:     $cache"
log "kernel:    $src_pkg $src_version + $(basename "$fragment") -> key $kernel_key"
log "initramfs: busybox-static $busybox_version + $(basename "$init_script") -> key $initramfs_key"

mkdir -p "$cache"
# One build at a time per cache (tests may start several).
exec 9>"$cache/.lock"
if ! flock -n 9; then
    log "another build holds $cache/.lock; waiting"
    flock 9
fi

# Extracts <tarball member under the top dir> ... into $1.
extract_source() {
    local dest=$1; shift
    mkdir -p "$dest"
    run tar -xJf "$tarball" -C "$dest" --strip-components=1 "$@"
}

# --- Kernel ------------------------------------------------------------------
pvh_note_check() {
    # XEN_ELFNOTE_PHYS32_ENTRY is note type 18 (0x12) with owner "Xen".
    local notes
    notes=$(readelf -n "$1")
    grep -E '^\s*Xen\s' <<<"$notes" | grep -qiE '0x00000012|PHYS32_ENTRY'
}

build_kernel() {
    ensure_pkgs build-essential bc bison flex libelf-dev xz-utils binutils
    local work=$cache/work-kernel-$kernel_key
    local out=$cache/.tmp-kernel-$kernel_key
    rm -rf "$work" "$out"
    log "extracting $tarball"
    extract_source "$work/src"
    local src=$work/src
    local start=$SECONDS

    run make -C "$src" tinyconfig
    log "+ merge_config.sh -n .config $(basename "$fragment")"
    (cd "$src" && scripts/kconfig/merge_config.sh -n .config "$fragment") >&2
    log "checking that every requested option survived the merge"
    "$check_config" "$fragment" "$src/.config" >&2

    run make -C "$src" -j"$jobs" vmlinux
    log "kernel build took $((SECONDS - start)) s"

    pvh_note_check "$src/vmlinux" ||
        die "$src/vmlinux has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
    mkdir -p "$out"
    cp "$src/vmlinux" "$out/vmlinux"
    cp "$src/.config" "$out/config"
    rm -rf "$kernel_dir"
    mv "$out" "$kernel_dir"
    if [ "${KEEL_LINUX_GUEST_KEEP_WORK:-0}" = 1 ]; then
        log "keeping kernel tree $src"
    else
        run rm -rf "$work"
    fi
}

if [ -f "$vmlinux" ]; then
    log "kernel cache hit: $vmlinux"
else
    log "kernel cache miss: building $vmlinux"
    build_kernel
fi

# --- Initramfs ---------------------------------------------------------------
build_initramfs() {
    ensure_pkgs build-essential xz-utils
    local work=$cache/work-initramfs-$initramfs_key
    local out=$cache/.tmp-initramfs-$initramfs_key
    rm -rf "$work" "$out"
    mkdir -p "$work" "$out"

    # The kernel's own gen_init_cpio writes device nodes (/dev/console) into
    # the archive without needing root or mknod.
    log "building gen_init_cpio from $tarball"
    extract_source "$work/src" "$src_pkg/usr/gen_init_cpio.c"
    run cc -O2 -o "$work/gen_init_cpio" "$work/src/usr/gen_init_cpio.c"

    local applets
    applets=$("$busybox_bin" --list-full | sort)
    local list=$work/initramfs.list
    {
        echo "dir /dev 0755 0 0"
        echo "nod /dev/console 0600 0 0 c 5 1"
        echo "nod /dev/null 0666 0 0 c 1 3"
        local d
        for d in /bin /sbin /usr /usr/bin /usr/sbin /proc /sys /tmp /root /etc /mnt; do
            echo "dir $d 0755 0 0"
        done
        echo "file /bin/busybox $busybox_bin 0755 0 0"
        echo "file /init $init_script 0755 0 0"
        echo "file /lab.sh $lab_script 0644 0 0"
        # The lab's Debian tools and every library they load, at their paths.
        local f lib dirs=()
        for f in "${lab_tools[@]}"; do
            echo "file $f $(realpath "$f") 0755 0 0"
            while read -r lib; do
                dirs+=("$(dirname "$lib")")
                echo "file $lib $(realpath "$lib") 0755 0 0"
            done < <(ldd "$f" | grep -o '/[^ ]*' | sort -u)
        done | sort -u > "$work/tools.list"
        # Parent directories of the libraries, once each, before their files.
        grep -o '^file [^ ]*' "$work/tools.list" | cut -d' ' -f2 | xargs -n1 dirname | sort -u |
            while read -r d; do
                local p=""
                local part
                for part in $(echo "$d" | tr '/' ' '); do
                    p="$p/$part"
                    echo "dir $p 0755 0 0"
                done
            done | awk '!seen[$0]++' | grep -vxE 'dir /(bin|sbin|usr|usr/bin|usr/sbin|tmp|etc)( .*)?' 
        cat "$work/tools.list"
        echo "slink /sbin/mkfs.ext4 /usr/sbin/mke2fs 0777 0 0"
        echo "slink /sbin/fsck.ext4 /usr/sbin/e2fsck 0777 0 0"
        local applet
        while read -r applet; do
            [ "/$applet" = /bin/busybox ] && continue
            echo "slink /$applet /bin/busybox 0777 0 0"
        done <<<"$applets"
    } > "$list"
    log "initramfs: busybox with $(wc -l <<<"$applets") applets, /init from $init_script"
    grep -qE '(^|/)nproc$' <<<"$applets" || die "busybox has no nproc applet"

    log "+ gen_init_cpio $list | gzip -9 -n > $out/initramfs.cpio.gz"
    "$work/gen_init_cpio" "$list" | gzip -9 -n > "$out/initramfs.cpio.gz"
    rm -rf "$initramfs_dir"
    mv "$out" "$initramfs_dir"
    rm -rf "$work"
}

if [ -f "$initramfs" ]; then
    log "initramfs cache hit: $initramfs"
else
    log "initramfs cache miss: building $initramfs"
    build_initramfs
fi

# Convenience links to the current outputs.
ln -sfn "kernel-$kernel_key/vmlinux" "$cache/vmlinux"
ln -sfn "initramfs-$initramfs_key/initramfs.cpio.gz" "$cache/initramfs.cpio.gz"

log "vmlinux:   $vmlinux ($(stat -c %s "$vmlinux") bytes)"
log "initramfs: $initramfs ($(stat -c %s "$initramfs") bytes)"
echo "KEEL_LINUX_GUEST_VMLINUX=$vmlinux"
echo "KEEL_LINUX_GUEST_INITRAMFS=$initramfs"
