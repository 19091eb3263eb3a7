# Lab scenario: virtio-blk under Linux's virtio_blk and ext4. A file disk
# (vda), a loop-device disk (vdb, the LVM stand-in, O_DIRECT) and a read-only
# disk (vdc). Runs in L1 (or on a host with vmx/svm); see tests/lab/l1.sh.
. "$LAB_LIB"
K=$LAB_L2_KERNEL
I=$LAB_L2_INITRD

# pattern FILE MIB: FILE filled with 0xaa bytes (allocated, not sparse).
pattern() { dd if=/dev/zero bs=1M count="$2" 2>/dev/null | tr '\000' '\252' >"$1"; }
loopdev=$(losetup -f)
# fresh_disks: the three disks as the write run expects them (the loop
# device attached to a fresh loop.img).
fresh_disks() {
    losetup -d "$loopdev" 2>/dev/null
    pattern "$LAB_DIR/file.img" 64
    pattern "$LAB_DIR/loop.img" 64
    pattern "$LAB_DIR/ro.img" 16
    losetup "$loopdev" "$LAB_DIR/loop.img"
}
fresh_disks
ro_sum=$(sha256sum "$LAB_DIR/ro.img" | cut -d' ' -f1)
disks="--disk path=$LAB_DIR/file.img --disk path=$loopdev,direct=on --disk path=$LAB_DIR/ro.img,readonly=on"

# blk_boot NAME SCENARIO [SECONDS]: boots the guest with the three disks.
blk_boot() {
    # shellcheck disable=SC2086
    boot_keel "$1" --transport mmio --kernel "$K" --initrd "$I" --cmdline "$(l2_cmdline "$2")" \
        --memory size=256M --cpus boot=2 $disks
}

alloc_kib() { du -k "$1" | cut -f1; }
# The write run starts from fresh disks, so a guest that triple-faulted
# anywhere in it (see triple_faulted) is run again on fresh disks, up to 3
# runs in all; the runs after it build on what it wrote.
runs=1
while :; do
    before=$(alloc_kib "$LAB_DIR/file.img")
    blk_boot write blk-write
    wait_keel 300
    triple_faulted write && [ "$runs" -lt 3 ] || break
    keep_spoilt write "$(($(date +%s) - KEEL_START)) s into its run (its disks are made fresh again)"
    fresh_disks
    runs=$((runs + 1))
done
c=$LAB_DIR/write.console
expect blk.write-exit "$KEEL_RC" 3
[ "$(guest "$c" blk-write)" = done ] || show write
for k in mkfs-vda files-vda umount-vda mkfs-vdb files-vdb umount-vdb; do
    expect "blk.$k" "$(guest "$c" "$k")" ok
done
expect blk.fstrim "$(guest "$c" fstrim)" ok
after=$(alloc_kib "$LAB_DIR/file.img")
# fstrim gave most of the 64 MiB back as holes in the file.
if [ "$after" -lt $((before / 2)) ]; then ok blk.fstrim-holes-on-host; else fail blk.fstrim-holes-on-host "allocated $before KiB before, $after after"; fi
expect blk.blkdiscard "$(guest "$c" blkdiscard)" ok
if dd if="$LAB_DIR/loop.img" bs=1M skip=48 count=8 2>/dev/null | cmp -s - /dev/zero -n $((8 << 20)) 2>/dev/null ||
    [ "$(dd if="$LAB_DIR/loop.img" bs=1M skip=48 count=8 2>/dev/null | tr -d '\000' | wc -c)" = 0 ]; then
    ok blk.blkdiscard-zeroes-on-host
else
    fail blk.blkdiscard-zeroes-on-host "discarded range of the loop device still holds data"
fi
expect blk.ro-flag "$(guest "$c" vdc-ro)" 1
expect blk.ro-write-refused "$(guest "$c" vdc-write)" refused
expect blk.ro-host-unchanged "$(sha256sum "$LAB_DIR/ro.img" | cut -d' ' -f1)" "$ro_sum"

# Second boot from the same disks: clean filesystems, files intact.
blk_boot check blk-check
wait_keel 300
c=$LAB_DIR/check.console
[ "$(guest "$c" blk-check)" = done ] || show check
expect blk.reboot-fsck-vda "$(guest "$c" fsck-vda)" 0
expect blk.reboot-files-vda "$(guest "$c" verify-vda)" ok
expect blk.reboot-fsck-vdb "$(guest "$c" fsck-vdb)" 0
expect blk.reboot-files-vdb "$(guest "$c" verify-vdb)" ok

# kill -9 right after the guest's sync loses nothing.
blk_boot kill blk-kill
c=$LAB_DIR/kill.console
if wait_console "$c" '^LAB-GUEST synced' 300; then
    expect blk.kill-synced "$(guest "$c" synced)" yes
else
    fail blk.kill-synced "the guest never synced"
    show kill
fi
kill -9 "$KEEL_PID"
wait_keel 30
blk_boot after-kill blk-check
wait_keel 300
c=$LAB_DIR/after-kill.console
[ "$(guest "$c" blk-check)" = done ] || show after-kill
expect blk.kill-fsck "$(guest "$c" fsck-vda)" 0
expect blk.kill-files "$(guest "$c" verify-vda)" ok
losetup -d "$loopdev"
finish
